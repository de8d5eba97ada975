"""The malloc setting applies on glibc and is harmless to call twice."""

import sys

import pytest

from chemscale import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_applies_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert memory.keep_freed_memory() is True
    assert memory.keep_freed_memory() is True
