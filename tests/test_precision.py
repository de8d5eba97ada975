"""Mixed precision trains both tasks, with gradient clipping, on any CPU (bf16 autocast runs everywhere).

Before the fix a `bf16-mixed` ChemGPT run crashed at its first step: Lightning's AMP plugin
refused to clip the gradients of the fused AdamW.
"""

import csv
import math

import pytest
import torch
from conftest import tiny_lm_config
from test_ff_task import tiny_ff_config

from chemscale import runs, train
from chemscale.lm.chemgpt import ChemGPT, ChemGPTConfig
from chemscale.precision import ClippingMixedPrecision

# bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-9 (0.2%). The validation
# loss averages thousands of token losses, so rounding mostly cancels: measured after 20 steps,
# 2.78907 (bf16-mixed) vs 2.78899 (fp32), 0.003%. The band is 0.5%, more than two roundings of the
# loss itself, and fails for a real defect: a learning rate 10% off moves this loss by 1.5%.
BF16_REL_TOL = 0.005


def _train_losses(run_dir):
    with open(run_dir / runs.METRICS) as f:
        rows = list(csv.DictReader(f))
    return [float(r["train_loss"]) for r in rows if r["train_loss"]]


def test_chemgpt_bf16_mixed_trains_and_matches_fp32(runs_root):
    fp32 = train.train(runs.create("p", tiny_lm_config(precision="32-true"), runs_root))
    bf16_dir = runs.create("p", tiny_lm_config(precision="bf16-mixed"), runs_root)
    bf16 = train.train(bf16_dir)
    assert bf16["status"] == "finished" and bf16["steps"] == 20
    assert bf16["train"]["grad_clip"] > 0 and bf16["train"]["precision"] == "bf16-mixed"
    losses = _train_losses(bf16_dir)
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert bf16["best_val_loss"] == pytest.approx(fp32["best_val_loss"], rel=BF16_REL_TOL)
    assert bf16["best_val_loss"] != fp32["best_val_loss"]  # autocast really ran in bf16


def test_force_field_bf16_mixed_trains(runs_root):
    run_dir = runs.create("ff", tiny_ff_config(precision="bf16-mixed"), runs_root)
    result = train.train(run_dir)
    assert result["status"] == "finished" and result["steps"] == 10
    losses = _train_losses(run_dir)
    assert len(losses) == 10 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(result["best_val_loss"])
    assert math.isfinite(result["test_energy_mae_mev"]) and math.isfinite(result["test_force_mae_mev_per_a"])


def _grads(model, scaler=None):
    torch.manual_seed(1)
    ids = torch.randint(4, 30, (4, 12))
    _, loss = model(ids[:, :-1], ids[:, 1:])
    (loss if scaler is None else scaler.scale(loss)).backward()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fused_adamw_gradients_are_clipped_unscaled(precision):
    """The plugin clips the fused AdamW's true gradients (fp16: unscaled first) and steps as fp32 would."""
    def model_and_opt():
        torch.manual_seed(0)
        m = ChemGPT(ChemGPTConfig(vocab_size=30, width=16, depth=1, n_heads=2))
        return m, m.configure_optimizer(lr=1e-2)

    ref, ref_opt = model_and_opt()
    _grads(ref)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    ref_opt.step()

    model, opt = model_and_opt()
    assert opt.defaults["fused"]  # the case Lightning refused
    plugin = ClippingMixedPrecision(precision, "cpu")
    _grads(model, plugin.scaler)
    assert (plugin.scaler is not None) == (precision == "16-mixed")
    if plugin.scaler is not None:
        assert plugin.scaler.get_scale() > 1  # the gradients are scaled: clipping them as they are would be wrong
    plugin.clip_gradients(opt, 0.1)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm == pytest.approx(0.1, rel=1e-4)  # clipped after unscaling, not at 0.1 of the scaled norm
    plugin.scaler.step(opt) if plugin.scaler is not None else opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
