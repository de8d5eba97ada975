"""The force-field `gpu` profile at the paper's data sizes: ANI-1x from a local file up to 10^6 training
structures, a missing file refused by name before anything runs, and budgets in which every run can stop early."""

import h5py
import numpy as np
import pytest
import yaml

from chemscale import paths, study
from chemscale.config import ConfigError

NB02 = paths.NOTEBOOKS / "02_gnn_scaling.ipynb"
GPU = study.params_path(NB02, "gpu")


def test_the_gpu_profile_trains_on_ani1x_up_to_a_million_structures():
    params = study.read_params(GPU)
    assert params["data_source"].endswith(".h5")
    assert max(params["n_train_structures"]) >= 10**6


def _gpu_profile_with(tmp_path, data_source):
    """The shipped gpu profile with data_source pointing elsewhere, as a user's copy of it."""
    mine = tmp_path / "gpu.yaml"
    mine.write_text(yaml.safe_dump({**study.read_params(GPU), "data_source": str(data_source)}, sort_keys=False))
    return mine


def test_a_missing_ani1x_file_is_refused_naming_the_key_and_the_path(tmp_path):
    """On a machine without the file (CI, a laptop) the study stops before the notebook starts."""
    missing = tmp_path / "ani1x-release.h5"
    with pytest.raises(ConfigError, match=rf"gpu.yaml: parameter 'data_source' = '{missing}': no such file"):
        study.load_checked(NB02, _gpu_profile_with(tmp_path, missing))


def test_the_gpu_profile_passes_with_a_local_ani1x_file(tmp_path):
    """Where the file exists the profile is accepted as it is."""
    path = tmp_path / "ani1x-release.h5"
    with h5py.File(path, "w") as h5:
        g = h5.create_group("CH4")
        g["atomic_numbers"], g["coordinates"] = np.array([6, 1, 1, 1, 1]), np.zeros((1, 5, 3))
    assert study.load_checked(NB02, _gpu_profile_with(tmp_path, path))["data_source"] == str(path)


def test_every_gpu_run_has_room_to_stop_early():
    """A run that reaches its step cap counts as not converged and is left out of the fits: the smallest
    sets, whose budget is min_steps, must get more validations than early stopping waits for."""
    params = study.read_params(GPU)
    assert params["min_steps"] >= (params["patience"] + 2) * params["val_every_steps"]
    assert params["min_steps"] <= params["max_steps"]
