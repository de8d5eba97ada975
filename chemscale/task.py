"""The contract between the runner (`chemscale.train`) and a training task, and the base module that keeps it.

A task is a module, registered in `chemscale.run_config.TASKS`, that provides what `TaskKind`
declares: its config sections, extra metric columns, `build` and `validate`. `build` returns a `RunTask`: a
`TaskModule` (the LightningModule), the data loaders, and the end-of-run summary. The runner
owns everything around training (config checks, metrics.csv, checkpoints, divergence, results)
and reads only what these classes declare.

`TaskModule` owns what every task needs and used to repeat: counting samples across DDP ranks,
summing validation metrics across ranks, tracking the best model (best.pt), the checkpoint
state of those counters, and the optimiser schedule. A subclass supplies its model, its loss
(`step_loss`), its validation sums (`val_sums`, `val_metrics`) and, if not AdamW, its optimiser.

A *sample* is the unit a task counts: a token for ChemGPT (its loss is per token), a structure
for a force field. Each task's `summary` names them in result.json in its own words
(`tokens_seen`, `structures_seen`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterable, Protocol

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from chemscale.config import atomic_write_bytes

BEST = "best.pt"  # the best-validation weights of the model, in the run folder


def lr_lambda(warmup_steps: int, max_steps: int):
    """Linear warm-up then cosine decay to 10% of the peak: the usual LM schedule."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def throughput(samples: int, seconds: float) -> float | None:
    """Samples per second trained by this process; None when it trained nothing (a run resumed after its
    last step, killed before its result was written), never a 0.0 that reads as a measurement."""
    return samples / seconds if samples and seconds > 0 else None


def _ddp() -> bool:
    return dist.is_available() and dist.is_initialized()


class TaskModule(pl.LightningModule):
    """A LightningModule of one task: the base keeps the counters, the best model and the schedule.

    A subclass implements `step_loss(batch) -> (loss, samples)`, `val_sums(batch)` (a 1-D tensor of
    `VAL_SUMS` entries, the first two loss·count and count) and optionally `val_metrics(sums)`
    (extra metrics for `extra_val`) and `make_optimizer()`. It sets `flops_per_sample`.

    Counters are summed on the device and read only at validation (an `.item()` per step would
    stall a GPU), then summed over ranks: `samples_seen` is the run's, restored from checkpoints;
    `samples_this_process` counts the same (all ranks) since this process started, so a resumed
    run's rate is that of its last attempt.
    """

    VAL_GRAD = False  # True: validation computes gradients (force fields differentiate the energy)
    VAL_SUMS = 2  # length of `val_sums`: loss·count, count, then the task's own sums

    def __init__(self, model: torch.nn.Module, tcfg):  # tcfg: a run's `chemscale.run_config.TrainConfig`
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = tcfg.lr, tcfg.weight_decay
        self.warmup_steps, self.max_steps = tcfg.warmup_steps, tcfg.max_steps
        self.schedule, self.plateau_factor, self.plateau_patience = tcfg.schedule, tcfg.plateau_factor, tcfg.plateau_patience
        # What the plateau schedule counts as an improvement: early stopping's relative gain, so the rate is
        # lowered by the same measure that ends the run (torch's default 1e-4 where early stopping takes any gain).
        self.plateau_threshold = tcfg.min_rel_improvement or 1e-4
        self.plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self._plateau_state: dict | None = None
        self.flops_per_sample = 0.0
        self.samples_seen = self.samples_at_best = self.samples_this_process = 0
        self.last_loss = torch.zeros(())
        self.extra_val: dict = {}
        self.best_val_metrics: dict = {}
        self._samples = torch.zeros((), dtype=torch.long)
        self._val_sums = torch.zeros(self.VAL_SUMS, dtype=torch.float64)

    # What a task supplies.
    def step_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor | int]:
        """The training loss of a batch and how many samples it counts (an int, or a tensor left on the device)."""
        raise NotImplementedError

    def val_sums(self, batch) -> torch.Tensor:
        """Sums over a validation batch, float64, 1-D: [loss·count, count, ...task's own]."""
        raise NotImplementedError

    def val_metrics(self, sums: torch.Tensor) -> dict:
        """Extra validation metrics from the sums over every batch and rank (the task's EXTRA_COLUMNS)."""
        return {}

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # Lightning hooks, the same for every task.
    def training_step(self, batch, batch_idx):
        loss, samples = self.step_loss(batch)
        self._samples = self._samples.to(loss.device) + samples
        self.last_loss = loss.detach()
        return loss

    def on_validation_epoch_start(self):
        n = self._samples.clone()
        if _ddp():
            dist.all_reduce(n)
        self.samples_seen += int(n)
        self.samples_this_process += int(n)
        self._samples.zero_()
        self._val_sums = torch.zeros(self.VAL_SUMS, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        with torch.set_grad_enabled(self.VAL_GRAD):
            self._val_sums += self.val_sums(batch).detach().to(torch.float64)

    def on_validation_epoch_end(self):
        sums = self._val_sums
        if _ddp():
            dist.all_reduce(sums)
        self.extra_val = self.val_metrics(sums)
        val = sums[0] / sums[1]
        self.log("val_loss", val.float(), prog_bar=True)
        # Early stopping with a relative threshold watches the log: an absolute step in it is a relative one in the loss.
        self.log("val_log_loss", torch.log(val.clamp_min(1e-30)))

    def on_new_best(self, run_dir: Path) -> None:
        """A validation improved on every earlier one: remember its metrics, keep the weights in best.pt."""
        self.samples_at_best = self.samples_seen
        self.best_val_metrics = dict(self.extra_val)
        if self.trainer.is_global_zero:
            buf = io.BytesIO()
            torch.save(self.model.state_dict(), buf)
            atomic_write_bytes(Path(run_dir) / BEST, buf.getvalue())

    def on_save_checkpoint(self, checkpoint):
        checkpoint["chemscale"] = {"samples_seen": self.samples_seen, "samples_at_best": self.samples_at_best,
                                   "flops_per_sample": self.flops_per_sample,
                                   "best_val_metrics": self.best_val_metrics,
                                   "plateau": None if self.plateau is None else self.plateau.state_dict()}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("chemscale", {})
        # Checkpoints written before the counters were named samples said tokens_seen/tokens_at_best.
        self.samples_seen = state.get("samples_seen", state.get("tokens_seen", 0))
        self.samples_at_best = state.get("samples_at_best", state.get("tokens_at_best", 0))
        self.best_val_metrics = state.get("best_val_metrics", {})
        self._plateau_state = state.get("plateau")  # loaded into the scheduler once configure_optimizers made it
        if self.plateau is not None and self._plateau_state:
            self.plateau.load_state_dict(self._plateau_state)

    def configure_optimizers(self):
        """AdamW with the run's schedule (`TrainConfig.schedule`).

        cosine: one LambdaLR, warm-up then cosine decay over max_steps. plateau: LinearLR warms up
        (it is chainable: past its last step it leaves the rate alone) and torch's ReduceLROnPlateau
        lowers the rate. The plateau scheduler is stepped by `after_validation` with the validation
        loss reduced over ranks, right before the checkpoint that saves its state, rather than by
        Lightning, which steps a step-interval plateau scheduler by batch index within a loader epoch,
        out of phase with validations that come every val_every_steps optimizer steps.
        """
        opt = self.make_optimizer()
        if self.schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.warmup_steps, self.max_steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        # factor (k + 1) / warmup_steps at step k, reaching 1 at step warmup_steps - 1: the cosine schedule's warm-up
        warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / max(1, self.warmup_steps), end_factor=1.0,
                                                   total_iters=max(1, self.warmup_steps - 1))
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=self.plateau_factor,
                                                                  patience=self.plateau_patience,
                                                                  threshold=self.plateau_threshold, threshold_mode="rel")
        if self._plateau_state:
            self.plateau.load_state_dict(self._plateau_state)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def after_validation(self, val_loss: float) -> None:
        """Called by the runner after each validation (every rank, the same loss): steps the plateau schedule."""
        if self.plateau is not None and not self.trainer.sanity_checking:
            self.plateau.step(val_loss)


class RunTask(Protocol):
    """What a task's `build` returns for one run."""

    module: TaskModule
    train_loader: Iterable
    val_loader: Iterable

    def summary(self, best_val: float | None, train_seconds: float) -> dict:
        """result.json entries of the task: sizes, counts in its own words, rates over `train_seconds`."""

    def finish(self, run_dir: Path) -> dict:
        """result.json entries computed after a finished run (e.g. test-set errors of the best model)."""


class TaskKind(Protocol):
    """What a task module provides (`chemscale.lm.task`, `chemscale.ff.task`)."""

    SECTIONS: dict[str, type]  # run-config section -> dataclass that validates it
    EXTRA_COLUMNS: tuple[str, ...]  # metrics.csv columns beyond the runner's, filled from `extra_val`

    def build(self, config: dict, tcfg, run_dir: Path, source: str) -> RunTask: ...  # tcfg: TrainConfig

    def validate(self, config: dict, source: str, *, data: bool = False, progress: bool = False) -> None: ...
