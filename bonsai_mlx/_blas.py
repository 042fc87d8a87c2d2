"""Use OpenBLAS for MLX's CPU matmuls on Linux when it is installed.

MLX's Linux CPU wheel bundles a slow reference BLAS (~4 GFLOP/s for float32 matmul on
a 2-core x86 box). Loading OpenBLAS with RTLD_GLOBAL *before* `mlx.core` makes MLX bind
to it instead (~60-330 GFLOP/s; conv2d ~20x faster). This must run before the first
`import mlx.core` in the process, so `bonsai_mlx/__init__.py` calls it first thing.
Set BONSAI_NO_OPENBLAS=1 to opt out.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPENBLAS_LOADED = False


def preload_openblas() -> bool:
    """Load libopenblas globally if present on Linux; return whether it was loaded."""
    global OPENBLAS_LOADED
    if OPENBLAS_LOADED:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("BONSAI_NO_OPENBLAS"):
        return False
    if "mlx.core" in sys.modules:
        return False  # too late: MLX has already bound its BLAS symbols
    for name in ("libopenblas.so.0", "libopenblas.so"):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        OPENBLAS_LOADED = True
        return True
    return False


def openblas_status() -> dict:
    """What `bonsai-mlx doctor` reports: `loaded` (bool), `library` (path or None),
    `corename` (`openblas_get_corename()`, or None), `coretype` (an OPENBLAS_CORETYPE forced
    by bonsai-mlx, or None) and `verified` (a check of that choice, or None)."""
    status = {"loaded": OPENBLAS_LOADED, "library": None, "corename": None, "coretype": None,
              "verified": None}
    if not OPENBLAS_LOADED:
        return status
    try:  # the path of the library this process mapped
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libopenblas" in line}
        status["library"] = min(paths) if paths else None
        lib = ctypes.CDLL(status["library"] or "libopenblas.so.0")
        lib.openblas_get_corename.restype = ctypes.c_char_p
        status["corename"] = lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        pass
    return status
