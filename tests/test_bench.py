"""The benchmarks: every figure follows from the rates it is computed from, is physical or flagged,
both sides of the bf16 switch run on any CPU, and the process is left as it was found.

Speeds are measured, never asserted: the machine may be busy.
"""

import json
import logging
import math
import os
import statistics

import pytest
import torch

from chemscale import bench, measure, memory
from chemscale.lm import bench as lm_bench
from chemscale.lm import cache as lm_cache
from chemscale.lm.chemgpt import ChemGPT, ChemGPTConfig, preset_heads
from chemscale.ff import data as ff_data


def _process_state() -> dict:
    """What a benchmark could change for its caller: compared before and after."""
    return {"threads": torch.get_num_threads(), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(), "dtype": torch.get_default_dtype(),
            "caches": (lm_cache.CACHE_DIR, ff_data.CACHE_DIR), "malloc": memory.thresholds(),
            "log_levels": {name: logging.getLogger(name).level for name in (*measure.LIGHTNING_LOGGERS, "root")},
            "rng": torch.get_rng_state().numpy().tobytes(), "cwd": os.getcwd(),
            "env": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}}  # pytest's own: (setup)/(call)


def _changes(before: dict, after: dict) -> list[str]:
    """Names of what differs, environment variables one by one."""
    changed = [key for key in before if key != "env" and before[key] != after[key]]
    env_before, env_after = before["env"], after["env"]
    return changed + sorted(f"env {k}" for k in env_before.keys() | env_after.keys()
                            if env_before.get(k) != env_after.get(k))


def _import_side_effects():
    """Libraries that set log levels or environment variables on first use (not the benchmarks' doing)."""
    import pytorch_lightning  # noqa: F401 (sets its loggers' levels)

    from chemscale.lm import molecules  # noqa: F401 (imports rdkit, which sets RDBASE)
    from chemscale.ff import import_schnetpack

    import_schnetpack()
    lm_bench._chemgpt(16, 1).to_hf()  # building an HF model sets TORCHINDUCTOR_CACHE_DIR


@pytest.fixture
def unusual_state():
    """Settings the benchmarks change (threads, RNG), set to values they would not leave behind."""
    _import_side_effects()
    torch.set_num_threads(1)  # the benchmarks use every core
    torch.manual_seed(1234)  # they seed their models
    return _process_state()


def _median_ratio(num, den, scale=1.0):
    return statistics.median(scale * a / b for a, b in zip(num, den))


def _physical_or_flagged(result, key, measured):
    """A figure bounded by 1 is reported in (0, 1], or nulled with a warning when its measurement exceeds 1."""
    if measured <= 1:
        assert result[key] == pytest.approx(measured, rel=1e-12) and result[key] > 0, key
    else:
        assert result[key] is None and any(w.startswith(key) for w in result["warnings"]), key


def test_chemgpt_bench_quick_bf16_on_is_consistent_and_restores_state(capsys, unusual_state):
    assert bench.main(["chemgpt", "--quick", "--bf16", "on"]) == 0  # on: the bf16 path runs on any CPU
    assert _changes(unusual_state, _process_state()) == []
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bf16_measured"] is True and result["bf16_supported"] == lm_bench.cpu_has_bf16()

    rounds, rates = result["rounds"], result["rates"]
    for key, width in (("w128", 32), ("w256", 64)):  # quick: stand-in widths
        model = ChemGPT(ChemGPTConfig(vocab_size=lm_bench.VOCAB, width=width, depth=4, n_heads=preset_heads(width)))
        assert rates[key]["width"] == width and rates[key]["flops_per_token"] == model.flops_per_token(63)
        for name, per_round in rounds[key].items():
            assert len(per_round) == 2 and all(math.isfinite(r) and r > 0 for r in per_round), (key, name)
            assert rates[key][name] == statistics.median(per_round)
    assert set(rounds["w256"]) == {"ours_fp32", "hf_fp32", "matmul_fp32", "ours_bf16"}

    w128, w256 = rounds["w128"], rounds["w256"]
    assert result["speedup_vs_hf"] == pytest.approx(_median_ratio(w128["ours_fp32"], w128["hf_fp32"]))
    assert result["speedup_vs_hf_bf16"] == pytest.approx(_median_ratio(w256["ours_bf16"], w256["hf_fp32"]))
    assert result["train_tokens_per_s"] == rates["w256"]["ours_fp32"]
    assert result["matmul_fp32_gflops"] == pytest.approx(rates["w256"]["matmul_fp32"] / 1e9)
    _physical_or_flagged(result, "mfu", _median_ratio(w256["ours_fp32"], w256["matmul_fp32"],
                                                      rates["w256"]["flops_per_token"]))
    e2e = result["end_to_end_rounds"]
    assert len(e2e["runner"]) == len(e2e["bare"]) == 2
    _physical_or_flagged(result, "end_to_end_fraction", _median_ratio(e2e["runner"], e2e["bare"]))
    assert result["loader_over_training"] == pytest.approx(result["loader_tokens_per_s"] / result["train_tokens_per_s"])
    assert result["encode_mol_per_s"] > 0
    for warning in result["warnings"]:  # a warning only for a figure that was nulled
        assert result[warning.split()[0]] is None


def test_bf16_flag_off_skips_bf16_and_auto_follows_the_cpu(unusual_state):
    result = lm_bench.step_speed(quick=True, bf16=False)
    assert "ours_bf16" not in result["rounds"]["w256"] and result["speedup_vs_hf_bf16"] is None
    assert result["bf16_measured"] is False and result["bf16_supported"] == lm_bench.cpu_has_bf16()
    assert lm_bench.bf16_wanted(True) is True and lm_bench.bf16_wanted(False) is False
    assert lm_bench.bf16_wanted(None) is lm_bench.cpu_has_bf16()


def test_impossible_figures_are_flagged_not_reported():
    """The figures of a busy machine seen in issue 8: mfu 3.50 and end_to_end_fraction 0.09."""
    result = {"mfu": 3.5, "end_to_end_fraction": 0.09, "speedup_vs_hf": 1.4}
    warnings = lm_bench.flag_impossible(result)
    assert result == {"mfu": None, "end_to_end_fraction": 0.09, "speedup_vs_hf": 1.4}
    assert len(warnings) == 1 and warnings[0].startswith("mfu measured 3.5 > 1")
    result = {"mfu": 1.0, "end_to_end_fraction": 1.2}
    assert [w.split()[0] for w in lm_bench.flag_impossible(result)] == ["end_to_end_fraction"]
    assert result == {"mfu": 1.0, "end_to_end_fraction": None}


FF_KEYS = ("speedup_vs_schnetpack", "train_mol_per_s", "schnetpack_mol_per_s", "runner_mol_per_s",
           "xtb_structures_per_s")


def test_ff_bench_quick_is_consistent_and_restores_state(capsys, tmp_path, monkeypatch, unusual_state):
    """Both pipelines (chemscale's and stock schnetpack's) train in paired rounds, the runner runs, xTB labels."""
    monkeypatch.chdir(tmp_path)
    unusual_state["cwd"] = str(tmp_path)
    assert bench.main(["ff", "--quick"]) == 0
    assert _changes(unusual_state, _process_state()) == []  # malloc settings included: raised during the run only
    assert list(tmp_path.iterdir()) == []  # nothing left in the working directory (schnetpack's lock file)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in FF_KEYS:
        assert math.isfinite(result[key]) and result[key] > 0, key
    ours, theirs = result["rounds"]["chemscale"], result["rounds"]["schnetpack"]
    assert len(ours) == len(theirs) == 1
    assert result["speedup_vs_schnetpack"] == pytest.approx(_median_ratio(ours, theirs))
    assert result["train_mol_per_s"] == statistics.median(ours)
    assert result["schnetpack_mol_per_s"] == statistics.median(theirs)
    assert result["schnetpack_setting"] in result["schnetpack_settings_mol_per_s"]
    assert result["n_train_structures"] == 40
