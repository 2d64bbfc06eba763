"""The C allocator's handling of freed memory, a process-wide setting that matters for CPU inference.

With glibc's defaults a large buffer (above a threshold of 128 KiB that rises with use, up to 32 MiB) is mapped
fresh from the kernel and unmapped when freed, and free memory at the top of the heap is handed back to the kernel
once it exceeds twice that threshold. A decoder step or a convolution that allocates the same large tensors every
time then faults every page back in, zeroed by the kernel each time. Measured on the development machine
(docs/load-testing.md): ModelScope's reference took about 800,000 minor page faults per image at batch 8 (some
3 GB of fresh pages), and the engine about 12,000 per image at batch 8; with freed memory kept for reuse, 30,000
and 3,600.
"""

from __future__ import annotations

import ctypes

__all__ = ["KEEP_FREED_BYTES", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations below this come from the heap, and this much free memory may sit at its top before it is trimmed.
KEEP_FREED_BYTES = 1 << 30
# Older glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit).
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
