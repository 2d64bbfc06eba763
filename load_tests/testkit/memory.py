"""The C allocator's handling of freed memory: a process-wide setting that decides how fair a CPU timing is.

With glibc's defaults a buffer above a threshold (128 KiB at start, rising with use to at most 32 MiB) is mapped
fresh from the kernel and unmapped when freed, and free memory at the top of the heap goes back to the kernel.
Code that allocates tensors above 32 MiB every step therefore faults all their pages in again, zeroed by the
kernel, every step. Measured on the development machine (docs/load-testing.md), each in a process of its own:
ModelScope's reference at batch 8 took 640,000-680,000 minor page faults and 2.4 s per image, and 3,400-33,000
faults and 1.3-1.7 s with freed memory kept; at batch 1 it faults next to nothing either way. This engine's
tensors stay below 32 MiB up to the CPU profile's largest batch (16 images: 19 MB of logits); measured at batch 1
and 8, it takes no page faults after warm-up with the defaults and runs no faster with the setting, which is why
the served model leaves the allocator alone. ``load_tests/bench_engine.py`` uses it for its second timing pass.
"""

from __future__ import annotations

import ctypes

__all__ = ["KEEP_FREED_BYTES", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations below this come from the heap, and this much free memory may sit at its top before it is trimmed.
KEEP_FREED_BYTES = 1 << 30
# A glibc that refuses the larger threshold gets its documented maximum on 64-bit, 32 MiB.
_FALLBACK_BYTES = 32 << 20


def keep_freed_memory(threshold: int = KEEP_FREED_BYTES) -> bool:
    """Make glibc's malloc keep freed memory for reuse: allocations below ``threshold`` bytes come from its heap,
    and free memory is only returned to the kernel once ``threshold`` bytes of it sit at the heap's top.

    Affects the whole process: its resident memory then stays near its high-water mark. Returns whether the
    setting took; False (nothing changed) where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    threshold = min(threshold, 2**31 - 1)
    if not mallopt(_M_MMAP_THRESHOLD, threshold):
        threshold = min(threshold, _FALLBACK_BYTES)
        if not mallopt(_M_MMAP_THRESHOLD, threshold):
            return False
    return bool(mallopt(_M_TRIM_THRESHOLD, threshold))
