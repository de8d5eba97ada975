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
