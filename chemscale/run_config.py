"""A run config: what `config.json` holds, every default written out, and the task it names.

A run config has top-level `task` (a key of `TASKS`), `seed`, `study`, `meta`, the `train`
section (`TrainConfig`, the same for every task) and the sections of its task
(`TaskKind.SECTIONS`). `complete_config` writes every default out: what a run's id hashes
(`chemscale.runs`) and what its config.json holds. The runner (`chemscale.train`), the sweeps
and the run folders all read a config through this module, so a key means one thing everywhere.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass

from chemscale.config import ConfigError, from_dict, require
from chemscale.task import TaskKind

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true")
SCHEDULES = ("cosine", "plateau")


@dataclass
class TrainConfig:
    """Optimisation and hardware settings shared by every task."""

    batch_size: int = 64  # molecules (or structures) per step and device
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.1
    warmup_steps: int = 50  # linear warm-up to lr over this many steps, then the schedule
    # cosine: decay to 10% of lr at max_steps, so over the run's own budget (the LM's usual schedule);
    # plateau: lr x plateau_factor after plateau_patience validations without improvement (torch's
    # ReduceLROnPlateau, what schnetpack and nequip train force fields with), never ending by itself.
    schedule: str = "cosine"
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    max_steps: int = 1000  # hard cap on optimizer steps (a sweep sets it per point: `sweep.budget`)
    val_every_steps: int = 100  # validate (and checkpoint) every this many steps
    patience: int = 5  # stop after this many validations without improvement; 0 = never
    # What counts as an improvement for early stopping: lowering the best validation loss by more than this
    # fraction (0.01: 1%). 0: any decrease, so a slow creep resets patience and the run ends at its cap.
    min_rel_improvement: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    precision: str = "32-true"  # Lightning precision: 32-true, bf16-mixed (CPU with AVX512-BF16, or GPU)
    accelerator: str = "auto"  # cpu, gpu, auto
    devices: int = 1  # devices per node (DDP when > 1)
    num_nodes: int = 1
    strategy: str = "auto"  # auto, ddp
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    # ChemGPT only: "" = eager, else a torch.compile backend ("inductor" on GPU servers) each transformer block is
    # compiled with. Left out of config.json (and so of the run id) when "", so runs from before it keep their ids.
    compile: str = ""

    def __post_init__(self):
        for key in ("batch_size", "max_steps", "val_every_steps", "devices", "num_nodes"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        require(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a positive number, got {self.lr}")
        require(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}, got {self.precision!r}")
        require(self.patience >= 0 and self.warmup_steps >= 0 and self.threads >= 0, "patience/warmup_steps/threads",
                "must be >= 0")
        require(0 <= self.min_rel_improvement < 1, "min_rel_improvement",
                f"must be in [0, 1), got {self.min_rel_improvement}")
        require(self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}, got {self.schedule!r}")
        require(0 < self.plateau_factor < 1, "plateau_factor", f"must be between 0 and 1, got {self.plateau_factor}")
        require(self.plateau_patience >= 0, "plateau_patience", f"must be >= 0, got {self.plateau_patience}")
        # Early stopping must outwait the plateau, or the run stops before the lower rate is tried.
        require(self.schedule != "plateau" or not self.patience or self.patience > self.plateau_patience + 1,
                "patience", f"= {self.patience} stops the run before ReduceLROnPlateau (plateau_patience = "
                f"{self.plateau_patience}) lowers the rate: use patience > plateau_patience + 1, or 0")
        if self.compile:  # torch._dynamo imports in ~1 s, so only when asked
            import torch._dynamo

            require(self.compile in torch._dynamo.list_backends(exclude_tags=()), "compile",
                    f"is not a torch.compile backend: {self.compile!r}; known: {torch._dynamo.list_backends()} "
                    "and debug ones such as 'aot_eager' (\"\" = no compiling)")


def _chemgpt() -> TaskKind:
    from chemscale.lm import task

    return task


def _ff() -> TaskKind:
    from chemscale.ff import task  # imports schnetpack, nequip and Lightning: seconds, so only when asked

    return task


TASKS = {"chemgpt": _chemgpt, "ff": _ff}  # a run config's "task" -> its module, imported when first used


def task_kind(name, source: str = "<config>") -> TaskKind:
    """The module of the task named in a run config; `ConfigError` naming the known ones otherwise."""
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(str(name), TASKS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: key 'task' = {name!r}{hint}; known tasks: {sorted(TASKS)}")
    return TASKS[name]()


def parse_train_config(config: dict, source: str) -> TrainConfig:
    return from_dict(TrainConfig, config.get("train", {}), f"{source} [train]")


def complete_config(config: dict, source: str = "<config>") -> dict:
    """`config` with every default written out: the `train` section and the task's sections, and `seed`.

    This is what a run's id hashes and what its config.json holds, so a default that changes in
    the code changes the id of the configs that relied on it. An int given for a float key is
    made a float (`lr: 1` and `lr: 1.0` are one run). Raises `ConfigError` naming key and source.
    """
    task = task_kind(config.get("task"), source)
    check_top_level(config, task, source)
    full = {k: v for k, v in config.items() if k != "meta"}
    full["seed"] = config.get("seed", 0)
    full["train"] = _plain(parse_train_config(config, source))
    if not full["train"]["compile"]:
        del full["train"]["compile"]  # off: written nowhere, so the ids of runs from before the switch stay
    for section, cls in task.SECTIONS.items():
        full[section] = _plain(from_dict(cls, config.get(section, {}), f"{source} [{section}]"))
    return full


TOP_LEVEL = ("study", "task", "seed", "meta", "train")  # top-level keys of every run config, besides task sections


def check_top_level(config: dict, task, source: str) -> None:
    """Refuse a top-level key no code reads (a typo like 'sead' would otherwise train with seed 0)."""
    import difflib

    known = (*TOP_LEVEL, *task.SECTIONS)
    unknown = sorted(set(config) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: unknown top-level key(s) {unknown}{hint}; known keys: {sorted(known)}")


def _plain(section) -> dict:
    """A config dataclass as JSON data, floats as floats."""
    hints = typing.get_type_hints(type(section))
    out = asdict(section)
    for key, value in out.items():
        if hints[key] is float and isinstance(value, int) and not isinstance(value, bool):
            out[key] = float(value)
    return out
