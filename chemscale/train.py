"""`python -m chemscale.train RUN_DIR`: train one run described by RUN_DIR/config.json.

One run is one process, so a crash, an out-of-memory or a library's global state cannot leak
into the notebook or the next run, and Lightning DDP works (it needs a script). The runner is
task-agnostic: a task module (`chemscale.lm` for ChemGPT) builds the LightningModule and the
data loaders; this module owns everything around them:

- `metrics.csv`: the training loss of every step (buffered in memory and appended at each
  validation, because per-step file writes cost ~20% of a small model's step) and every
  validation; after a restart, rows past the checkpoint are dropped so nothing is counted twice;
- `last.ckpt`: written atomically at each validation; a restarted run resumes from it;
- divergence: a NaN/inf loss stops the run and `result.json` records why, so a sweep goes on;
- `result.json`: written atomically last; its presence means "finished";
- `train.lock`: held (flock) while a process trains the run, so a second sweep or notebook that
  reaches the same run fails at once with the holder's pid instead of writing into its files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from chemscale import memory, runs
from chemscale.config import ConfigError, atomic_write_json, from_dict, require

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
METRIC_COLUMNS = ("step", "epoch", "tokens", "flops", "train_loss", "val_loss", "current_lr")


@dataclass
class TrainConfig:
    """Optimisation and hardware settings shared by every task."""

    batch_size: int = 64  # molecules (or structures) per step and device
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.1
    warmup_steps: int = 50  # linear warm-up, then cosine decay to 10% at max_steps
    max_steps: int = 1000  # hard cap on optimizer steps
    val_every_steps: int = 100  # validate (and checkpoint) every this many steps
    patience: int = 5  # stop after this many validations without improvement; 0 = never
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    precision: str = "32-true"  # Lightning precision: 32-true, bf16-mixed (CPU with AVX512-BF16, or GPU)
    accelerator: str = "auto"  # cpu, gpu, auto
    devices: int = 1  # devices per node (DDP when > 1)
    num_nodes: int = 1
    strategy: str = "auto"  # auto, ddp
    threads: int = 0  # torch CPU threads; 0 = leave torch's default

    def __post_init__(self):
        for key in ("batch_size", "max_steps", "val_every_steps", "devices", "num_nodes"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a positive number, got {self.lr}")
        require(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        require(self.patience >= 0 and self.warmup_steps >= 0 and self.threads >= 0, "patience/warmup_steps/threads",
                "must be >= 0")


class Diverged(RuntimeError):
    """The training or validation loss became NaN or infinite."""


class RunInProgress(RuntimeError):
    """Another process is training this run folder."""


LOCK = "train.lock"


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Hold RUN_DIR/train.lock while training; raise `RunInProgress` if another process holds it.

    Only the launching process locks (global rank 0): DDP ranks that Lightning, torchrun or
    srun start for the same run carry RANK/LOCAL_RANK/SLURM_PROCID and share its lock. The lock
    dies with its process, so a killed run never leaves a stale one.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no guard
        yield
        return
    if any(os.environ.get(key, "0") != "0" for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID")):
        yield
        return
    with open(run_dir / LOCK, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RunInProgress(f"{run_dir} is being trained by another process ({f.read().strip() or 'unknown'}); "
                                f"wait for it to finish or stop it, then run again") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lr_lambda(warmup_steps: int, max_steps: int):
    """Linear warm-up then cosine decay to 10% of the peak: the usual LM schedule."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


TASKS = {"chemgpt": "chemscale.lm", "ff": "chemscale.ff.task"}  # task name -> module with build()/validate()


def task_module(name, source: str = "<config>"):
    """The module of a task, imported on demand (the force-field stack takes seconds to import)."""
    import importlib

    if name not in TASKS:
        raise ConfigError(f"{source}: key 'task' = {name!r}; known tasks: {sorted(TASKS)}")
    return importlib.import_module(TASKS[name])


def parse_train_config(config: dict, source: str) -> TrainConfig:
    return from_dict(TrainConfig, config.get("train", {}), f"{source} [train]")


class MetricsLog:
    """metrics.csv writer: appends buffered rows; after a restart drops rows past the checkpoint."""

    def __init__(self, path: Path, columns: tuple[str, ...] = METRIC_COLUMNS):
        self.path, self.columns = path, columns
        self.rows: list[dict] = []

    def truncate_after(self, step: int) -> None:
        """Keep only rows with step <= `step` (the checkpoint's), rewritten atomically."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        from chemscale.config import atomic_write_text

        lines = [",".join(self.columns)] + [",".join(r.get(c) or "" for c in self.columns) for r in kept]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def add(self, **row) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        """Append buffered rows (one write and fsync for many steps)."""
        if not self.rows:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if new:
                writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _fmt(row.get(k)) for k in self.columns})
            f.flush()
            os.fsync(f.fileno())
        self.rows.clear()


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _callbacks(run_dir: Path, tcfg: TrainConfig, extra_columns: tuple[str, ...] = ()):
    """Lightning callbacks: metrics/checkpoint bookkeeping and early stopping."""
    import pytorch_lightning as pl

    class Bookkeeping(pl.Callback):
        """Buffers per-step losses, writes metrics and an atomic checkpoint at each validation."""

        def __init__(self):
            self.metrics = MetricsLog(run_dir / runs.METRICS, METRIC_COLUMNS + tuple(extra_columns))
            self.pending: list[tuple[int, int, torch.Tensor, float]] = []
            self.best_val = math.inf
            self.best_step = -1
            self.val_seconds = 0.0
            self._val_t0 = self.fit_t0 = self.fit_t1 = 0.0

        def state_dict(self):
            return {"best_val": self.best_val, "best_step": self.best_step}

        def load_state_dict(self, state):
            self.best_val, self.best_step = state["best_val"], state["best_step"]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            # Keep the loss as a tensor: no .item() (a device sync on GPU) on the hot path.
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            self.pending.append((trainer.global_step, trainer.current_epoch, module.last_loss, lr))

        def on_train_start(self, trainer, module):
            self.fit_t0 = time.perf_counter()  # after Lightning's setup: the rate measures training

        def on_train_end(self, trainer, module):
            self.fit_t1 = time.perf_counter()

        def on_validation_start(self, trainer, module):
            self._val_t0 = time.perf_counter()

        def _flush_train_rows(self) -> float | None:
            """Move buffered step losses to the log; returns the first non-finite loss, if any."""
            if not self.pending:
                return None
            losses = torch.stack([p[2] for p in self.pending]).float().cpu().tolist()
            for (step, epoch, _, lr), loss in zip(self.pending, losses):
                self.metrics.add(step=step, epoch=epoch, train_loss=loss, current_lr=lr)
            self.pending.clear()
            return next((loss for loss in losses if not math.isfinite(loss)), None)

        def on_validation_end(self, trainer, module):
            self.val_seconds += time.perf_counter() - self._val_t0
            if trainer.sanity_checking:
                return
            val = float(trainer.callback_metrics["val_loss"])
            bad_train = None
            if trainer.is_global_zero:
                bad_train = self._flush_train_rows()
                self.metrics.add(step=trainer.global_step, epoch=trainer.current_epoch, tokens=module.tokens_seen,
                             flops=module.flops_per_token * module.tokens_seen, val_loss=val, **module.extra_val)
                self.metrics.flush()
            # Every rank must agree to stop, or the others would wait forever in the next collective.
            bad = (bad_train is not None) or not math.isfinite(val)
            if trainer.strategy.reduce_boolean_decision(bad, all=False):
                what = f"training loss became {bad_train}" if bad_train is not None else f"validation loss became {val}"
                raise Diverged(f"{what} by step {trainer.global_step}")
            if val < self.best_val:
                self.best_val, self.best_step = val, trainer.global_step
                module.on_new_best(run_dir)
            tmp = run_dir / f".{runs.CHECKPOINT}.tmp"
            trainer.save_checkpoint(tmp)
            if trainer.is_global_zero:
                os.replace(tmp, run_dir / runs.CHECKPOINT)

    early = []
    if tcfg.patience:
        early = [pl.callbacks.EarlyStopping("val_loss", patience=tcfg.patience, mode="min",
                                            check_on_train_epoch_end=False, check_finite=False)]
    return Bookkeeping(), early


def train(run_dir: str | os.PathLike, progress: bool = False) -> dict:
    """Train the run in `run_dir` (resuming from last.ckpt if present); returns result.json's content."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    with exclusive(run_dir):
        return _train(run_dir, config, progress)


def _train(run_dir: Path, config: dict, progress: bool) -> dict:
    import pytorch_lightning as pl

    source = str(run_dir / runs.CONFIG)
    tcfg = parse_train_config(config, source)
    task = task_module(config.get("task"), source)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    pl.seed_everything(int(config.get("seed", 0)), workers=True, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    _quiet_lightning()

    book, early = _callbacks(run_dir, tcfg, getattr(task, "EXTRA_COLUMNS", ()))
    task = task.build(config, tcfg, run_dir, source)
    trainer = pl.Trainer(
        accelerator=tcfg.accelerator, devices=tcfg.devices, num_nodes=tcfg.num_nodes, strategy=tcfg.strategy,
        precision=tcfg.precision, max_steps=tcfg.max_steps, max_epochs=-1, val_check_interval=tcfg.val_every_steps,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, gradient_clip_val=tcfg.grad_clip or None,
        callbacks=[book, *early], logger=False, enable_checkpointing=False, enable_progress_bar=progress,
        enable_model_summary=False, default_root_dir=str(run_dir), deterministic=False,
        inference_mode=False,  # force fields differentiate the energy during validation too
    )
    from chemscale.precision import allow_fused_clipping

    allow_fused_clipping(trainer)  # mixed precision + grad clipping + ChemGPT's fused AdamW (issue 8)
    ckpt = run_dir / runs.CHECKPOINT
    resume = ckpt if ckpt.exists() else None
    if resume is not None and trainer.is_global_zero:
        step = torch.load(resume, map_location="cpu", weights_only=False)["global_step"]
        book.metrics.truncate_after(step)

    status, reason = "finished", None
    t0 = time.perf_counter()
    try:
        trainer.fit(task.module, task.train_loader, task.val_loader, ckpt_path=resume)
    except Diverged as e:
        status, reason = "diverged", str(e)
        if trainer.is_global_zero:
            book.metrics.flush()  # keep the rows up to the divergence: they show how it happened
    wall = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return {}
    # Seconds spent training (data loading, steps, logging, checkpoints), without setup and validation.
    train_seconds = (book.fit_t1 or time.perf_counter()) - (book.fit_t0 or t0) - book.val_seconds
    result = {
        "status": status, "reason": reason, "best_val_loss": book.best_val if math.isfinite(book.best_val) else None,
        "best_step": book.best_step, "steps": trainer.global_step, "wall_s": wall,
        "train_seconds": train_seconds, "stopped_early": bool(early and early[0].stopped_epoch),
        "resumed_from_step": None if resume is None else step, **task.summary(book, train_seconds),
    }
    if status == "finished":
        result.update(task.finish(run_dir))
    result["meta"] = runs.describe()
    result["train"] = asdict(tcfg)
    result["torch_threads"] = torch.get_num_threads()  # floating-point sums depend on it: part of "same machine"
    atomic_write_json(run_dir / runs.RESULT, result)
    return result


def _quiet_lightning() -> None:
    """Lightning's per-run banners (GPU available, TPU...) drown a sweep's output."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is a great choice for small models.*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chemscale.train", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run folder holding config.json")
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    args = parser.parse_args(argv)
    memory.keep_freed_memory()  # this process only trains: reuse activation buffers between steps
    try:
        result = train(args.run_dir, progress=args.progress)
    except (ConfigError, RunInProgress) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result:
        print(f"{args.run_dir}: {result['status']}, best val loss {result['best_val_loss']} at step {result['best_step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
