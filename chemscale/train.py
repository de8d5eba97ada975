"""`python -m chemscale.train RUN_DIR`: train one run described by RUN_DIR/config.json.

One run is one process, so a crash, an out-of-memory or a library's global state cannot leak
into the notebook or the next run, and Lightning DDP works (it needs a script). The runner is
task-agnostic: a task module (`chemscale.lm.task` for ChemGPT, `chemscale.ff.task` for force
fields) builds the LightningModule and the data loaders, under the contract written in
`chemscale.task`; this module owns everything around them:

- `config.json`: checked before anything runs: its values, and that it hashes to the folder's
  name (the run id), so an edited setting is refused instead of trained under the old name;
- `metrics.csv`: the training loss and learning rate of every step (buffered in memory and
  appended at each validation, because per-step file writes cost ~20% of a small model's step)
  and every validation; after a restart, rows past the checkpoint (all rows, when there is no
  checkpoint) are dropped so nothing is counted twice, and a file that lost rows before the
  checkpoint is refused;
- `last.ckpt`: written atomically at each validation, with the random generators' states and its
  sha256 in `last.ckpt.sha256` (checked on resume: a changed byte is refused, not trained on); a
  restarted run resumes from it and, its data order a function of (seed, epoch) resumed at the
  checkpoint's batch (the tasks' loaders: `chemscale.lm.loader.ResumableSampler`, the force-field
  loader), repeats the uninterrupted run's losses exactly;
- divergence: a NaN/inf training loss is caught at the step it happens (`LossWatch`), a NaN/inf
  validation loss at its validation; the run stops and `result.json` records why, so a sweep goes on;
- `result.json`: written atomically last; its presence means "finished", and a finished run is
  left alone unless asked to retrain (`--retrain` moves its outputs to `previous/<time>/`);
  `stop_reason` says what ended it: "early_stopped", "max_steps" or "diverged", and `convergence` what
  that makes its loss: "converged", "capped" (the step budget's loss, not the model's) or "diverged";
  `energy_kj` what the run's GPUs used, where NVML reads it (`chemscale.energy`; null and why elsewhere);
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
from dataclasses import asdict
from pathlib import Path

import torch

from chemscale import energy, memory, runs
from chemscale.config import ConfigError, atomic_write_json
from chemscale.run_config import TrainConfig, complete_config, parse_train_config, task_kind

METRIC_COLUMNS = ("step", "epoch", "samples", "flops", "train_loss", "val_loss", "current_lr")


class Diverged(RuntimeError):
    """The training or validation loss became NaN or infinite."""


class DamagedRun(RuntimeError):
    """A file of a run folder cannot be trusted to resume from; the message names it and --retrain."""


class BadMetrics(DamagedRun):
    """metrics.csv does not hold the rows up to the checkpoint."""


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
    if not _is_launcher():
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


def held_elsewhere(run_dir: Path) -> bool:
    """Whether a process holds RUN_DIR/train.lock now, i.e. trains the run (False without flock)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        f = open(Path(run_dir) / LOCK)
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


class MetricsLog:
    """metrics.csv writer: appends buffered rows; after a restart drops rows past the checkpoint."""

    def __init__(self, path: Path, columns: tuple[str, ...] = METRIC_COLUMNS):
        self.path, self.columns = path, columns
        self.rows: list[dict] = []

    def truncate_after(self, step: int) -> int:
        """Keep only rows with step <= `step` (the checkpoint's; 0 for a start from scratch), rewritten
        atomically; returns how many rows were dropped.

        From scratch every earlier row goes, whatever the file holds. From a checkpoint the file
        must hold each training step up to it once (the checkpoint is written after they are
        flushed), and only its last row may be cut short (a crash mid-append); anything else (a
        lost header, missing rows, bytes that are not text) raises `BadMetrics` instead of
        resuming a run whose curve would silently lack its start.
        """
        from chemscale.config import atomic_write_text

        if step == 0:
            dropped = self.path.exists()
            atomic_write_text(self.path, ",".join(self.columns) + "\n")
            return int(dropped)
        rows = self._read()
        kept = [r for r in rows if int(r["step"]) <= step]
        trained = [int(r["step"]) for r in kept if r["train_loss"]]
        if trained != list(range(1, step + 1)):
            missing = sorted(set(range(1, step + 1)) - set(trained))
            what = f"steps {missing[0]}-{missing[-1]}" if missing else "a step twice"
            raise self._damaged(f"lacks the training loss of {len(missing) or 'some'} of the steps up to the "
                                f"checkpoint's step {step} ({what})")
        lines = [",".join(self.columns)] + [",".join(r.get(c) or "" for c in self.columns) for r in kept]
        atomic_write_text(self.path, "\n".join(lines) + "\n")
        return len(rows) - len(kept)

    def _read(self) -> list[dict]:
        """Every complete row; a missing file, another header or an incomplete row before the last raise."""
        try:
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                header, rows = tuple(reader.fieldnames or ()), list(reader)
        except FileNotFoundError:
            raise self._damaged("is missing, but last.ckpt is there") from None
        except (UnicodeDecodeError, csv.Error) as e:
            raise self._damaged(f"is not a metrics file ({type(e).__name__}: {e})") from None
        renamed = tuple(runs.METRICS_RENAMED.get(c, c) for c in header)
        if header != self.columns and renamed != self.columns:
            raise self._damaged(f"starts with the header {','.join(header) or '(none)'}, not "
                                f"{','.join(self.columns)}")
        if renamed != header:  # an older run's file: its rows under today's names (rewritten on resume)
            rows = [{runs.METRICS_RENAMED.get(k, k): v for k, v in r.items()} for r in rows]
        bad = [i for i, r in enumerate(rows) if not _complete_row(r, self.columns)]
        if bad and bad[0] < len(rows) - 1:
            raise self._damaged(f"row {bad[0] + 2} is incomplete")
        return [r for r in rows if _complete_row(r, self.columns)]

    def _damaged(self, what: str) -> "BadMetrics":
        run_dir = self.path.parent
        return BadMetrics(f"{self.path}: {what}; the run cannot resume with its curve intact. To train it again "
                          f"from step 0, moving earlier outputs aside: python -m chemscale.train {run_dir} --retrain")

    def add(self, **row) -> None:
        self.rows.append(row)

    def flush(self) -> None:
        """Append buffered rows (one write and fsync for many steps)."""
        if not self.rows:
            return
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, lineterminator="\n")
            if new:
                writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _fmt(row.get(k)) for k in self.columns})
            f.flush()
            os.fsync(f.fileno())
        self.rows.clear()


def _complete_row(row: dict, columns: tuple[str, ...]) -> bool:
    """A csv row with every column and an integer step (DictReader fills a short row with None)."""
    return None not in row and all(row.get(c) is not None for c in columns) and row["step"].isdigit()


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.9g}"  # float32 losses round-trip exactly: a resumed run can be compared bit for bit
    return str(v)


class LossWatch:
    """Whether a training loss so far was NaN or infinite, asked at every step without stalling a GPU.

    On CPU the loss is read at once: a CPU tensor is computed by the time the step returns, so
    reading it waits for nothing (a few microseconds). On a GPU, reading every step would make
    the host wait for the step's kernels, and the GPU would idle while the host queues the next
    step; there (`deferred`) each step folds the loss into a device-side flag (`flag |=
    ~isfinite(loss)`: tiny kernels, no transfer), copies it asynchronously to pinned host memory
    and reads the copy made one step earlier (its event is waited on: done in practice, since the
    host runs at most about a step ahead), so a divergence is seen one step late, not at the next
    validation. Under DDP the flag is summed over processes first, so every process stops at the
    same step. `deferred=True` runs the GPU bookkeeping on CPU tensors (tests, any machine).
    """

    def __init__(self, deferred: bool | None = None):
        self.deferred = deferred  # None: deferred on CUDA, immediate elsewhere
        self.flag: torch.Tensor | None = None
        self.copies: list[tuple[torch.Tensor, object]] = []  # (host copy, CUDA event or None), oldest first

    def update(self, loss: torch.Tensor) -> bool:
        loss = loss.detach()
        ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
        deferred = loss.device.type == "cuda" if self.deferred is None else self.deferred
        if not (deferred or ddp):
            return not math.isfinite(float(loss))
        bad = ~torch.isfinite(loss)
        self.flag = bad if self.flag is None else self.flag | bad
        flag = self.flag.to(torch.int32)
        if ddp:
            torch.distributed.all_reduce(flag)
        if not deferred:
            return bool(flag)
        cuda = flag.device.type == "cuda"
        host = self.copies.pop(0)[0] if len(self.copies) == 2 else torch.empty((), dtype=torch.int32, pin_memory=cuda)
        host.copy_(flag, non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        self.copies.append((host, event))
        if len(self.copies) < 2:
            return False
        previous, done = self.copies[0]
        if done is not None:
            done.synchronize()
        return bool(previous)


def _rng_state() -> dict:
    """The global random generators (dropout draws from torch's), as plain data for the checkpoint."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _callbacks(run_dir: Path, tcfg: TrainConfig, extra_columns: tuple[str, ...] = ()):
    """Lightning callbacks: metrics/checkpoint bookkeeping and early stopping."""
    import pytorch_lightning as pl

    class Bookkeeping(pl.Callback):
        """Per-step losses (checked for NaN/inf each step), metrics and an atomic checkpoint at each validation.

        The checkpoint also holds the global random generators' states, so a resumed run draws
        what the uninterrupted one would have (dropout), step for step.
        """

        def __init__(self):
            self.metrics = MetricsLog(run_dir / runs.METRICS, METRIC_COLUMNS + tuple(extra_columns))
            self.pending: list[tuple[int, int, torch.Tensor, float]] = []
            self.watch = LossWatch()
            self.best_val = math.inf
            self.best_step = -1
            self.val_seconds = 0.0
            self.earlier_seconds = 0.0
            self.energy = energy.RunEnergy()
            self.energy_result = self.energy.last
            self._lr = 0.0
            self._val_t0 = self.fit_t0 = self.fit_t1 = 0.0

        def segment_seconds(self) -> float:
            """Seconds this process has trained (data, steps, logging, checkpoints), without validations."""
            return (self.fit_t1 or time.perf_counter()) - self.fit_t0 - self.val_seconds if self.fit_t0 else 0.0

        def state_dict(self):
            return {"best_val": self.best_val, "best_step": self.best_step, "rng": _rng_state(),
                    "train_seconds": self.earlier_seconds + self.segment_seconds(),
                    "energy": self.energy.state_dict()}

        def load_state_dict(self, state):
            self.best_val, self.best_step = state["best_val"], state["best_step"]
            self.earlier_seconds = state.get("train_seconds", 0.0)  # of the attempts before this resume
            self.energy.load_state_dict(state.get("energy"))
            if "rng" in state:
                _set_rng_state(state["rng"])

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            # The rate this step applies: the scheduler moves it on before on_train_batch_end.
            self._lr = trainer.optimizers[0].param_groups[0]["lr"]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            # Keep the loss as a tensor: no .item() (a device sync on GPU) on the hot path.
            self.pending.append((trainer.global_step, trainer.current_epoch, module.last_loss, self._lr))
            if self.watch.update(module.last_loss):
                first = self._flush_train_rows(trainer)
                where = (f"became {first[1]} at step {first[0]}" if first
                         else "became NaN or infinite on another process")
                raise Diverged(f"training loss {where}")

        def on_train_start(self, trainer, module):
            self.fit_t0 = time.perf_counter()  # after Lightning's setup: the rate measures training
            self.energy.start(trainer.strategy.root_device)

        def on_train_end(self, trainer, module):
            self.fit_t1 = time.perf_counter()
            self.energy_result = self.energy.total(self._sum(trainer))

        def on_exception(self, trainer, module, exception):
            if isinstance(exception, Diverged):  # every process raises it at the same step: the sum can be taken
                self.energy_result = self.energy.total(self._sum(trainer))

        @staticmethod
        def _sum(trainer):
            """A tensor summed over the run's processes (on each one's device, as NCCL needs), back on CPU."""
            device = trainer.strategy.root_device
            return lambda t: trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu()

        def on_validation_start(self, trainer, module):
            self._val_t0 = time.perf_counter()

        def _flush_train_rows(self, trainer) -> tuple[int, float] | None:
            """Move buffered step losses to the log (rank 0); returns the first non-finite (step, loss).

            Each logged loss is the mean over ranks of their batch losses: the loss whose gradient DDP
            applies (it averages the ranks' gradients), not rank 0's share alone. One collective for all
            the steps since the last flush, which every rank makes at the same step (a validation, or a
            divergence that `LossWatch` reports on every rank at once), with as many losses buffered.
            """
            pending, self.pending = self.pending, []
            if not pending:
                return None
            losses = trainer.strategy.reduce(torch.stack([p[2] for p in pending]).float(), reduce_op="mean")
            if not trainer.is_global_zero:
                return None
            losses = losses.cpu().tolist()
            for (step, epoch, _, lr), loss in zip(pending, losses):
                self.metrics.add(step=step, epoch=epoch, train_loss=loss, current_lr=lr)
            return next(((p[0], loss) for p, loss in zip(pending, losses) if not math.isfinite(loss)), None)

        def on_validation_end(self, trainer, module):
            self.val_seconds += time.perf_counter() - self._val_t0
            if trainer.sanity_checking:
                return
            val = float(trainer.callback_metrics["val_loss"])
            bad_train = self._flush_train_rows(trainer)
            if trainer.is_global_zero:
                self.metrics.add(step=trainer.global_step, epoch=trainer.current_epoch, samples=module.samples_seen,
                                 flops=module.flops_per_sample * module.samples_seen, val_loss=val, **module.extra_val)
                self.metrics.flush()
            # Every rank must agree to stop, or the others would wait forever in the next collective.
            bad = (bad_train is not None) or not math.isfinite(val)
            if trainer.strategy.reduce_boolean_decision(bad, all=False):
                what = (f"training loss became {bad_train[1]} at step {bad_train[0]}" if bad_train is not None
                        else f"validation loss became {val} at step {trainer.global_step}")
                raise Diverged(what)
            if val < self.best_val:
                self.best_val, self.best_step = val, trainer.global_step
                module.on_new_best(run_dir)
            module.after_validation(val)  # the plateau schedule's step, saved by the checkpoint below
            self.energy.total(self._sum(trainer))  # the figure the checkpoint below holds for a resume
            tmp = run_dir / f".{runs.CHECKPOINT}.tmp"
            trainer.save_checkpoint(tmp)
            if trainer.is_global_zero:
                _commit_checkpoint(tmp, run_dir)

    early = []
    if tcfg.patience:
        rel = tcfg.min_rel_improvement  # a new best must be below best·(1 - rel): log(best) - log(new) > -log(1 - rel)
        monitor, delta = ("val_log_loss", -math.log1p(-rel)) if rel else ("val_loss", 0.0)
        early = [pl.callbacks.EarlyStopping(monitor, min_delta=delta, patience=tcfg.patience, mode="min",
                                            check_on_train_epoch_end=False, check_finite=False)]
    return Bookkeeping(), early


class BadCheckpoint(DamagedRun):
    """last.ckpt exists but cannot be read."""


PREVIOUS = "previous"  # RUN_DIR/previous/<time>/: what a retrained run had before
_KEPT = (runs.CONFIG, LOCK, "train.log", PREVIOUS)  # what retraining leaves in place


def train(run_dir: str | os.PathLike, progress: bool = False, retrain: bool = False) -> dict:
    """Train the run in `run_dir` (resuming from last.ckpt if present); returns result.json's content.

    A finished run (result.json present) is left alone and its result returned, unless `retrain`:
    then its earlier outputs move to RUN_DIR/previous/<UTC time>/ and it trains again from step 0.
    config.json is checked first: its values, and that it hashes to the folder's name.
    """
    return train_or_leave(run_dir, progress, retrain)[0]


def train_or_leave(run_dir: str | os.PathLike, progress: bool = False, retrain: bool = False) -> tuple[dict, bool]:
    """`train`, and whether the run was found finished and left alone (decided under the lock)."""
    run_dir = Path(run_dir)
    config = runs.read_config(run_dir)
    complete_config(config, str(run_dir / runs.CONFIG))  # a bad key or value, named, before anything else
    runs.check_folder(run_dir, config)
    with exclusive(run_dir):
        if retrain and _is_launcher():
            moved = _move_outputs(run_dir)
            if moved:
                print(f"{run_dir}: earlier outputs moved to {moved}", file=sys.stderr)
        elif not retrain and runs.is_finished(run_dir):
            return runs.read_result(run_dir), True
        return _train(run_dir, config, progress, fresh=retrain), False


def _is_launcher() -> bool:
    """Global rank 0, or not under DDP: the process that owns the run folder's files."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _move_outputs(run_dir: Path) -> Path | None:
    """Move everything but config.json, the lock and the log to RUN_DIR/previous/<UTC time>/."""
    outputs = [p for p in run_dir.iterdir() if p.name not in _KEPT]
    if not outputs:
        return None
    dest = run_dir / PREVIOUS / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.mkdir(parents=True)
    for p in outputs:
        os.replace(p, dest / p.name)
    return dest


CHECKSUM = "last.ckpt.sha256"  # {"sha256": of last.ckpt, "previous": of the one before}


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _commit_checkpoint(tmp: Path, run_dir: Path) -> None:
    """Move a new checkpoint to last.ckpt with its sha256 in last.ckpt.sha256, each written atomically.

    The checksum file is written first and names the previous checkpoint's sum too, so a crash
    between the two writes leaves a pair that verifies; a byte changed later (a disk, a copy)
    does not, and a resume would otherwise train on from corrupted optimizer state.
    """
    sums = run_dir / CHECKSUM
    previous = _read_checksums(sums)[:1]
    atomic_write_json(sums, {"sha256": _sha256(tmp), "previous": previous[0] if previous else None})
    os.replace(tmp, run_dir / runs.CHECKPOINT)


def _read_checksums(path: Path) -> list[str]:
    """The sums a checkpoint may have (current, previous); [] for a missing or unreadable file."""
    import json

    try:
        data = json.loads(path.read_text())
        return [v for v in (data.get("sha256"), data.get("previous")) if isinstance(v, str)]
    except (OSError, ValueError, AttributeError):
        return []


def _way_out(run_dir: Path) -> str:
    return (f"To train the run again from step 0, moving earlier outputs aside: "
            f"python -m chemscale.train {run_dir} --retrain")


def _checkpoint_step(ckpt: Path, run_dir: Path) -> int:
    """The optimizer step a checkpoint was saved at, after checking its sha256; a damaged file is named
    with the way out."""
    sums = _read_checksums(run_dir / CHECKSUM)
    if not sums:
        raise BadCheckpoint(f"{ckpt}: its checksum file {run_dir / CHECKSUM} is missing or unreadable, so the "
                            f"checkpoint cannot be trusted. {_way_out(run_dir)}")
    if _sha256(ckpt) not in sums:
        raise BadCheckpoint(f"{ckpt}: its sha256 differs from the one recorded in {run_dir / CHECKSUM} when it was "
                            f"written; the file is damaged (a disk error, an interrupted copy?). {_way_out(run_dir)}")
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception as e:  # not a checkpoint: torch raises OSError, RuntimeError, EOFError...
        raise BadCheckpoint(f"{ckpt}: cannot read this checkpoint ({type(e).__name__}: {e}). "
                            f"{_way_out(run_dir)}") from None


def _train(run_dir: Path, config: dict, progress: bool, fresh: bool = False) -> dict:
    import pytorch_lightning as pl

    source = str(run_dir / runs.CONFIG)
    tcfg = parse_train_config(config, source)
    task = task_kind(config.get("task"), source)
    ckpt = run_dir / runs.CHECKPOINT
    resume = ckpt if ckpt.exists() and not fresh else None
    step = _checkpoint_step(resume, run_dir) if resume is not None else 0
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    pl.seed_everything(int(config.get("seed", 0)), workers=True, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    _quiet_lightning()

    book, early = _callbacks(run_dir, tcfg, task.EXTRA_COLUMNS)
    if _is_launcher():
        # From a checkpoint: drop the rows logged after it (and refuse a file that lost rows before it).
        # From scratch: drop every row of an earlier attempt (a deleted last.ckpt), else counted twice.
        book.metrics.truncate_after(step)
    task = task.build(config, tcfg, run_dir, source)
    trainer = pl.Trainer(
        accelerator=tcfg.accelerator, devices=tcfg.devices, num_nodes=tcfg.num_nodes, strategy=tcfg.strategy,
        precision=tcfg.precision, max_steps=tcfg.max_steps, max_epochs=-1, val_check_interval=tcfg.val_every_steps,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, gradient_clip_val=tcfg.grad_clip or None,
        # Early stopping first: the checkpoint that the bookkeeping saves holds this validation's count.
        callbacks=[*early, book], logger=False, enable_checkpointing=False, enable_progress_bar=progress,
        enable_model_summary=False, default_root_dir=str(run_dir), deterministic=False,
        inference_mode=False,  # force fields differentiate the energy during validation too
        use_distributed_sampler=False,  # tasks shard their own batches (ResumableSampler, the force-field loader)
    )
    from chemscale.precision import allow_fused_clipping

    allow_fused_clipping(trainer)  # mixed precision + grad clipping + ChemGPT's fused AdamW (issue 8)

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
    # Seconds spent training (data loading, steps, logging, checkpoints), without setup and validation:
    # this process's for its rates, and with the attempts before a resume for the run's total.
    segment = book.segment_seconds()
    train_seconds = book.earlier_seconds + segment
    stop_reason = _stop_reason(status, early)
    best_val = book.best_val if math.isfinite(book.best_val) else None
    result = {
        "status": status, "reason": reason, "best_val_loss": best_val,
        "best_step": book.best_step, "steps": trainer.global_step, "wall_s": wall,
        "train_seconds": train_seconds, "stop_reason": stop_reason, "stopped_early": stop_reason == "early_stopped",
        "convergence": CONVERGENCE[stop_reason], "resumed_from_step": None if resume is None else step,
        **task.summary(best_val, segment), **energy.entries(*book.energy_result),
    }
    if status == "finished":
        result.update(task.finish(run_dir))
    result["meta"] = runs.describe()
    result["train"] = asdict(tcfg)
    result["torch_threads"] = torch.get_num_threads()  # floating-point sums depend on it: part of "same machine"
    atomic_write_json(run_dir / runs.RESULT, result)
    return result


# What a stop_reason makes a run's loss: only an early-stopped run's is the model's; a capped one's is its budget's.
CONVERGENCE = {"early_stopped": "converged", "max_steps": "capped", "diverged": "diverged"}


def _stop_reason(status: str, early: list) -> str:
    """What ended the run: "diverged", "early_stopped" (patience ran out) or "max_steps".

    Read from the EarlyStopping callback's own count of validations without improvement, so a
    stop within the first pass over the data (epoch 0, where large-data runs stop) counts. Patience
    that runs out at the validation of step max_steps counts too: the run met the stopping rule there,
    and the same run with a larger cap would have stopped at that step with the same loss.
    """
    if status == "diverged":
        return "diverged"
    if early and early[0].wait_count >= early[0].patience:
        return "early_stopped"
    return "max_steps"


def _quiet_lightning() -> None:
    """Lightning's per-run banners (GPU available, TPU...) drown a sweep's output."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*is a great choice for small models.*")
    # Our loaders resume mid-epoch by themselves (ResumableSampler), without Lightning's state_dict interface.
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")


def die_with_parent() -> None:
    """Under a sweep (its pid in $CHEMSCALE_SWEEP_PARENT), end this process when the sweep dies.

    A sweep killed with SIGKILL cannot stop its children, and a child left training holds
    train.lock for hours. Linux's PR_SET_PDEATHSIG has the kernel send SIGTERM when the parent
    goes; if it went before the call, exit now. The variable is removed so that processes this
    one starts (DDP ranks) do not take the sweep for their parent. No-op off Linux.
    """
    parent = os.environ.pop("CHEMSCALE_SWEEP_PARENT", None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != int(parent):
        sys.exit("chemscale.train: the sweep that started this run is gone; not training")


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m chemscale.train", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run folder holding config.json")
    parser.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    parser.add_argument("--retrain", action="store_true",
                        help="train the run again from step 0, even if it finished; its earlier outputs are moved "
                             f"to RUN_DIR/{PREVIOUS}/<time>/")
    args = parser.parse_args(argv)
    memory.keep_freed_memory()  # this process only trains: reuse activation buffers between steps
    try:
        result, left_alone = train_or_leave(args.run_dir, progress=args.progress, retrain=args.retrain)
    except (ConfigError, RunInProgress, DamagedRun) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if left_alone:
        print(f"{args.run_dir}: already finished ({_outcome(result)}); left alone. "
              f"To train it again from step 0: python -m chemscale.train {args.run_dir} --retrain")
    elif result:
        print(f"{args.run_dir}: {_outcome(result)}")
    return 0


def _outcome(result: dict) -> str:
    """'finished, best val loss 1.23 at step 400' or 'diverged: training loss became nan at step 7; no validation'."""
    status = str(result.get("status"))
    if result.get("reason"):
        status += f": {result['reason']}"
    if result.get("best_val_loss") is None:
        return f"{status}; no validation before it stopped"
    return f"{status}, best val loss {result['best_val_loss']} at step {result.get('best_step')}"


if __name__ == "__main__":
    sys.exit(main())
