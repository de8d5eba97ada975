"""Mixed precision with gradient clipping and a fused optimizer (ChemGPT's AdamW).

Lightning's AMP plugin refuses to clip gradients when the optimizer is fused (it "performs
unscaling internally"), so every `bf16-mixed` ChemGPT run crashed at its first step. The
refusal is only needed for fp16: bf16 autocast has no GradScaler, so there is nothing to
unscale and clipping is exact. Under fp16 the plugin below unscales the gradients itself before
clipping (`GradScaler.unscale_`); PyTorch's `GradScaler.step` then sees the optimizer as already
unscaled and passes the fused kernel no scale, only the inf check, which is PyTorch's documented
pattern for clipping under AMP. The fused AdamW stays: on this CPU its step takes 2.8 ms against
14.5 ms for the foreach one at width 256 (3.2M parameters), ~4% of a training step.

Measured with it (width 256, depth 4, 10,000 MOSES molecules, batch 64, 600 steps, lr 1e-3, one
thread each, both runs at once on the AVX512-BF16/AMX 2-core machine): validation loss 0.9151 in
bf16-mixed against 0.9115 in fp32 (+0.4%), training 1,597 against 1,171 tokens/s (the machine
was busy, so the speed ratio is rough).
"""

from __future__ import annotations

from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import GradClipAlgorithmType


def _unscales_internally(optimizer) -> bool:
    """True for fused optimizers (AdamW(fused=True)): PyTorch marks them so for GradScaler."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class ClippingMixedPrecision(MixedPrecision):
    """Lightning's AMP plugin that also clips gradients of fused optimizers, unscaled first."""

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
        if clip_val > 0 and _unscales_internally(optimizer):
            if self.scaler is not None:  # fp16: Lightning left the gradients scaled for the fused step
                self.scaler.unscale_(optimizer)
            Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)
        else:
            super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)


def allow_fused_clipping(trainer) -> None:
    """Swap the Trainer's AMP plugin (as Lightning chose it: device, dtype, scaler) for the clipping one."""
    plugin = trainer.strategy.precision_plugin
    if type(plugin) is MixedPrecision:
        trainer.strategy.precision_plugin = ClippingMixedPrecision(plugin.precision, plugin.device, plugin.scaler)
