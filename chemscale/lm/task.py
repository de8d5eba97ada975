"""The ChemGPT training task: SELFIES corpus -> ChemGPT -> next-token loss in nats per token.

`chemscale.train` calls `build(config, ...)` for runs with `"task": "chemgpt"`. A run config
has three sections, each a dataclass validated on load: `model` (`LMModelConfig`), `data`
(`LMDataConfig`) and `train` (`chemscale.train.TrainConfig`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist

from chemscale.config import atomic_write_bytes, from_dict, require
from chemscale.lm import chemgpt, corpus
from chemscale.lm.vocabulary import keep_vocabulary
from chemscale.lm.tokenizer import PAD_ID

ATTENTION_LAYERS = ("global", "local", "global_local")


@dataclass
class LMModelConfig:
    """ChemGPT shape; the vocabulary size comes from the corpus."""

    width: int = 64  # embedding width d_model
    depth: int = 2  # transformer blocks
    n_heads: int = 0  # attention heads; 0 = chemgpt.preset_heads(width)
    n_positions: int = 128  # longest sequence incl. [BOS]/[EOS]; longer molecules are dropped and counted
    attention_layers: str = "global"  # global, local or global_local (GPT-Neo alternation)
    window_size: int = 256  # local attention window (GPT-Neo default)
    dropout: float = 0.0

    def __post_init__(self):
        for key in ("width", "depth", "n_positions", "window_size"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        require(self.n_heads >= 0, "n_heads", "must be >= 0 (0 = preset)")
        require(self.attention_layers in ATTENTION_LAYERS, "attention_layers", f"must be one of {ATTENTION_LAYERS}")
        require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@dataclass
class LMDataConfig:
    """Which molecules a run trains and validates on."""

    source: str = "moses"  # 'moses' or a path to a PubChem CID-SMILES, .smi/.txt or .csv(.gz) file
    n_train_molecules: int = 1000  # nested subsets: the first n of a fixed permutation
    n_val_molecules: int = 1000  # fixed validation subset (MOSES: its test split)

    def __post_init__(self):
        require(self.n_train_molecules > 0, "n_train_molecules", "must be > 0")
        require(self.n_val_molecules > 0, "n_val_molecules", "must be > 0")


SECTIONS = {"model": LMModelConfig, "data": LMDataConfig}  # config sections this task reads


class Task:
    """What the runner needs from a task: module, loaders, and end-of-run summaries."""

    def __init__(self, module, train_loader, val_loader, train_corpus, data_cfg: LMDataConfig, dropped: int,
                 n_train: int, n_val: int):
        self.module, self.train_loader, self.val_loader = module, train_loader, val_loader
        self.train_corpus, self.data_cfg, self.dropped_too_long = train_corpus, data_cfg, dropped
        self.n_train, self.n_val = n_train, n_val  # molecules that fit n_positions: what the run trains on

    def summary(self, book, train_seconds: float) -> dict:
        m = self.module
        return {
            "best_val_loss_nats_per_token": book.best_val if math.isfinite(book.best_val) else None,
            "n_params": m.model.n_params(non_embedding=False),
            "n_params_non_embedding": m.model.n_params(non_embedding=True),
            "flops_per_token": m.flops_per_token,
            "n_train_molecules": self.n_train,  # trained on (a fit's x); the config's number is the asked one
            "n_train_molecules_asked": self.data_cfg.n_train_molecules,
            "n_val_molecules": self.n_val,
            "n_val_molecules_asked": self.data_cfg.n_val_molecules,
            "dropped_too_long": self.dropped_too_long,
            "vocab_size": m.model.config.vocab_size,
            "tokens_seen": m.tokens_seen,
            "tokens_at_best": m.tokens_at_best,
            "flops_at_best": m.flops_per_token * m.tokens_at_best,
            "flops_total": m.flops_per_token * m.tokens_seen,
            "train_tokens_per_s": m.tokens_this_process / max(train_seconds, 1e-9),
        }

    def finish(self, run_dir: Path) -> dict:
        return {}


class ChemGPTModule(pl.LightningModule):
    """Next-token cross-entropy (nats per token, padding masked) on SELFIES token ids."""

    def __init__(self, model: chemgpt.ChemGPT, lr: float, weight_decay: float, warmup_steps: int, max_steps: int,
                 seed: int, context: int | None = None):
        super().__init__()
        self.model, self.lr, self.weight_decay = model, lr, weight_decay
        self.warmup_steps, self.max_steps, self.seed = warmup_steps, max_steps, seed
        self.flops_per_token = model.flops_per_token(context)  # attention term at the mean sequence length
        self.tokens_seen = 0  # all ranks, restored from checkpoints
        self.tokens_at_best = 0
        self.tokens_this_process = 0
        self._tokens = torch.zeros((), dtype=torch.long)  # this step's non-pad targets, kept on device
        self.last_loss = torch.zeros(())
        self.extra_val: dict = {}
        self._val_sum = self._val_count = None

    def training_step(self, batch, batch_idx):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        _, loss = self.model(inputs, targets)
        # Counting tokens with .item() would sync the GPU every step; sum on device, read at validation.
        self._tokens = self._tokens.to(batch.device) + (targets != PAD_ID).sum()
        self.last_loss = loss.detach()
        return loss

    def _take_tokens(self) -> None:
        n = self._tokens.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
        self.tokens_seen += int(n)
        self.tokens_this_process += int(n)
        self._tokens.zero_()

    def on_validation_epoch_start(self):
        self._take_tokens()
        self._val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros((), dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        _, loss = self.model(inputs, targets)
        count = (targets != PAD_ID).sum()
        self._val_sum += loss.double() * count
        self._val_count += count

    def on_validation_epoch_end(self):
        totals = torch.stack([self._val_sum, self._val_count])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        self.log("val_loss", (totals[0] / totals[1]).float(), prog_bar=True)

    def on_new_best(self, run_dir: Path) -> None:
        self.tokens_at_best = self.tokens_seen
        if self.trainer.is_global_zero:
            import io

            buf = io.BytesIO()
            torch.save(self.model.state_dict(), buf)
            atomic_write_bytes(run_dir / "best.pt", buf.getvalue())

    def on_save_checkpoint(self, checkpoint):
        checkpoint["chemscale"] = {"tokens_seen": self.tokens_seen, "tokens_at_best": self.tokens_at_best}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("chemscale", {})
        self.tokens_seen, self.tokens_at_best = state.get("tokens_seen", 0), state.get("tokens_at_best", 0)

    def configure_optimizers(self):
        from chemscale.train import lr_lambda

        opt = self.model.configure_optimizer(lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.warmup_steps, self.max_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _Molecules(torch.utils.data.Dataset):
    """Token ids of the molecules at `index` of a TokenCorpus (the ones that fit the context)."""

    def __init__(self, tokens: corpus.TokenCorpus, index: np.ndarray):
        self.tokens, self.index = tokens, index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return self.tokens[int(self.index[i])]


def _fitting(tokens: corpus.TokenCorpus, n_positions: int) -> np.ndarray:
    """Indices of molecules whose [BOS] ids [EOS] fits in n_positions."""
    lengths = np.diff(np.asarray(tokens.offsets)) + 2
    return np.flatnonzero(lengths <= n_positions)


def make_model(model_cfg: LMModelConfig, vocab_size: int) -> chemgpt.ChemGPT:
    """ChemGPT of the configured shape (heads from the preset when n_heads is 0)."""
    fields = asdict(model_cfg)
    fields["n_heads"] = fields["n_heads"] or chemgpt.preset_heads(model_cfg.width)
    return chemgpt.ChemGPT(chemgpt.ChemGPTConfig(vocab_size=vocab_size, **fields))


def load_data(data_cfg: LMDataConfig, seed: int, progress: bool = False):
    """Training and validation corpora (validation mapped onto the training vocabulary)."""
    train = corpus.load(data_cfg.source, "train", data_cfg.n_train_molecules, seed=seed, progress=progress)
    val = corpus.load(data_cfg.source, "val", data_cfg.n_val_molecules, seed=seed, tokenizer=train.tokenizer,
                      progress=progress)
    return train, val


def build(config: dict, tcfg, run_dir: Path, source: str) -> Task:
    """Build the ChemGPT task of a run config (sections `model`, `data`)."""
    model_cfg = from_dict(LMModelConfig, config.get("model", {}), f"{source} [model]")
    data_cfg = from_dict(LMDataConfig, config.get("data", {}), f"{source} [data]")
    seed = int(config.get("seed", 0))
    train_corpus, val_corpus = load_data(data_cfg, seed=0)  # data seed fixed: nested subsets across seeds
    keep_vocabulary(run_dir, train_corpus.tokenizer, data_cfg.source)
    train_idx = _fitting(train_corpus, model_cfg.n_positions)
    val_idx = _fitting(val_corpus, model_cfg.n_positions)
    _check_fitting(train_corpus, train_idx, "training", model_cfg.n_positions, source)
    _check_fitting(val_corpus, val_idx, "validation", model_cfg.n_positions, source)
    model = make_model(model_cfg, len(train_corpus.tokenizer))
    mean_len = float(np.diff(np.asarray(train_corpus.offsets))[train_idx].mean()) + 1  # + [BOS] or [EOS]
    module = ChemGPTModule(model, tcfg.lr, tcfg.weight_decay, tcfg.warmup_steps, tcfg.max_steps, seed,
                           context=round(mean_len))
    from chemscale.train import ResumableSampler

    # Order from (seed, epoch), resumed at the checkpoint's step; whole batches (one short batch when
    # there are fewer molecules than a batch). The loaders' own generators give each iterator its
    # base seed, so starting one (each epoch, each validation) leaves the global RNG alone.
    sampler = ResumableSampler(len(train_idx), tcfg.batch_size, seed, steps_done=lambda: module.global_step)
    train_loader = torch.utils.data.DataLoader(
        _Molecules(train_corpus, train_idx), batch_size=tcfg.batch_size, sampler=sampler,
        collate_fn=corpus.pad_batch, generator=torch.Generator().manual_seed(seed),
    )
    val_loader = torch.utils.data.DataLoader(_Molecules(val_corpus, val_idx), batch_size=max(256, tcfg.batch_size),
                                             collate_fn=corpus.pad_batch, generator=torch.Generator())
    dropped = (len(train_corpus) - len(train_idx)) + (len(val_corpus) - len(val_idx))
    return Task(module, train_loader, val_loader, train_corpus, data_cfg, dropped, len(train_idx), len(val_idx))


def _check_fitting(tokens: corpus.TokenCorpus, fitting: np.ndarray, split: str, n_positions: int, source: str):
    """Refuse a run in which no molecule of a split fits the context (it would crash or train on nothing)."""
    if len(fitting):
        return
    from chemscale.config import ConfigError

    shortest = int(np.diff(np.asarray(tokens.offsets)).min()) + 2
    raise ConfigError(f"{source} [model]: n_positions = {n_positions}, but none of the {len(tokens):,} {split} "
                      f"molecules fits (the shortest needs {shortest} positions with [BOS] and [EOS]); "
                      f"raise n_positions")


def validate(config: dict, source: str, *, data: bool = False, progress: bool = False) -> None:
    """Check the `model` and `data` sections of a ChemGPT run config.

    With `data`, also check that the training split holds `n_train_molecules` molecules and the
    validation split `n_val_molecules`: the corpus would otherwise give fewer without a word, and
    runs asking for different sizes would train on the same set. A sweep checks once per source,
    with its largest sizes, before any run starts. MOSES encodes without loss, so its line count
    decides at once; a user file is encoded up to that size (what its first run would do anyway;
    cached, so cheap later).
    """
    import gzip
    import warnings

    from chemscale.config import ConfigError

    from_dict(LMModelConfig, config.get("model", {}), f"{source} [model]")
    data_cfg = from_dict(LMDataConfig, config.get("data", {}), f"{source} [data]")
    if not data:
        return
    for split, key, name in (("train", "n_train_molecules", "training"), ("val", "n_val_molecules", "validation")):
        n = getattr(data_cfg, key)
        if data_cfg.source == "moses":
            with gzip.open(corpus.moses_path(split), "rb") as f:  # ~0.3 s; one header line
                available = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b"")) - 1
        else:
            with warnings.catch_warnings():  # the shortfall is reported below, as an error
                warnings.simplefilter("ignore")
                try:
                    available = len(corpus.load(data_cfg.source, split, n, seed=0, progress=progress))
                except corpus.CorpusError as e:
                    raise ConfigError(f"{source} [data]: source {data_cfg.source!r}: {e}") from None
        if available < n:
            raise ConfigError(f"{source} [data]: {key} = {n:,}, but the {name} split of "
                              f"{data_cfg.source!r} leaves {available:,} molecules that encode; "
                              f"ask for at most {available:,}")
