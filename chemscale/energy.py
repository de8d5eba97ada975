"""The energy a run's GPUs used while training, for result.json's `energy_kj` (beside the FLOPs), from NVML.

NVML (the NVIDIA Management Library, installed with the driver) keeps one counter per GPU,
`nvmlDeviceGetTotalEnergyConsumption`: millijoules since the driver loaded (Volta and later). Each
training process reads its own GPU's counter when training starts and when it ends (the
validations in between included: they run inside the same fit on the same GPU); the difference is
that process's energy, the processes of a DDP run are summed, and a resumed run adds its earlier
attempts' up to their last checkpoint (as `train_seconds` does: steps trained again count once).
The counter is the whole GPU's, so another job sharing the GPU is counted too. The study's own
code read `nvidia-smi` for the same figure; the counter needs no polling and misses no interval.

Python reads NVML through the `pynvml` module of the nvidia-ml-py package, an optional install
(`pip install nvidia-ml-py`, beside the driver), not in requirements.txt. Without it, on CPU, on
a GPU that is not NVIDIA's or lacks the counter, `energy_kj` is null and `energy_note` says why:
never 0, which would read as a measurement. A failing NVML call never stops a run; it becomes the
note.
"""

from __future__ import annotations

from typing import Callable

import torch

NO_GPU = "no GPU: energy not measured"


class Unmeasured(Exception):
    """This process's GPU energy cannot be read; the message says why, in words for `energy_note`."""


def nvml_uuid(device: torch.device) -> str:
    """NVML's name of a CUDA device, 'GPU-<uuid>'; `Unmeasured` for a CPU or a GPU that is not NVIDIA's.

    By UUID, not by index: CUDA_VISIBLE_DEVICES renumbers CUDA's devices, while NVML numbers all
    of the machine's.
    """
    if device.type != "cuda":
        raise Unmeasured(NO_GPU)
    if torch.version.hip:
        raise Unmeasured("an AMD GPU, which NVML does not see: energy not measured")
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def counter(device: torch.device) -> Callable[[], float]:
    """A function that reads `device`'s energy counter in millijoules; it and this raise `Unmeasured` saying why not.

    Any NVML error (NVMLError_NotSupported before Volta or on a MIG slice, _NoPermission,
    _LibraryNotFound...) means the same to a run: no figure, and training goes on.
    """
    uuid = nvml_uuid(device)
    try:
        import pynvml
    except ImportError:
        raise Unmeasured("NVML's Python module pynvml is not installed (pip install nvidia-ml-py): "
                         "energy not measured") from None

    def nvml(call, *args):
        try:
            return call(*args)
        except Exception as e:
            raise Unmeasured(f"NVML cannot read the energy counter of {uuid} ({type(e).__name__}: {e}): "
                             f"energy not measured") from None

    nvml(pynvml.nvmlInit)
    handle = nvml(pynvml.nvmlDeviceGetHandleByUUID, uuid)
    return lambda: float(nvml(pynvml.nvmlDeviceGetTotalEnergyConsumption, handle))


class RunEnergy:
    """A run's GPU energy in millijoules over its processes and attempts; None with a note if any part is unknown.

    `start` at training start; `total` (a collective under DDP: every process calls it) whenever the
    run's figure so far is needed: at each checkpoint, whose state (`state_dict`) a resumed attempt
    starts from, and at the end.
    """

    def __init__(self):
        self.earlier: float | None = 0.0  # the attempts before this resume, every process
        self.earlier_note: str | None = None
        self.read: Callable[[], float] | None = None
        self.note: str | None = "training did not start: energy not measured"
        self.t0 = 0.0
        self.last: tuple[float | None, str | None] = (None, self.note)

    def start(self, device: torch.device) -> None:
        try:
            self.read, self.note = counter(device), None
            self.t0 = self.read()
        except Unmeasured as e:
            self.read, self.note = None, str(e)

    def total(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float | None, str | None]:
        """(millijoules of the run so far, None) or (None, why not); `reduce` sums a tensor over the processes."""
        mine = self._this_process()
        summed = reduce(torch.tensor([mine or 0.0, float(mine is None)], dtype=torch.float64)).tolist()
        if self.earlier is None:
            self.last = (None, self.earlier_note)
        elif mine is None:
            self.last = (None, self.note)
        elif summed[1]:
            self.last = (None, f"{int(summed[1])} of the run's processes could not read their GPU's energy counter: "
                               f"energy not measured")
        else:
            self.last = (self.earlier + summed[0], None)
        return self.last

    def _this_process(self) -> float | None:
        """Millijoules this process's GPU used since `start`; None (and the note) when they cannot be read."""
        if self.read is None:
            return None
        try:
            used = self.read() - self.t0
        except Unmeasured as e:  # the driver went away mid-run: no figure, and the run goes on
            self.read, self.note = None, str(e)
            return None
        if used < 0:  # the counter restarts with the driver
            self.read, self.note = None, "the GPU's energy counter went back (driver reloaded?): energy not measured"
            return None
        return used

    def state_dict(self) -> dict:
        """The run's figure at the last `total`: what the checkpoint written after it holds."""
        return {"mj": self.last[0], "note": self.last[1]}

    def load_state_dict(self, state: dict | None) -> None:
        """Start from a checkpoint's figure; one written before energy was recorded makes the run's unknown."""
        state = state or {"mj": None, "note": "the checkpoint resumed from has no energy figure: energy not measured"}
        self.earlier, self.earlier_note = state["mj"], state["note"]


def entries(mj: float | None, note: str | None) -> dict:
    """result.json's `energy_kj` (None when not measured) and `energy_note` (why not; None when measured)."""
    return {"energy_kj": None if mj is None else mj / 1e6, "energy_note": note}
