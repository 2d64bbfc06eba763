"""load_tests.testkit.memory: freed memory kept for reuse instead of being faulted in afresh."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting"
)

# Allocates, fills and frees 256 MiB twice in a fresh process (so that no earlier allocation has moved glibc's
# thresholds) and prints the page faults of the second round.
_SCRIPT = """
import ctypes, resource, sys
from load_tests.testkit.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
def round_trip():
    buf = libc.malloc(size)
    ctypes.memset(buf, 1, size)
    libc.free(buf)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


def test_freed_memory_is_reused_without_page_faults():
    pages = (256 << 20) // 4096
    # glibc's defaults map a buffer this large afresh every time: every page faults in again.
    assert _second_round_faults("default") > pages // 2
    assert _second_round_faults("keep") < pages // 100
