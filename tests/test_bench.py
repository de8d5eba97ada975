"""The benchmark runs and reports every figure (speeds are measured, never asserted)."""

import json

from chemscale import bench

KEYS = ("speedup_vs_hf", "speedup_vs_hf_bf16", "mfu", "encode_mol_per_s", "loader_tokens_per_s", "train_tokens_per_s",
        "end_to_end_fraction")


def test_chemgpt_bench_quick_reports_every_figure(capsys):
    assert bench.main(["chemgpt", "--quick"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(KEYS) <= set(result)
    for key in KEYS:
        if key == "speedup_vs_hf_bf16" and not result["bf16_supported"]:
            assert result[key] is None
        else:
            assert result[key] > 0, key


FF_KEYS = ("speedup_vs_schnetpack", "train_mol_per_s", "schnetpack_mol_per_s", "runner_mol_per_s",
           "xtb_structures_per_s")


def test_ff_bench_quick_reports_every_figure(capsys, tmp_path, monkeypatch):
    """Both pipelines (chemscale's and stock schnetpack's) train, the runner runs, xTB labels."""
    monkeypatch.chdir(tmp_path)
    assert bench.main(["ff", "--quick"]) == 0
    assert list(tmp_path.iterdir()) == []  # nothing left in the working directory (schnetpack's lock file)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in FF_KEYS:
        assert result[key] > 0, key
    assert result["speedup_vs_schnetpack"] == result["train_mol_per_s"] / result["schnetpack_mol_per_s"]
    assert result["schnetpack_setting"] in result["schnetpack_settings_mol_per_s"]
