"""Scale-out paths checked on any CPU (issue 12): DDP learns what one process learns, bf16 without native bf16.

DDP: 2 gloo processes at per-process batch B/2 against 1 process at batch B, the same seed and data.
`ResumableSampler` gives rank r the items r, r + 2, ... of the pass's permutation, so at each step the
two ranks' batches together are the molecules of the 1-process batch, split by parity; both runs start
from the same weights (same seed). What still differs: each rank's loss is the mean over its own tokens,
and DDP averages the ranks' gradients, so the loss DDP descends is the mean of two half-batch means where
1 process takes one mean over every token (the halves hold different numbers of tokens); and sums are
taken in another order (the gradient all-reduce, matrix products over half batches).
"""

import csv
import json
import os
import subprocess
import sys

import pytest

from chemscale import paths, runs, train
from conftest import tiny_lm_config
from test_precision import BF16_REL_TOL

# Measured (10 steps, width 16, B = 16, 200 molecules): validation losses 3.09858/3.00911 (1 process) and
# 3.09873/3.00926 (2 processes), a relative gap of 5e-5, mostly the token weighting above. The band is 10 times
# that, for other machines' rounding, and fails for the defect that matters: ranks that do not combine their
# halves learn as from batches of B/2, and 1 process at batch B/2 is 1.1e-3 and 1.4e-3 off.
DDP_VAL_REL_TOL = 5e-4
# The logged training loss of a step, the mean over ranks, is the same batch's loss as 1 process's up to the
# token weighting: measured gap at most 1.5e-4. Rank 0's half-batch loss alone was up to 5.6e-3 off.
DDP_TRAIN_REL_TOL = 1e-3


def _losses(run_dir):
    """(training losses, validation losses) of a run, in step order, as metrics.csv logged them."""
    with open(run_dir / runs.METRICS) as f:
        rows = list(csv.DictReader(f))
    return ([float(r["train_loss"]) for r in rows if r["train_loss"]],
            [float(r["val_loss"]) for r in rows if r["val_loss"]])


def test_two_processes_at_half_the_batch_learn_what_one_process_learns(runs_root):
    one_dir = runs.create("ddp", tiny_lm_config(batch_size=16, max_steps=10, val_every_steps=5), runs_root)
    one = train.train(one_dir)
    two_dir = runs.create("ddp", tiny_lm_config(batch_size=8, devices=2, strategy="ddp", max_steps=10,
                                                val_every_steps=5), runs_root)
    proc = subprocess.run([sys.executable, "-m", "chemscale.train", str(two_dir)], capture_output=True, text=True,
                          cwd=paths.ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((two_dir / runs.RESULT).read_text())
    assert two["status"] == one["status"] == "finished" and two["steps"] == one["steps"] == 10
    assert two["train"]["devices"] == 2
    assert two["tokens_seen"] == one["tokens_seen"], "the two ranks' shares together are the 1-process batches"
    (one_train, one_val), (two_train, two_val) = _losses(one_dir), _losses(two_dir)
    assert len(two_val) == len(one_val) == 2 and len(two_train) == len(one_train) == 10
    assert two_val == pytest.approx(one_val, rel=DDP_VAL_REL_TOL)
    assert two_train == pytest.approx(one_train, rel=DDP_TRAIN_REL_TOL)


# A CPU without native bf16 (no AVX512-BF16, no AMX): oneDNN capped at AVX2 and ATen's kernels at AVX2, so
# bf16 matrix products take PyTorch's fallback path, which this machine would otherwise never run. Measured
# (20 steps, width 16): validation loss 2.78814 in bf16-mixed against 2.78805 in fp32, 3e-5 apart; the band is
# test_precision's BF16_REL_TOL (0.5%, two roundings of the loss in bf16; issue 12 asks for 2%), which a learning
# rate 10% off (1.5%) fails.
WITHOUT_NATIVE_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
_TRAIN_WITHOUT_NATIVE_BF16 = """
import sys, torch
from chemscale import train
print("native bf16:", torch.ops.mkldnn._is_mkldnn_bf16_supported())
sys.exit(train.main(sys.argv[1:]))
"""


def test_bf16_mixed_matches_fp32_without_native_bf16(runs_root):
    """bf16 autocast trains to fp32's validation loss on a CPU without native bf16 (forced off on this one);
    with it, as the CPU has it, `test_precision.test_chemgpt_bf16_mixed_trains_and_matches_fp32`."""
    fp32 = train.train(runs.create("p", tiny_lm_config(precision="32-true"), runs_root))
    run_dir = runs.create("p", tiny_lm_config(precision="bf16-mixed"), runs_root)
    proc = subprocess.run([sys.executable, "-c", _TRAIN_WITHOUT_NATIVE_BF16, str(run_dir)], capture_output=True,
                          text=True, cwd=paths.ROOT, env={**os.environ, **WITHOUT_NATIVE_BF16}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "native bf16: False" in proc.stdout
    bf16 = json.loads((run_dir / runs.RESULT).read_text())
    assert bf16["status"] == "finished" and bf16["steps"] == 20 and bf16["train"]["precision"] == "bf16-mixed"
    assert bf16["best_val_loss"] == pytest.approx(fp32["best_val_loss"], rel=BF16_REL_TOL)
    assert bf16["best_val_loss"] != fp32["best_val_loss"]  # autocast really ran in bf16
