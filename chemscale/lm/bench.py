"""`python -m chemscale.bench chemgpt`: how fast ChemGPT trains, measured against baselines in the same run.

The command line is `chemscale.bench` (shared with `ff`, the force-field benchmark in
`chemscale.ff.bench`); the figures are measured here.

Figures (the last line printed is one JSON object with all of them). Every ratio's two sides
alternate in rounds (a few steps of one, then of the other) and the ratio is the median of the
per-round ratios, so a change in the machine's load hits both sides alike; `rounds` holds the
per-round rates.

- `speedup_vs_hf`: tokens/s of a full training step (forward, backward, AdamW, zero_grad) of
  ChemGPT over `transformers.GPTNeoForCausalLM` of the same shape and batch, both fp32, at
  width 128, depth 4, batch 32 x 64 tokens.
  Both run with glibc's default malloc settings. `python -m chemscale.train` raises malloc's
  mmap threshold (`chemscale.memory`), which leaves ChemGPT's step rate unchanged but makes this
  HF baseline ~14% faster: with it in this process too, the ratio measured 1.24 instead of 1.41.
- `speedup_vs_hf_bf16`: ChemGPT under bf16 autocast over HF in fp32, at width 256, depth 4
  (~3.2M parameters). Measured where `--bf16` says (`auto`: where the CPU has native bf16,
  AVX512-BF16 or AMX, reported as `bf16_supported`; `on`/`off` force it); null when not measured.
- `mfu`: ChemGPT's fp32 FLOP/s at width 256 (6·N + attention per token) over a 1024² fp32
  matmul (`matmul_fp32_gflops`), alternating with it.
- `encode_mol_per_s`: SMILES -> SELFIES encoding rate of `chemscale.lm.encode` (worker processes).
- `loader_tokens_per_s`: the training data loader (cached memory-mapped corpus -> padded
  batches), and `loader_over_training`, its rate over what training consumes.
- `end_to_end_fraction`: tokens/s through `python -m chemscale.train` (Lightning, data loading,
  per-step metrics, checkpoints) over a bare loop on the same batches, one run of each per round.
- `warnings`: a figure that cannot be true (an `mfu` or `end_to_end_fraction` above 1, which a
  busy machine produces when it slows the reference more than the step) is set to null and
  named here with its measured value; an empty list when every figure is physical.

`--quick` runs stand-in widths (32 for 128, 64 for 256) for a few steps: a check that every
path runs, bf16 included when on, not a measurement. The benchmark restores what it changes in
its process (torch threads, RNG, cache folders, log levels, malloc settings), so it can run
inside a notebook or a test.
"""

from __future__ import annotations

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
from chemscale.measure import paired_ratio, process_state_kept
from chemscale.lm.chemgpt import ChemGPT, ChemGPTConfig, ChemGPTShape
from chemscale.lm.tokenizer import PAD_ID

VOCAB = 30  # MOSES SELFIES: 26 symbols + 4 specials
PHYSICAL_BOUNDS = {"mfu": 1.0, "end_to_end_fraction": 1.0}  # a step cannot beat its own reference


def cpu_has_bf16() -> bool:
    """True if this CPU computes bf16 natively (AVX512-BF16 or AMX); autocast is slow otherwise."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def bf16_wanted(flag: bool | None = None) -> bool:
    """Whether to measure bf16: `flag` (`--bf16 on|off`) if given, else whether the CPU has native bf16."""
    return cpu_has_bf16() if flag is None else flag


def flag_impossible(result: dict) -> list[str]:
    """Null every figure above its physical bound in `result`; returns one warning per figure nulled."""
    warnings = []
    for key, bound in PHYSICAL_BOUNDS.items():
        value = result.get(key)
        if value is not None and value > bound:
            warnings.append(f"{key} measured {value:.3g} > {bound:g}, which cannot be: the machine was busy "
                            f"and slowed the reference more than the step; not reported, rerun on an idle machine")
            result[key] = None
    return warnings


def _chemgpt(width: int, depth: int) -> ChemGPT:
    torch.manual_seed(0)
    return ChemGPT(ChemGPTConfig(vocab_size=VOCAB, width=width, depth=depth))  # preset heads


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


def _matmul_step(n: int, repeats: int):
    """`repeats` n x n fp32 matmuls: the machine's attainable FLOP rate, the MFU's reference."""
    a, b = torch.randn(n, n), torch.randn(n, n)

    def step():
        for _ in range(repeats):
            a @ b
    return step


def _rate(step, units: float, n_steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    return units * n_steps / (time.perf_counter() - t0)


def compare(steps: dict, rounds: int, n_steps: int) -> dict[str, list[float]]:
    """Per-round rates of each (step function, units per call), the functions alternating within a round."""
    for step, _ in steps.values():  # warm-up: allocator, oneDNN kernels
        step(), step()
    rates = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, units) in steps.items():
            rates[name].append(_rate(step, units, n_steps))
    return rates


def step_speed(quick: bool, bf16: bool) -> dict:
    """ChemGPT vs HF GPT-Neo training steps, fp32 (and bf16 if `bf16`), and model FLOP utilisation."""
    rounds, n_steps = (2, 2) if quick else (5, 6)
    batch = torch.randint(4, VOCAB, (32, 64), generator=torch.Generator().manual_seed(0))
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    matmul_n, matmul_repeats = (256, 8) if quick else (1024, 20)
    out, per_round = {}, {}
    sizes = ((32, "w128"), (64, "w256")) if quick else ((128, "w128"), (256, "w256"))  # quick: tiny stand-ins
    for width, key in sizes:
        model = _chemgpt(width, 4)
        opt = model.configure_optimizer(lr=1e-4)
        steps = {"ours_fp32": (_ours_step(model, opt, batch, False), tokens),
                 "hf_fp32": (_hf_step(width, 4, batch), tokens)}
        if key == "w256":  # the MFU's and the bf16 comparison's width: their sides share these rounds
            steps["matmul_fp32"] = (_matmul_step(matmul_n, matmul_repeats), 2 * matmul_n**3 * matmul_repeats)
            if bf16:
                model_bf16 = _chemgpt(width, 4)
                steps["ours_bf16"] = (_ours_step(model_bf16, model_bf16.configure_optimizer(lr=1e-4), batch, True),
                                      tokens)
        per_round[key] = compare(steps, rounds, n_steps)
        rates = {name: statistics.median(r) for name, r in per_round[key].items()}
        out[key] = {"width": width, "n_params": model.n_params(), "flops_per_token": model.flops_per_token(63),
                    **rates}
        print(f"width {width}, depth 4: " + ", ".join(
            f"{k} {v / 1e9:,.1f} GFLOP/s" if k.startswith("matmul") else f"{k} {v:,.0f} tokens/s"
            for k, v in rates.items()), flush=True)
    w128, w256 = per_round["w128"], per_round["w256"]
    return {
        "speedup_vs_hf": paired_ratio(w128["ours_fp32"], w128["hf_fp32"]),
        "speedup_vs_hf_bf16": paired_ratio(w256["ours_bf16"], w256["hf_fp32"]) if bf16 else None,
        "mfu": paired_ratio(w256["ours_fp32"], w256["matmul_fp32"], out["w256"]["flops_per_token"]),
        "matmul_fp32_gflops": out["w256"]["matmul_fp32"] / 1e9,
        "train_tokens_per_s": out["w256"]["ours_fp32"],
        "bf16_supported": cpu_has_bf16(),
        "bf16_measured": bf16,
        "rates": out,
        "rounds": per_round,
    }


def data_speed(quick: bool, cache: Path) -> dict:
    """Encoding rate, and the cached loader's rate (the path training uses)."""
    import numpy as np

    from chemscale.lm import cache as lm_cache
    from chemscale.lm import corpus, loader
    from chemscale.lm.encode import encode_smiles
    from chemscale.lm.read import moses_path, read_smiles

    reader = read_smiles(moses_path())
    smiles = [s for _, (_, s) in zip(range(1000 if quick else 10000), reader)]
    t0 = time.perf_counter()
    encode_smiles(smiles, progress=False)
    encode = len(smiles) / (time.perf_counter() - t0)
    lm_cache.CACHE_DIR = cache
    tokens = corpus.load("moses", "train", 1000 if quick else 10000, progress=False)
    batches = loader.train_loader(tokens, np.arange(len(tokens)), 32, seed=0, steps_done=lambda: 0)
    t0, n = time.perf_counter(), 0
    for batch in batches:
        n += int((batch[:, 1:] != PAD_ID).sum())
    return {"encode_mol_per_s": encode, "loader_tokens_per_s": n / (time.perf_counter() - t0)}


def _bare_loop(cache: Path, n_mol: int, steps: int, width: int, depth: int, batch_size: int):
    """A plain loop of ChemGPT steps over the runner's first `steps` batches; returns a tokens/s timer."""
    from chemscale.lm import cache as lm_cache
    from chemscale.lm import loader
    from chemscale.lm import task as lm

    lm_cache.CACHE_DIR = cache / "cache" / "corpus"  # the child's cache (CHEMSCALE_RUNS=cache): encoded once
    train_corpus, _ = lm.load_data(lm.LMDataConfig(n_train_molecules=n_mol, n_val_molecules=256), seed=0)
    shape = ChemGPTShape(width=width, depth=depth)
    index = loader.fitting(train_corpus, shape.n_positions)
    batches = loader.train_loader(train_corpus, index, batch_size, seed=0, steps_done=lambda: 0)  # the runner's
    batches = [b for _, b in zip(range(steps), batches)]
    model = lm.make_model(shape, len(train_corpus.tokenizer))
    opt = model.configure_optimizer(lr=1e-4)
    for b in batches[:3]:
        _ours_step(model, opt, b, False)()

    def timed() -> float:
        t0, n = time.perf_counter(), 0
        for b in batches:
            _ours_step(model, opt, b, False)()
            n += int((b[:, 1:] != PAD_ID).sum())
        return n / (time.perf_counter() - t0)
    return timed


def end_to_end(quick: bool, cache: Path, width: int = 256, depth: int = 4, batch_size: int = 32) -> dict:
    """Tokens/s through `python -m chemscale.train` vs a bare loop over the same kind of batches, in rounds.

    Both count non-padding target tokens of real MOSES batches and use the same torch threads;
    each run validates and checkpoints once, at its end, as a long run does every
    `val_every_steps`. A round is one fresh run through the runner, then the bare loop.
    """
    from chemscale import runs

    steps, n_mol, rounds = (10, 1000, 2) if quick else (80, 4000, 3)
    config = {"study": "bench", "task": "chemgpt", "seed": 0, "model": {"width": width, "depth": depth},
              "data": {"source": "moses", "n_train_molecules": n_mol, "n_val_molecules": 256},
              "train": {"batch_size": batch_size, "max_steps": steps, "val_every_steps": steps, "patience": 0,
                        "warmup_steps": 5, "accelerator": "cpu", "threads": torch.get_num_threads()}}
    env = {**os.environ, "CHEMSCALE_RUNS": str(cache)}
    runner, bare, bare_timer = [], [], None
    for r in range(rounds):
        run_dir = runs.create("bench", config, cache / "runs" / f"round{r}")
        subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], check=True, env=env, cwd=paths.ROOT,
                       stdout=subprocess.DEVNULL)
        runner.append(json.loads((run_dir / runs.RESULT).read_text())["train_tokens_per_s"])
        if bare_timer is None:  # built after the first run: the corpus is cached by then
            bare_timer = _bare_loop(cache, n_mol, steps, width, depth, batch_size)
        bare.append(bare_timer())
    return {"end_to_end_tokens_per_s": statistics.median(runner), "bare_step_tokens_per_s": statistics.median(bare),
            "end_to_end_fraction": paired_ratio(runner, bare),
            "end_to_end_rounds": {"runner": runner, "bare": bare}}


def chemgpt_bench(quick: bool = False, bf16: bool | None = None) -> dict:
    """All figures of the ChemGPT benchmark (module docstring); `bf16` None: measure bf16 where native."""
    with process_state_kept():
        torch.set_num_threads(os.cpu_count() or 1)
        result = step_speed(quick, bf16_wanted(bf16))
        with tempfile.TemporaryDirectory() as tmp:
            result |= data_speed(quick, Path(tmp) / "cache" / "corpus")
            result |= end_to_end(quick, Path(tmp), *((32, 1) if quick else (256, 4)))
        result["loader_over_training"] = result["loader_tokens_per_s"] / result["train_tokens_per_s"]
        result["threads"] = torch.get_num_threads()
    result["warnings"] = flag_impossible(result)
    return result

