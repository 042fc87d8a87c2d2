"""Keep freed memory in the process on Linux, so MLX's CPU arrays reuse it.

MLX's CPU allocator has no buffer cache: every op's output is a fresh `malloc`, and glibc
serves blocks above 32 MB (at most; 128 KB by default) with a fresh `mmap` that it unmaps
again on `free`. The next op then touches new pages: one page fault per 4 KB, several µs
each in a VM. On a 2-core KVM guest a float32 multiply over 56.6 M elements (one attention
score matrix of FLUX.2 [klein] at 512x512) took 0.41-0.54 s that way and 0.05-0.07 s with
freed memory kept (benchmarks/RESULTS.md). So glibc is told to serve large blocks from its
heap (`M_MMAP_MAX` = 0) and to give back free memory at the heap's top only beyond 1 GiB
(`M_TRIM_THRESHOLD`): a step's transient arrays are reused from step to step, and the
process keeps at most about 1 GiB more than it uses once they are freed (plus holes between
live blocks, as any heap). Those settings hold for glibc's main arena, and a thread gets an
arena of its own (the server generates on a worker thread: 8,193 faults for a 32 MB op
there, none on the main thread), so every thread shares the main arena (`M_ARENA_MAX` = 1).

Called from `bonsai_mlx/__init__.py`; a no-op off glibc. BONSAI_MALLOC_DEFAULT=1 opts out.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc <malloc.h>
TRIM_THRESHOLD_BYTES = 1 << 30
_KEPT = False


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed memory instead of unmapping it; return whether it
    did (False off Linux / glibc, or with BONSAI_MALLOC_DEFAULT=1)."""
    global _KEPT
    if _KEPT:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("BONSAI_MALLOC_DEFAULT"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing
    _KEPT = all(mallopt(option, value) for option, value in (
        (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)))
    return _KEPT


class _Mallinfo2(ctypes.Structure):  # glibc >= 2.33 <malloc.h>
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def free_bytes() -> int:
    """Bytes glibc holds freed in this process for reuse (mallinfo2's `fordblks`: free
    chunks and the heap's top), which the next arrays take before asking the system; 0 off
    glibc >= 2.33. MemAvailable does not count them: they are this process's."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return 0
    mallinfo2.restype = _Mallinfo2
    return int(mallinfo2().fordblks)


def malloc_status() -> dict:
    """{"keeps_freed_memory": bool} for diagnostics."""
    return {"keeps_freed_memory": _KEPT}
