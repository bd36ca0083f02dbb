"""Keep glibc from returning freed tensor buffers to the OS after every op (CPU training).

glibc serves blocks of 32 MiB and more with `mmap` and unmaps them on `free`, and trims the heap
top after large frees. A CPU training step allocates and frees many activation-sized buffers,
so every one of them is faulted in page by page again: on ConvMixer-256/8 at batch 128 (32 MiB
per activation) that is ~8,200 page faults per op and most of the step time
(`docs/benchmarks.md`). Raising the mmap and trim thresholds with `mallopt` makes freed buffers
stay in the heap for the next op; the price is that the process keeps its peak memory (what
PyTorch's CUDA caching allocator does on GPUs). It is the same advice as PyTorch's CPU
performance guide (jemalloc/tcmalloc), without preloading another allocator.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

# mallopt() parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap and are reused
KEEP_TRIM_THRESHOLD = (1 << 31) - 1  # never trim the heap top (largest int mallopt takes)
USER_ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
PRELOADED_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True)
class AllocatorSetting:
    """What `keep_freed_memory` did, and why when it did nothing."""

    applied: bool
    reason: str


_applied: AllocatorSetting | None = None


def glibc_version() -> str | None:
    """glibc's version ('2.36'), or None on musl, macOS and Windows."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return None
    return name.split()[-1] if name.startswith("glibc") else None


def keep_freed_memory() -> AllocatorSetting:
    """Raise glibc's mmap/trim thresholds for this process; idempotent.

    Does nothing (and says why) off glibc, or when the user already chose: `MALLOC_*_`
    variables or `GLIBC_TUNABLES` set, or jemalloc/tcmalloc/mimalloc in `LD_PRELOAD`.
    """
    global _applied
    if _applied is not None:
        return _applied
    version = glibc_version()
    preload = os.environ.get("LD_PRELOAD", "")
    user_env = [name for name in USER_ALLOCATOR_ENV if name in os.environ]
    if version is None:
        _applied = AllocatorSetting(False, "not glibc: the platform's allocator is left as it is")
    elif user_env:
        _applied = AllocatorSetting(False, f"left to the user's {', '.join(user_env)}")
    elif any(name in preload for name in PRELOADED_ALLOCATORS):
        _applied = AllocatorSetting(False, f"left to the preloaded allocator ({preload})")
    else:
        libc = ctypes.CDLL(None)  # the C library this process already uses
        ok = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(KEEP_MMAP_THRESHOLD)) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(KEEP_TRIM_THRESHOLD)) == 1 and ok
        reason = f"glibc {version}: freed buffers below 1 GiB are kept for reuse"
        _applied = AllocatorSetting(ok, reason if ok else f"glibc {version} refused mallopt()")
    return _applied
