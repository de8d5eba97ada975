"""The force-field training task: structures -> GNN -> energy+force loss.

`chemscale.train` calls `build(config, ...)` for runs with `"task": "ff"`. A run config has
`model` (`FFModelConfig`), `data` (`FFDataConfig`) and `train` (`chemscale.run_config.TrainConfig`).
The loss is the weighted MSE of energies (eV per structure, reference energies subtracted)
and force components (eV/Å); validations also report `energy_mae_mev` and
`force_mae_mev_per_a`, and at the end the best model is evaluated on the test split.
Compute is measured: the FLOPs of one training step (torch's FlopCounterMode) per structure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from chemscale.config import ConfigError, from_dict, require
from chemscale.ff import data as ffdata
from chemscale.ff import models
from chemscale.ff.card import write_model_card
from chemscale.ff.forcefield import ForceField, P
from chemscale.ff.loader import ff_loader
from chemscale.task import BEST, TaskModule, throughput

EXTRA_COLUMNS = ("energy_mae_mev", "force_mae_mev_per_a")


@dataclass
class FFModelConfig:
    """Which network, and its size."""

    name: str = "schnet"  # a key of `chemscale.ff.models.REGISTRY` (its table: chemscale.ff.models's docstring)
    width: int = 64  # features per atom (see chemscale.ff.models for each model's meaning)
    depth: int = 3  # interaction layers
    cutoff: float = 5.0  # neighbour cutoff, Å
    n_rbf: int = 20  # radial basis functions

    options: dict = field(default_factory=dict)  # the model's own options (its registry row's), e.g. {"l_max": 2}

    def __post_init__(self):  # the checks `models.build` makes, before anything is built
        models.check(self.name, width=self.width, depth=self.depth, cutoff=self.cutoff, n_rbf=self.n_rbf,
                     options=self.options)


@dataclass
class FFDataConfig:
    """Which structures a run trains, validates and tests on."""

    source: str = "md:ethanol"  # a recipe name (md:ethanol, conformers:moses) or a data file path
    recipe: dict = field(default_factory=dict)  # recipe fields to override, e.g. {"n_train": 5000} frames generated
    n_train_structures: int = 1000  # training structures (nested subsets of a fixed permutation)
    n_val_structures: int = 0  # validation structures; 0 = the whole validation split
    energy_weight: float = 0.01  # loss = energy_weight·MSE(E) + (1 - energy_weight)·MSE(F)
    # Names before issue 9: n_train meant frames generated inside `recipe` and the training subset here.
    RENAMED: ClassVar[dict] = {"n_train": "n_train_structures", "n_val": "n_val_structures"}

    def __post_init__(self):
        require(self.n_train_structures > 0, "n_train_structures", "must be > 0")
        require(self.n_val_structures >= 0, "n_val_structures", "must be >= 0 (0: the whole validation split)")
        require(0 <= self.energy_weight <= 1, "energy_weight", "must be in [0, 1]")


class FFModule(TaskModule):
    """Energy+force regression with a `chemscale.ff.forcefield.ForceField`; a sample is a structure."""

    VAL_GRAD = True  # forces are energy gradients
    VAL_SUMS = 5  # loss·n, n, |dE|, |dF|, force components

    def __init__(self, model: ForceField, tcfg, energy_weight: float):
        super().__init__(model, tcfg)
        self.energy_weight = energy_weight

    def loss_terms(self, batch):
        out = self.model(batch)
        de = out[P.energy] - batch[P.energy]
        df = out[P.forces] - batch[P.forces]
        loss = self.energy_weight * de.pow(2).mean() + (1 - self.energy_weight) * df.pow(2).mean()
        return loss, de, df

    def step_loss(self, batch):
        loss, _, _ = self.loss_terms(batch)
        return loss, batch[P.n_atoms].numel()

    def on_train_epoch_start(self):
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.current_epoch)

    def val_sums(self, batch) -> torch.Tensor:
        loss, de, df = self.loss_terms(batch)
        n = de.numel()
        return torch.stack([loss.double() * n, torch.tensor(n, dtype=torch.float64, device=de.device),
                            de.abs().sum().double(), df.abs().sum().double(),
                            torch.tensor(df.numel(), dtype=torch.float64, device=de.device)])

    def val_metrics(self, sums) -> dict:
        return {"energy_mae_mev": float(1000 * sums[2] / sums[1]), "force_mae_mev_per_a": float(1000 * sums[3] / sums[4])}

    def measure_flops(self, batch) -> None:
        """FLOPs of one training step (forward, forces, backward) per structure, counted by torch."""
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _, _ = self.loss_terms(batch)
            loss.backward()
        self.model.zero_grad(set_to_none=True)
        self.flops_per_sample = counter.get_total_flops() / batch[P.n_atoms].numel()


class _Ranked:
    """The training batches of this DDP rank, built on first use (the rank is known only then).

    With `steps_done` (the optimizer steps taken, restored on resume), each pass starts at the
    epoch and batch where training stands, so a run resumed mid-epoch sees the batches the
    uninterrupted run would have (the order is a function of (seed, epoch)).
    """

    def __init__(self, dataset, steps_done=None, **kwargs):
        self.dataset, self.kwargs, self._loader, self.steps_done = dataset, kwargs, None, steps_done

    def _get(self):
        if self._loader is None:
            ddp = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
            self._loader = ff_loader(self.dataset, rank=rank, world_size=world, **self.kwargs)
        return self._loader

    def __iter__(self):
        import itertools

        loader = self._get()
        if self.steps_done is None:
            return iter(loader)
        epoch, done = divmod(int(self.steps_done()), max(1, len(loader)))
        loader.set_epoch(epoch)
        return itertools.islice(iter(loader), done, None)

    def __len__(self):
        return len(self._get())

    def set_epoch(self, epoch: int) -> None:
        self._get().set_epoch(epoch)


SECTIONS = {"model": FFModelConfig, "data": FFDataConfig}  # config sections this task reads


@dataclass
class Task:
    """One force-field run, as the runner sees it (`chemscale.task.RunTask`)."""

    module: FFModule
    train_loader: _Ranked
    val_loader: _Ranked
    test_set: ffdata.FFDataset
    cutoff: float
    n_train_structures: int  # trained on (a fit's x); the config's number is the asked one
    n_train_structures_asked: int

    def summary(self, best_val: float | None, train_seconds: float) -> dict:
        m = self.module
        return {"n_params": m.model.n_params(), "n_train_structures": self.n_train_structures,
                "n_train_structures_asked": self.n_train_structures_asked,
                "flops_per_structure": m.flops_per_sample, "structures_seen": m.samples_seen,
                "flops_at_best": m.flops_per_sample * m.samples_at_best,
                "flops_total": m.flops_per_sample * m.samples_seen,
                "train_structures_per_s": throughput(m.samples_this_process, train_seconds),
                **{f"val_{k}": v for k, v in m.best_val_metrics.items()}}

    def finish(self, run_dir: Path) -> dict:
        """Energy and force MAE of the best model on the test split.

        Also writes what rebuilds the best model outside chemscale's training (`best_model.json`
        beside `best.pt`: the network's build arguments and the per-element reference energies
        that the data side subtracted), which `chemscale.ff.calculator` reads.
        """
        model = self.module.model
        if (run_dir / BEST).exists():
            model.load_state_dict(torch.load(run_dir / BEST, map_location="cpu", weights_only=True))
            write_model_card(run_dir, model.build_args, self.test_set.reference_energies)
        model.eval().cpu()
        abs_e = abs_f = n_e = n_f = 0.0
        for batch in ff_loader(self.test_set, batch_size=64, cutoff=self.cutoff):
            out = model(batch)
            abs_e += float((out[P.energy].detach() - batch[P.energy]).abs().sum())
            abs_f += float((out[P.forces].detach() - batch[P.forces]).abs().sum())
            n_e, n_f = n_e + batch[P.energy].numel(), n_f + batch[P.forces].numel()
        return {"test_energy_mae_mev": 1000 * abs_e / max(n_e, 1), "test_force_mae_mev_per_a": 1000 * abs_f / max(n_f, 1),
                "n_test_structures": len(self.test_set)}


def _refuse_compile(config: dict, source: str) -> None:
    """train.compile is ChemGPT's: a force-field run that asks for it is refused, not trained eagerly in silence."""
    if config.get("train", {}).get("compile"):
        raise ConfigError(f"{source} [train]: key 'compile' is for ChemGPT runs only; force-field runs train eagerly")


def validate(config: dict, source: str, *, data: bool = False, progress: bool = False) -> None:
    """Check the `model` and `data` sections of a force-field run config.

    With `data`, also check that the dataset's train and val splits hold `n_train_structures` and
    `n_val_structures`, so a sweep is refused before it starts rather than each run failing as it
    starts. A sweep checks once per dataset, with its largest sizes. A recipe whose planned
    splits are too small is refused without generating anything; otherwise the dataset is
    built (as the first run would; cached, so cheap later) and its stored counts decide.
    """
    from chemscale.config import ConfigError
    from chemscale.ff import store

    _refuse_compile(config, source)
    from_dict(FFModelConfig, config.get("model", {}), f"{source} [model]")
    dcfg = from_dict(FFDataConfig, config.get("data", {}), f"{source} [data]")
    if not data:
        return
    try:
        recipe = ffdata.as_recipe(dcfg.source, **dcfg.recipe)
    except ffdata.FFDataError as e:
        raise ConfigError(f"{source} [data]: {e}") from None
    asked = {split: n for split, n in (("train", dcfg.n_train_structures), ("val", dcfg.n_val_structures))
             if n}  # n_val_structures 0: all of it
    per_unit = getattr(recipe, "conformers_per_molecule", 1)
    planned = {k: v * per_unit for k, v in recipe.sizes().items()} if hasattr(recipe, "sizes") else {}
    too_many = {split: planned[split] for split, n in asked.items() if split in planned and n > planned[split]}
    if not too_many:  # the recipe allows it (or it is a file): the built dataset's counts decide
        try:
            counts = store.read_meta(ffdata.generate(recipe, progress))["splits"]
        except ffdata.FFDataError as e:
            raise ConfigError(f"{source} [data]: {e}") from None
        too_many = {split: counts[split]["structures"] for split, n in asked.items() if n > counts[split]["structures"]}
        _require_held_out(dcfg.source, {split: counts[split]["structures"] for split in counts}, source)
    if too_many:
        split, available = next(iter(too_many.items()))
        raise ConfigError(f"{source} [data]: n_{split}_structures = {asked[split]:,}, but the {split} split of "
                          f"{dcfg.source!r} has {available:,}"
                          + ("; raise the recipe's size or ask for fewer" if planned else ""))


def _require_held_out(data_source: str, sizes: dict[str, int], source: str) -> None:
    """Refuse a dataset with an empty validation or test split: its errors would read 0, not 'unmeasured'."""
    from chemscale.config import ConfigError

    empty = [split for split in ("val", "test") if sizes.get(split, 0) == 0]
    if empty:
        raise ConfigError(f"{source} [data]: the {' and '.join(empty)} split(s) of {data_source!r} hold no structures "
                          f"(splits: {sizes}); a run needs both to report errors on held-out data")


def build(config: dict, tcfg, run_dir: Path, source: str) -> Task:
    """Build the force-field task of a run config (sections `model`, `data`)."""
    _refuse_compile(config, source)
    mcfg = from_dict(FFModelConfig, config.get("model", {}), f"{source} [model]")
    dcfg = from_dict(FFDataConfig, config.get("data", {}), f"{source} [data]")
    seed = int(config.get("seed", 0))
    recipe = ffdata.as_recipe(dcfg.source, **dcfg.recipe)
    train_set = ffdata.load(recipe, "train", dcfg.n_train_structures, seed=0, progress=False)
    val_set = ffdata.load(recipe, "val", dcfg.n_val_structures or None, seed=0, progress=False)
    test_set = ffdata.load(recipe, "test", None, progress=False)
    _require_held_out(dcfg.source, {"train": len(train_set), "val": len(val_set), "test": len(test_set)}, source)
    elements = sorted(set(train_set.elements) | set(val_set.elements) | set(test_set.elements))
    model = models.build(mcfg.name, width=mcfg.width, depth=mcfg.depth, cutoff=mcfg.cutoff, elements=elements,
                         n_rbf=mcfg.n_rbf, **mcfg.options)
    module = FFModule(model, tcfg, dcfg.energy_weight)
    batch_size = min(tcfg.batch_size, len(train_set))
    module.measure_flops(next(iter(ff_loader(train_set, batch_size=batch_size, cutoff=mcfg.cutoff))))
    train_loader = _Ranked(train_set, batch_size=batch_size, shuffle=True, seed=seed, cutoff=mcfg.cutoff,
                           drop_last=True, steps_done=lambda: module.global_step)
    val_loader = _Ranked(val_set, batch_size=max(64, tcfg.batch_size), cutoff=mcfg.cutoff)
    return Task(module, train_loader, val_loader, test_set, mcfg.cutoff, len(train_set), dcfg.n_train_structures)

