"""`python -m chemscale.bench chemgpt|ff`: how fast chemscale trains, measured against baselines in the same run.

`ff` is described in `chemscale.ff.bench`; `chemgpt` here.

Figures (the last line printed is one JSON object with all of them):

- `speedup_vs_hf`: tokens/s of a full training step (forward, backward, AdamW, zero_grad) of
  ChemGPT over `transformers.GPTNeoForCausalLM` of the same shape and batch, both fp32, at
  width 128, depth 4, batch 32 x 64 tokens; the two alternate in rounds and medians are compared.
  Both run with glibc's default malloc settings. `python -m chemscale.train` raises malloc's
  mmap threshold (`chemscale.memory`), which leaves ChemGPT's step rate unchanged but makes this
  HF baseline ~14% faster: with it in this process too, the ratio measured 1.24 instead of 1.41.
- `speedup_vs_hf_bf16`: ChemGPT under bf16 autocast over HF in fp32, at width 256, depth 4
  (~3.2M parameters); null where the CPU has no native bf16 (AVX512-BF16 or AMX).
- `mfu`: ChemGPT's fp32 FLOP/s at width 256 (6·N + attention per token) over a fp32 matmul
  measured in the same run.
- `encode_mol_per_s`: SMILES -> SELFIES encoding rate of `chemscale.corpus` (worker processes).
- `loader_tokens_per_s`: the training data loader (cached memory-mapped corpus -> padded
  batches), and `loader_over_training`, its rate over what training consumes.
- `end_to_end_fraction`: tokens/s through `python -m chemscale.train` (Lightning, data loading,
  per-step metrics, checkpoints) over a bare loop on the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from chemscale import paths
from chemscale.chemgpt import ChemGPT, ChemGPTConfig, preset_heads
from chemscale.tokenizer import PAD_ID

VOCAB = 30  # MOSES SELFIES: 26 symbols + 4 specials


def cpu_has_bf16() -> bool:
    """True if this CPU computes bf16 natively (AVX512-BF16 or AMX); autocast is slow otherwise."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def _chemgpt(width: int, depth: int) -> ChemGPT:
    torch.manual_seed(0)
    return ChemGPT(ChemGPTConfig(vocab_size=VOCAB, width=width, depth=depth, n_heads=preset_heads(width)))


def _ours_step(model, opt, batch, bf16: bool):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _hf_step(width: int, depth: int, batch):
    """A training step of the equivalent HF GPT-Neo, as a user would write it."""
    hf = _chemgpt(width, depth).to_hf().train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    labels = batch.masked_fill(batch == PAD_ID, -100)

    def step():
        hf(batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _rate(step, tokens: int, n_steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    return tokens * n_steps / (time.perf_counter() - t0)


def compare(steps: dict, tokens: int, rounds: int, n_steps: int) -> dict[str, float]:
    """Median tokens/s of each step function, run alternately for `rounds` rounds."""
    for step in steps.values():  # warm-up: allocator, oneDNN kernels
        step(), step()
    rates = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            rates[name].append(_rate(step, tokens, n_steps))
    return {name: statistics.median(r) for name, r in rates.items()}


def matmul_flops(n: int = 1024, dtype=torch.float32, repeats: int = 20) -> float:
    """FLOP/s of an n x n matmul: the machine's attainable rate for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def step_speed(quick: bool) -> dict:
    """ChemGPT vs HF GPT-Neo training steps, fp32 and bf16, and model FLOP utilisation."""
    rounds, n_steps = (2, 2) if quick else (5, 6)
    batch = torch.randint(4, VOCAB, (32, 64), generator=torch.Generator().manual_seed(0))
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    out = {}
    sizes = ((32, "w128"), (64, "w256")) if quick else ((128, "w128"), (256, "w256"))  # quick: tiny stand-ins
    for width, key in sizes:
        model = _chemgpt(width, 4)
        opt = model.configure_optimizer(lr=1e-4)
        steps = {"ours_fp32": _ours_step(model, opt, batch, False), "hf_fp32": _hf_step(width, 4, batch)}
        if width == 256 and cpu_has_bf16():
            model_bf16 = _chemgpt(width, 4)
            steps["ours_bf16"] = _ours_step(model_bf16, model_bf16.configure_optimizer(lr=1e-4), batch, True)
        rates = compare(steps, tokens, rounds, n_steps)
        out[key] = {"n_params": model.n_params(), "flops_per_token": model.flops_per_token(63), **rates}
        print(f"width {width}, depth 4: " + ", ".join(f"{k} {v:,.0f} tokens/s" for k, v in rates.items()), flush=True)
    peak = matmul_flops()
    w256 = out["w256"]
    return {
        "speedup_vs_hf": out["w128"]["ours_fp32"] / out["w128"]["hf_fp32"],
        "speedup_vs_hf_bf16": w256["ours_bf16"] / w256["hf_fp32"] if "ours_bf16" in w256 else None,
        "mfu": w256["flops_per_token"] * w256["ours_fp32"] / peak,
        "matmul_fp32_gflops": peak / 1e9,
        "train_tokens_per_s": w256["ours_fp32"],
        "bf16_supported": cpu_has_bf16(),
        "rates": out,
    }


def data_speed(quick: bool, cache: Path) -> dict:
    """Encoding rate, and the cached loader's rate (the path training uses)."""
    from chemscale import corpus, lm

    reader = corpus.read_smiles(corpus.moses_path())
    smiles = [s for _, (_, s) in zip(range(1000 if quick else 10000), reader)]
    t0 = time.perf_counter()
    corpus.encode_smiles(smiles, progress=False)
    encode = len(smiles) / (time.perf_counter() - t0)
    corpus.CACHE_DIR = cache
    tokens = corpus.load("moses", "train", 1000 if quick else 10000, progress=False)
    loader = torch.utils.data.DataLoader(lm._Molecules(tokens, torch.arange(len(tokens)).numpy()), batch_size=32,
                                         shuffle=True, collate_fn=corpus.pad_batch)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += int((batch[:, 1:] != PAD_ID).sum())
    return {"encode_mol_per_s": encode, "loader_tokens_per_s": n / (time.perf_counter() - t0)}


def end_to_end(quick: bool, cache: Path, width: int = 256, depth: int = 4, batch_size: int = 32) -> dict:
    """Tokens/s through `python -m chemscale.train` vs a bare loop over the same kind of batches.

    Both count non-padding target tokens of real MOSES batches; the run validates and
    checkpoints once, at its end, as a long run does every `val_every_steps`.
    """
    from chemscale import corpus, lm, runs

    steps, n_mol = (10, 1000) if quick else (80, 4000)
    config = {"study": "bench", "task": "chemgpt", "seed": 0, "model": {"width": width, "depth": depth},
              "data": {"source": "moses", "n_train_molecules": n_mol, "n_val_molecules": 256},
              "train": {"batch_size": batch_size, "max_steps": steps, "val_every_steps": steps, "patience": 0,
                        "warmup_steps": 5, "accelerator": "cpu"}}
    run_dir = runs.create("bench", config, cache / "runs")
    env = {**os.environ, "CHEMSCALE_RUNS": str(cache)}
    subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], check=True, env=env, cwd=paths.ROOT,
                   stdout=subprocess.DEVNULL)
    through_runner = json.loads((run_dir / runs.RESULT).read_text())["train_tokens_per_s"]
    corpus.CACHE_DIR = cache / "cache" / "corpus"  # the child's cache (CHEMSCALE_RUNS=cache): encoded once
    train_corpus, _ = lm.load_data(lm.LMDataConfig(n_train_molecules=n_mol, n_val_molecules=256), seed=0)
    loader = torch.utils.data.DataLoader(lm._Molecules(train_corpus, torch.arange(len(train_corpus)).numpy()),
                                         batch_size=batch_size, shuffle=True, collate_fn=corpus.pad_batch)
    batches = [b for _, b in zip(range(steps), loader)]
    model = lm.make_model(lm.LMModelConfig(width=width, depth=depth), len(train_corpus.tokenizer))
    opt = model.configure_optimizer(lr=1e-4)
    for b in batches[:3]:
        _ours_step(model, opt, b, False)()
    t0, n = time.perf_counter(), 0
    for b in batches:
        _ours_step(model, opt, b, False)()
        n += int((b[:, 1:] != PAD_ID).sum())
    bare = n / (time.perf_counter() - t0)
    return {"end_to_end_tokens_per_s": through_runner, "bare_step_tokens_per_s": bare,
            "end_to_end_fraction": through_runner / bare}


def chemgpt_bench(quick: bool = False) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    result = step_speed(quick)
    with tempfile.TemporaryDirectory() as tmp:
        result |= data_speed(quick, Path(tmp) / "cache" / "corpus")
        result |= end_to_end(quick, Path(tmp), *((32, 1) if quick else (256, 4)))
    result["loader_over_training"] = result["loader_tokens_per_s"] / result["train_tokens_per_s"]
    result["threads"] = torch.get_num_threads()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chemscale.bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["chemgpt", "ff"],
                        help="chemgpt: language-model training and data; ff: force-field training and xTB labelling")
    parser.add_argument("--quick", action="store_true", help="few steps: checks that it runs, not a measurement")
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    args = parser.parse_args(argv)
    if args.what == "ff":
        from chemscale.ff.bench import ff_bench

        result = ff_bench(args.quick)
    else:
        result = chemgpt_bench(args.quick)
    line = json.dumps(result, default=float)
    if args.json:
        args.json.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
