"""Force fields for the GNN scaling study: data, models, training, and an ASE calculator.

Where each concept lives:

- data: `frames` (structures in memory, units), `readers` (users' files), `generate` (GFN2-xTB
  recipes), `store` (a dataset folder on disk), `data` (recipes, cache, `load`), `loader` (batches);
- models: `forcefield` (the `ForceField` base, the `Graph` networks read, the batch/output keys `P`),
  `models` (the registry: one row per model, `build`, `rebuild`, `check`, `kind`), one module per
  network family: `schnetpack_models` (SchNet, PaiNN), `allegro_adapter` (Allegro), `spookynet`;
- `task` (the training task of `python -m chemscale.train`), `card` (best_model.json: what rebuilds a
  run's best model), `calculator` (a trained run as an ASE calculator), `bench` (training speed
  against stock schnetpack).

Importing this package is cheap; schnetpack (which pulls in Lightning, seconds) is imported
only by `import_schnetpack()`.
"""


def import_schnetpack():
    """Import schnetpack 2.1.1 under recent torch and return the module.

    schnetpack 2.1.1 does `from torch.utils.data.dataloader import T_co`; recent torch renamed
    it `_T_co`, so alias it before the import.
    """
    import torch.utils.data.dataloader as dataloader

    if not hasattr(dataloader, "T_co"):
        dataloader.T_co = dataloader._T_co
    import schnetpack

    return schnetpack
