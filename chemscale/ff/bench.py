"""`python -m chemscale.bench ff`: how fast force fields train here, against stock schnetpack, in one run.

Both pipelines train the same SchNet (64 features, 3 interactions, 20 Gaussians, 5 Å cosine
cutoff, energy+forces loss, AdamW) on the same xTB ethanol training structures, batch 32, under
the same Lightning `Trainer` settings (CPU, fp32, no validation, no logger, no checkpoints), and
the same callback counts molecules per second over the steps after a warm-up, in one process
with malloc's mmap threshold raised as `python -m chemscale.train` does (`chemscale.memory`:
~20% for chemscale's SchNet step, ~3% for the stock pipeline):

- **chemscale**: `chemscale.ff.task.build` (the training task of `python -m chemscale.train`):
  the split as contiguous tensors, neighbour pairs per batch in torch, `FFModule`.
- **stock schnetpack** (as its tutorials write it): `AtomsDataModule` on the dataset's
  `train.db` with a neighbour-list transform (`ASENeighborList` or `MatScipyNeighborList`),
  `RemoveOffsets`, `CastTo32`; `NeuralNetworkPotential` with `PairwiseDistances`, `Atomwise`,
  `Forces`; `AtomisticTask`. The baseline is the fastest of its neighbour lists and data-loader
  worker counts (0 and 2 workers), each tried once; then the best stock setting and chemscale
  alternate in rounds, and the speed-up is the median of the per-round ratios (`rounds`).

Figures in the last line (JSON): `speedup_vs_schnetpack`, `train_mol_per_s` (chemscale, in the
harness), `schnetpack_mol_per_s` and `schnetpack_setting` (the baseline), `runner_mol_per_s`
(through `python -m chemscale.train`, which also logs every step and validates),
`xtb_structures_per_s` (GFN2-xTB single points with forces, tblite on one thread, as the
data generation runs them) and `threads`.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch

from chemscale import memory, paths
from chemscale.measure import LIGHTNING_LOGGERS, paired_ratio, process_state_kept
from chemscale.ff import data as ffdata
from chemscale.ff import import_schnetpack

WIDTH, DEPTH, CUTOFF, N_RBF, BATCH, LR = 64, 3, 5.0, 20, 32, 5e-4
ENERGY_WEIGHT = 0.01  # as chemscale's default: loss = 0.01 MSE(E) + 0.99 MSE(F)
RECIPES = {  # quick: the smoke profile's data; full: the cpu profile's (shared cache with `make study`)
    True: {"source": "md:ethanol", "recipe": {"n_train": 40, "n_val": 10, "n_test": 10, "equilibration_steps": 50}},
    False: {"source": "md:ethanol", "recipe": {"n_train": 1000, "n_val": 100, "n_test": 500}},
}


class MoleculeClock(pl.Callback):
    """Molecules per second over the training steps after the first `warmup` (data loading included)."""

    def __init__(self, warmup: int):
        self.warmup, self.molecules, self.t0, self.t1 = warmup, 0, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.t0 = now
        elif trainer.global_step > self.warmup:
            self.molecules += int(batch[import_schnetpack().properties.n_atoms].numel())
            self.t1 = now

    @property
    def rate(self) -> float:
        if self.t1 is None:
            raise RuntimeError("the timed steps did not run: is max_steps larger than the warm-up?")
        return self.molecules / (self.t1 - self.t0)


def _fit(module, clock: MoleculeClock, steps: int, **fit_kwargs) -> float:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=clock.warmup + steps, precision="32-true",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[clock], inference_mode=False)
    trainer.fit(module, **fit_kwargs)
    return clock.rate


def chemscale_run(data_config: dict, steps: int, warmup: int) -> float:
    """Molecules/s of chemscale's task (its loader, SchNet and FFModule)."""
    from chemscale.ff import task
    from chemscale.run_config import TrainConfig

    torch.manual_seed(0)
    config = {"task": "ff", "seed": 0, "model": {"name": "schnet", "width": WIDTH, "depth": DEPTH, "cutoff": CUTOFF,
                                                 "n_rbf": N_RBF},
              "data": {**data_config, "energy_weight": ENERGY_WEIGHT}}
    tcfg = TrainConfig(batch_size=BATCH, lr=LR, weight_decay=0.0, warmup_steps=0, max_steps=warmup + steps)
    with tempfile.TemporaryDirectory() as tmp:
        built = task.build(config, tcfg, Path(tmp), "bench")
        return _fit(built.module, MoleculeClock(warmup), steps, train_dataloaders=built.train_loader)


def schnetpack_run(train_db: Path, n_train: int, steps: int, warmup: int, neighbor_list: str,
                   workers: int) -> float:
    """Molecules/s of the stock schnetpack pipeline on the same training structures."""
    spk = import_schnetpack()
    trn = spk.transform
    torch.manual_seed(0)
    nl = {"ase": trn.ASENeighborList, "matscipy": trn.MatScipyNeighborList}[neighbor_list](cutoff=CUTOFF)
    with tempfile.TemporaryDirectory() as tmp:
        dm = spk.data.AtomsDataModule(
            str(train_db), batch_size=BATCH, num_train=n_train - n_train // 10, num_val=n_train // 10, num_test=0,
            split_file=str(Path(tmp) / "split.npz"), transforms=[
                nl, trn.RemoveOffsets("energy", remove_mean=True), trn.CastTo32()],
            property_units={"energy": "eV", "forces": "eV/Ang"}, distance_unit="Ang",
            num_workers=workers, pin_memory=False)
        representation = spk.representation.SchNet(
            n_atom_basis=WIDTH, n_interactions=DEPTH, radial_basis=spk.nn.GaussianRBF(n_rbf=N_RBF, cutoff=CUTOFF),
            cutoff_fn=spk.nn.CosineCutoff(CUTOFF))
        model = spk.model.NeuralNetworkPotential(
            representation=representation, input_modules=[spk.atomistic.PairwiseDistances()],
            output_modules=[spk.atomistic.Atomwise(n_in=WIDTH, output_key="energy"),
                            spk.atomistic.Forces(energy_key="energy", force_key="forces")],
            postprocessors=[trn.CastTo64(), trn.AddOffsets("energy", add_mean=True)])
        from torchmetrics import MeanAbsoluteError

        outputs = [spk.task.ModelOutput(key, loss_fn=torch.nn.MSELoss(), loss_weight=weight,
                                        metrics={"MAE": MeanAbsoluteError()})
                   for key, weight in (("energy", ENERGY_WEIGHT), ("forces", 1 - ENERGY_WEIGHT))]
        atomistic = spk.task.AtomisticTask(model, outputs, optimizer_cls=torch.optim.AdamW,
                                           optimizer_args={"lr": LR, "weight_decay": 0.0})
        cwd = os.getcwd()
        os.chdir(tmp)  # AtomsDataModule leaves a `splitting.lock` file in the working directory
        try:
            return _fit(atomistic, MoleculeClock(warmup), steps, datamodule=dm)
        finally:
            os.chdir(cwd)


def runner_run(data_config: dict, steps: int) -> float:
    """Structures/s as `python -m chemscale.train` reports it (per-step metrics, a validation, checkpoint)."""
    from chemscale import runs

    with tempfile.TemporaryDirectory() as tmp:
        config = {"study": "bench", "task": "ff", "seed": 0,
                  "model": {"name": "schnet", "width": WIDTH, "depth": DEPTH, "cutoff": CUTOFF, "n_rbf": N_RBF},
                  "data": {**data_config, "energy_weight": ENERGY_WEIGHT},
                  "train": {"batch_size": BATCH, "lr": LR, "max_steps": steps, "val_every_steps": steps,
                            "patience": 0, "warmup_steps": 5, "accelerator": "cpu"}}
        run_dir = runs.create("bench", config, Path(tmp) / "runs")
        # the dataset cache stays the user's (CHEMSCALE_RUNS untouched): generated once, shared with the study
        subprocess.run([sys.executable, "-m", "chemscale.train", str(run_dir)], check=True, cwd=paths.ROOT,
                       stdout=subprocess.DEVNULL)
        return json.loads((run_dir / runs.RESULT).read_text())["train_structures_per_s"]


def xtb_rate(dataset, n: int) -> float:
    """GFN2-xTB energy+forces single points per second on `n` structures of `dataset`."""
    from chemscale.ff.generate import single_threaded_openmp, xtb_calculator

    structures = [dataset.atoms(k) for k in range(min(n, len(dataset)))]
    with single_threaded_openmp():
        calc = xtb_calculator()
        structures[0].calc = calc
        structures[0].get_forces()  # warm-up: library load and first SCF setup
        t0 = time.perf_counter()
        for atoms in structures:
            atoms.calc = calc
            atoms.get_forces()
        return len(structures) / (time.perf_counter() - t0)


def ff_bench(quick: bool = False) -> dict:
    """All figures of the force-field benchmark (see the module docstring); the process is left as found."""
    with process_state_kept(), memory.freed_memory_kept():  # as `python -m chemscale.train` runs
        for name in LIGHTNING_LOGGERS:  # a banner per fit otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        torch.set_num_threads(os.cpu_count() or 1)
        return _measure(quick)


def _measure(quick: bool) -> dict:
    recipe_sizes = RECIPES[quick]["recipe"]
    data_config = {**RECIPES[quick], "n_train_structures": recipe_sizes["n_train"], "n_val_structures": 0}
    recipe = ffdata.as_recipe(data_config["source"], **data_config["recipe"])
    directory = ffdata.generate(recipe, progress=not quick)
    train_set = ffdata.load(directory, "train", progress=False)
    steps, warmup, rounds = (4, 2, 1) if quick else (60, 5, 3)
    stock = partial(schnetpack_run, directory / "train.db", len(train_set), steps, warmup)
    settings = [("ase", 0)] if quick else [("ase", 0), ("ase", 2), ("matscipy", 0), ("matscipy", 2)]

    label = lambda setting: f"{setting[0]}, {setting[1]} workers"  # noqa: E731
    searched = {}
    if len(settings) > 1:  # (neighbour list, data-loader workers): each once, to pick the baseline
        for setting in settings:
            searched[setting] = stock(*setting)
            print(f"stock schnetpack ({label(setting)}): {searched[setting]:,.0f} mol/s", flush=True)
    best = max(searched, key=searched.get) if searched else settings[0]
    ours, theirs = [], []
    for r in range(rounds):  # the ratio's two sides back to back in every round
        ours.append(chemscale_run(data_config, steps, warmup))
        theirs.append(stock(*best))
        print(f"round {r + 1}: chemscale {ours[-1]:,.0f} mol/s, stock ({label(best)}) {theirs[-1]:,.0f} mol/s",
              flush=True)
    runner = runner_run(data_config, 10 if quick else 200)
    print(f"through python -m chemscale.train: {runner:,.0f} mol/s", flush=True)
    xtb = xtb_rate(train_set, 5 if quick else 100)
    print(f"xTB labelling: {xtb:,.1f} structures/s", flush=True)
    return {"speedup_vs_schnetpack": paired_ratio(ours, theirs), "train_mol_per_s": statistics.median(ours),
            "schnetpack_mol_per_s": statistics.median(theirs), "schnetpack_setting": label(best),
            "schnetpack_settings_mol_per_s": {label(k): v for k, v in searched.items()} or {label(best): theirs[0]},
            "rounds": {"chemscale": ours, "schnetpack": theirs}, "runner_mol_per_s": runner,
            "xtb_structures_per_s": xtb, "n_train_structures": len(train_set),
            "model": f"SchNet {WIDTH} features, {DEPTH} interactions, {CUTOFF:g} A, batch {BATCH}",
            "threads": torch.get_num_threads()}
