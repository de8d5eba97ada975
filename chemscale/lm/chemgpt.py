"""ChemGPT: a decoder-only transformer with GPT-Neo semantics (Frey et al. 2023 used GPT-Neo).

GPT-Neo details kept so weights convert to and from `transformers.GPTNeoForCausalLM`:
learned position embeddings, pre-LN blocks, tanh-GELU ("gelu_new"), attention logits NOT
scaled by 1/sqrt(head_dim), q/k/v without bias, optional local attention (each position sees
the last `window_size` positions) alternating with global layers, tied input/output embeddings.

Speed (measured by `python -m chemscale.bench chemgpt`): one fused QKV projection, PyTorch's
`scaled_dot_product_attention` (explicit batched matmuls for narrow heads on CPU), fused
AdamW, a sigmoid form of the tanh-GELU on CPU, and with targets the vocabulary projection is
computed only at non-padding positions. Under bf16 autocast on CPU, the narrow-head attention
pads its keys to a multiple of 32, the row length PyTorch's bf16 softmax vectorises (PyTorch's
flash kernel is ~4x slower than the batched matmuls there, in bf16 as in fp32), and the MLP uses
the exact (erf) GELU, which rounds to the tanh form's bf16 numbers but for one ulp in ~9% of
elements and costs less than half as much there (`MLP.forward`); fp32 keeps the tanh form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from chemscale.config import require
from chemscale.lm.tokenizer import BOS_ID, EOS_ID, PAD_ID

ATTENTION_LAYERS = ("global", "local", "global_local")


def preset_heads(width: int) -> int:
    """Heads for a width: the paper's 16 once heads are >= 16 wide, else width // 16 (min 1)."""
    return 16 if width >= 256 else max(1, width // 16)


@dataclass
class ChemGPTShape:
    """ChemGPT's shape: every setting of the model but its vocabulary, which comes from the corpus.

    This is a run config's `model` section: its fields, their defaults and their order are what
    run ids hash, so a field added here changes every ChemGPT run's id."""

    width: int = 64  # embedding width d_model
    depth: int = 2  # transformer blocks
    n_heads: int = 0  # attention heads; 0 = preset_heads(width)
    n_positions: int = 128  # longest sequence incl. [BOS]/[EOS]; a run drops (and counts) longer molecules
    attention_layers: str = "global"  # global, local or global_local (GPT-Neo's alternation)
    window_size: int = 256  # local attention window (GPT-Neo default)
    dropout: float = 0.0

    def __post_init__(self):
        for key in ("width", "depth", "n_positions", "window_size"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        require(self.n_heads >= 0, "n_heads", "must be >= 0 (0 = preset)")
        heads = self.n_heads or preset_heads(self.width)
        require(self.width % heads == 0, "n_heads", f"must divide width {self.width}, got {heads}")
        require(self.attention_layers in ATTENTION_LAYERS, "attention_layers", f"must be one of {ATTENTION_LAYERS}")
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@dataclass
class ChemGPTConfig(ChemGPTShape):
    """A shape and a vocabulary: the whole model. n_heads = 0 becomes preset_heads(width) here."""

    vocab_size: int = field(kw_only=True)
    layer_norm_eps: float = field(default=1e-5, kw_only=True)  # GPT-Neo's; not a shape a run chooses

    def __post_init__(self):
        super().__post_init__()
        require(self.vocab_size > 0, "vocab_size", f"must be > 0, got {self.vocab_size}")
        self.n_heads = self.n_heads or preset_heads(self.width)

    def layer_kind(self, i: int) -> str:
        if self.attention_layers == "global_local":
            return "global" if i % 2 == 0 else "local"
        return self.attention_layers


class SelfAttention(nn.Module):
    """Causal multi-head self-attention, GPT-Neo style (unscaled logits, optional local window)."""

    def __init__(self, config: ChemGPTConfig, local: bool):
        super().__init__()
        self.n_heads, self.local, self.window = config.n_heads, local, config.window_size
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)  # fused q, k, v
        self.proj = nn.Linear(config.width, config.width)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        nh, hs = self.n_heads, C // self.n_heads
        drop = self.dropout if self.training else 0.0
        # (3, B, nh, T, hs): one copy into head-major order (three views otherwise, copied one by one later)
        q, k, v = self.qkv(x).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        if self.local and T > self.window:
            i = torch.arange(T, device=x.device)
            allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < self.window)  # (T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop, scale=1.0)
        elif hs <= 32 and not drop and x.device.type == "cpu":
            # Narrow heads on CPU: explicit batched matmuls beat the flash kernel (~18% on 16-wide
            # heads), and adding the causal mask inside baddbmm saves a pass (+6% per step at width 128).
            q, k, v = (t.view(B * nh, T, hs) for t in (q, k, v))
            # Reduced precision: the CPU's bf16 softmax is vectorised only over rows whose length is a
            # multiple of 32 (forward + backward of 63-long rows: 12 ms, 64-long: 5 ms at batch 32,
            # 16 heads). Zero keys and values padded on, masked like the future, change no result.
            S = -(-T // 32) * 32 if q.dtype == torch.bfloat16 else T
            if S > T:
                k, v = (F.pad(t, (0, 0, 0, S - T)) for t in (k, v))
            mask = torch.full((T, S), float("-inf"), dtype=q.dtype, device=x.device).triu_(1)
            y = torch.bmm(torch.baddbmm(mask, q, k.transpose(1, 2)).softmax(-1), v).view(B, nh, T, hs)
        else:  # a window at least as long as the sequence is plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop, scale=1.0)
        y = self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return F.dropout(y, drop) if drop else y  # p=0 dropout still draws a mask: skip it


_GELU_C1 = 2 * math.sqrt(2 / math.pi)
_GELU_C3 = _GELU_C1 * 0.044715


class TanhGELU(torch.autograd.Function):
    """GPT-Neo's tanh-approximated GELU, written with a sigmoid for CPUs.

    gelu_tanh(x) = x·(1 + tanh(a))/2 = x·sigmoid(2a), a = sqrt(2/π)·(x + 0.044715·x³). PyTorch's
    CPU kernels evaluate tanh about 3x slower than sigmoid. On the 2-core machine, forward +
    backward of a (2016, 512) fp32 activation (width 128, batch 32 x 63) take 1.4 ms against
    3.7 ms for `F.gelu(approximate="tanh")` in isolation, and a width-128 training step runs ~4%
    faster. Same values to float rounding (tested against F.gelu and by gradcheck). Used for
    fp32 on CPU only: GPU kernels and the reduced-precision paths keep PyTorch's GELU.
    """

    @staticmethod
    def forward(ctx, x):
        s = torch.addcmul(x.new_tensor(_GELU_C1), x, x, value=_GELU_C3).mul_(x).sigmoid_()  # sigmoid(2a)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        # d/dx x·s(z) = s + x·s·(1 - s)·dz/dx = s·(1 + x·dz/dx·(1 - s)), z = C1·x + C3·x³
        xdz = torch.addcmul(x.new_tensor(_GELU_C1), x, x, value=3 * _GELU_C3).mul_(x)
        return xdz.mul_(1 - s).add_(1).mul_(s).mul_(grad)


class MLP(nn.Module):
    def __init__(self, config: ChemGPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.width, 4 * config.width)
        self.proj = nn.Linear(4 * config.width, config.width)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.device.type == "cpu" and h.dtype == torch.float32 and torch.is_grad_enabled():
            h = TanhGELU.apply(h)
        elif h.device.type == "cpu" and h.dtype == torch.bfloat16:
            # In bf16 the tanh form and the exact (erf) GELU round to the same numbers but for one ulp in ~9% of
            # elements: they differ by at most 4.7e-4 (at x = 2.7), a sixteenth of a bf16 ulp there (0.0078),
            # and each is within 0.008 of the fp64 tanh form. PyTorch's CPU erf-GELU runs forward + backward
            # ~2.5x faster than its tanh-GELU in bf16 (isolated, (2016, 1024) at width 256), ~7% of a step.
            h = F.gelu(h)
        else:
            h = F.gelu(h, approximate="tanh")
        y = self.proj(h)
        return F.dropout(y, self.dropout) if self.dropout and self.training else y


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: ChemGPTConfig, local: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config, local)
        self.ln_2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ChemGPT(nn.Module):
    """Decoder-only transformer language model over SELFIES token ids."""

    def __init__(self, config: ChemGPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.width)
        self.wpe = nn.Embedding(config.n_positions, config.width)
        self.blocks = nn.ModuleList(Block(config, config.layer_kind(i) == "local") for i in range(config.depth))
        self.ln_f = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-Neo's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-block hidden states (B, T, C), before the last LayerNorm."""
        B, T = input_ids.shape
        if T > self.config.n_positions:
            raise ValueError(f"sequence of {T} tokens exceeds n_positions={self.config.n_positions}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        if self.config.dropout and self.training:
            x = F.dropout(x, self.config.dropout)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        """(logits, loss). With targets: loss = mean cross-entropy over non-[PAD] targets in nats,
        and logits is None (only the non-padding positions are projected onto the vocabulary)."""
        h = self.hidden(input_ids)
        if targets is None:
            return self.ln_f(h) @ self.wte.weight.T, None  # (B, T, V)
        keep = targets != PAD_ID
        if keep.all():  # no padding: a view, not a gather (and no scatter in the backward pass)
            h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        else:
            h, targets = h[keep], targets[keep]
        logits = self.ln_f(h) @ self.wte.weight.T  # (n_tokens, V)
        return None, F.cross_entropy(logits.float(), targets)

    def n_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non-embedding excludes token and position embeddings (Kaplan et al.)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def flops_per_token(self, context: int | None = None) -> float:
        """Training FLOPs per token: 6·N (forward + backward) + 6·depth·context·width for attention."""
        context = context or self.config.n_positions
        return 6.0 * self.n_params() + 6.0 * self.config.depth * context * self.config.width

    def configure_optimizer(self, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95)) -> torch.optim.AdamW:
        """AdamW, decaying only matrices (not biases or LayerNorm); fused kernels where available."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, TypeError):  # a device without fused AdamW
            return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)

    @torch.no_grad()
    def sample(self, n: int, max_len: int | None = None, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None, batch_size: int = 500) -> list[list[int]]:
        """Generate `n` token-id sequences from [BOS] until [EOS] (both left out); temperature 0 is greedy.

        Each sequence is what the model drew, at most max_len - 1 tokens: a [PAD], [BOS] or [UNK]
        it drew stays in (undertrained models draw them; the molecule is then invalid, not cleaned).
        """
        max_len = min(max_len or self.config.n_positions, self.config.n_positions)
        device = self.wte.weight.device
        out: list[list[int]] = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            ids = torch.full((m, 1), BOS_ID, dtype=torch.long, device=device)
            done = torch.zeros(m, dtype=torch.bool, device=device)
            while ids.shape[1] < max_len and not done.all():
                logits = self.ln_f(self.hidden(ids)[:, -1]) @ self.wte.weight.T  # (m, V)
                nxt = self._pick(logits.float(), temperature, top_k, generator)
                nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
                done |= nxt == EOS_ID
                ids = torch.cat([ids, nxt[:, None]], dim=1)
            for row in ids[:, 1:].tolist():
                out.append(row[: row.index(EOS_ID)] if EOS_ID in row else row)  # [PAD] only fills after [EOS]
        return out

    @staticmethod
    def _pick(logits, temperature, top_k, generator) -> torch.Tensor:
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        return torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)

    # --- conversion to and from Hugging Face GPT-Neo (transformers is a dev extra) ---

    def to_hf(self):
        """An equivalent `transformers.GPTNeoForCausalLM` (same weights, same logits)."""
        from transformers import GPTNeoConfig, GPTNeoForCausalLM

        c = self.config
        kinds = [c.layer_kind(i) for i in range(c.depth)]
        hf = GPTNeoForCausalLM(GPTNeoConfig(
            vocab_size=c.vocab_size, max_position_embeddings=c.n_positions, hidden_size=c.width, num_layers=c.depth,
            attention_types=[[[k], 1] for k in kinds], num_heads=c.n_heads, window_size=c.window_size,
            activation_function="gelu_new", resid_dropout=c.dropout, embed_dropout=c.dropout,
            attention_dropout=c.dropout, layer_norm_epsilon=c.layer_norm_eps, bos_token_id=BOS_ID,
            eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
        ))
        hf.load_state_dict(_to_hf_state(self.state_dict(), c), strict=False)
        hf.tie_weights()
        return hf.eval()

    @classmethod
    def from_hf(cls, hf) -> ChemGPT:
        """A ChemGPT with the configuration and weights of a `transformers.GPTNeoForCausalLM`."""
        h = hf.config
        kinds = list(h.attention_layers)
        pattern = "global" if set(kinds) == {"global"} else "local" if set(kinds) == {"local"} else "global_local"
        config = ChemGPTConfig(vocab_size=h.vocab_size, width=h.hidden_size, depth=h.num_layers, n_heads=h.num_heads,
                               n_positions=h.max_position_embeddings, window_size=h.window_size,
                               attention_layers=pattern, dropout=0.0, layer_norm_eps=h.layer_norm_epsilon)
        if [config.layer_kind(i) for i in range(config.depth)] != kinds:
            raise ValueError(f"attention layer pattern {kinds} is not global, local or global/local alternation")
        if h.activation_function != "gelu_new":
            raise ValueError(f"activation {h.activation_function!r} is not supported (ChemGPT uses gelu_new)")
        model = cls(config)
        model.load_state_dict(_from_hf_state(hf.state_dict(), config))
        return model.eval()


def _hf_prefix(i: int) -> str:
    return f"transformer.h.{i}."


def _to_hf_state(state: dict, c: ChemGPTConfig) -> dict:
    """ChemGPT state dict -> GPT-Neo names (the fused qkv split into q, k, v)."""
    out = {"transformer.wte.weight": state["wte.weight"], "transformer.wpe.weight": state["wpe.weight"],
           "transformer.ln_f.weight": state["ln_f.weight"], "transformer.ln_f.bias": state["ln_f.bias"],
           "lm_head.weight": state["wte.weight"]}
    for i in range(c.depth):
        src, dst = f"blocks.{i}.", _hf_prefix(i)
        q, k, v = state[src + "attn.qkv.weight"].split(c.width, dim=0)
        out |= {dst + "attn.attention.q_proj.weight": q, dst + "attn.attention.k_proj.weight": k,
                dst + "attn.attention.v_proj.weight": v}
        for mine, theirs in _BLOCK_NAMES:
            out[dst + theirs] = state[src + mine]
    return out


def _from_hf_state(state: dict, c: ChemGPTConfig) -> dict:
    """GPT-Neo state dict -> ChemGPT names (q, k, v fused into qkv)."""
    out = {"wte.weight": state["transformer.wte.weight"], "wpe.weight": state["transformer.wpe.weight"],
           "ln_f.weight": state["transformer.ln_f.weight"], "ln_f.bias": state["transformer.ln_f.bias"]}
    for i in range(c.depth):
        src, dst = _hf_prefix(i), f"blocks.{i}."
        qkv = [state[src + f"attn.attention.{n}_proj.weight"] for n in "qkv"]
        out[dst + "attn.qkv.weight"] = torch.cat(qkv, dim=0)
        for mine, theirs in _BLOCK_NAMES:
            out[dst + mine] = state[src + theirs]
    return out


# (ChemGPT name, GPT-Neo name) inside a block, besides q/k/v.
_BLOCK_NAMES = [
    ("ln_1.weight", "ln_1.weight"), ("ln_1.bias", "ln_1.bias"), ("ln_2.weight", "ln_2.weight"),
    ("ln_2.bias", "ln_2.bias"), ("attn.proj.weight", "attn.attention.out_proj.weight"),
    ("attn.proj.bias", "attn.attention.out_proj.bias"), ("mlp.fc.weight", "mlp.c_fc.weight"),
    ("mlp.fc.bias", "mlp.c_fc.bias"), ("mlp.proj.weight", "mlp.c_proj.weight"), ("mlp.proj.bias", "mlp.c_proj.bias"),
]
