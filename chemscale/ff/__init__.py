"""Force fields for the GNN scaling study: data (`data`, `readers`, `generate`, `loader`) and models.

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
