"""The malloc setting takes effect (a large block comes from the heap, not a fresh mmap) and is undone.

Observed through glibc's `mallinfo2().hblks` (blocks currently served by mmap), in a child
process: malloc settings are process-wide, so the test process itself is never changed.
"""

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")

PROBE = r"""
import ctypes, json
from chemscale import memory

libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mmapped(mib):
    "Whether malloc serves a block of `mib` MiB by mmap (an extra mmapped block while it is held)."
    before = libc.mallinfo2().hblks
    p = libc.malloc(mib << 20)
    served = libc.mallinfo2().hblks - before
    libc.free(p)
    return served == 1

out = {"default_8": mmapped(8), "thresholds_before": memory.thresholds()}
with memory.freed_memory_kept():
    out["kept_24"] = mmapped(24)
    out["thresholds_inside"] = memory.thresholds()
out["after_24"] = mmapped(24)
out["thresholds_after"] = memory.thresholds()
out["again"] = memory.keep_freed_memory() and memory.keep_freed_memory()
out["kept_again_24"] = mmapped(24)
print(json.dumps(out))
"""


def test_keep_freed_memory_takes_effect_and_is_undone():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 (glibc >= 2.33)
    except (OSError, AttributeError):
        pytest.skip("no mallinfo2 (glibc < 2.33)")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    out = json.loads(done.stdout)
    assert out["default_8"] is True  # glibc's default: blocks over 128 KiB come from mmap
    assert out["kept_24"] is False  # raised threshold: a 24 MiB block comes from the heap
    assert out["thresholds_inside"] == [32 << 20, 1 << 30]
    # Restored: 24 MiB is mmapped again (glibc's dynamic threshold only rose to 8 MiB above).
    assert out["after_24"] is True and out["thresholds_before"] is None and out["thresholds_after"] is None
    assert out["again"] is True and out["kept_again_24"] is False  # idempotent
