"""Use OpenBLAS for MLX's CPU matmuls on Linux, with kernels that fit the CPU it runs on.

MLX's Linux CPU wheel bundles a slow reference BLAS (~4 GFLOP/s for float32 matmul on
a 2-core x86 box). Loading OpenBLAS with RTLD_GLOBAL *before* `mlx.core` makes MLX bind
to it instead (MLX calls only `cblas_sgemm` / `dgemm` / `cgemm`). This must run before the
first `import mlx.core` in the process, so `bonsai_mlx/__init__.py` calls it first thing.
Set BONSAI_NO_OPENBLAS=1 to opt out.

OpenBLAS picks its kernels once, when it loads, from the CPU model it recognises; an
OpenBLAS older than the CPU falls back to ancient ones (Debian's 0.3.21 runs SSE3
`Prescott` kernels on a Sapphire Rapids Xeon: 38 instead of 143 GFLOP/s). So on x86-64,
before loading it, a short child process loads it and reports the core it picked; when that
core's instruction set is below what the CPU's flags offer (AVX-512 > AVX2 > AVX > SSE), a
second child loads it with `OPENBLAS_CORETYPE` set to the best core the CPU supports and
checks one SGEMM against numpy; only if that agrees is the variable set for this process.
An `OPENBLAS_CORETYPE` the user set is left alone. On ARM, OpenBLAS tells cores apart by
part number, which flags cannot replace, so its own choice stands.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

LIBRARY_NAMES = ("libopenblas.so.0", "libopenblas.so")
# Caches the child's answer for processes this one starts (CLI tests, workers).
_PROBE_ENV = "BONSAI_OPENBLAS_DEFAULT_CORE"
_FORCED_ENV = "BONSAI_OPENBLAS_FORCED_CORE"  # marks an OPENBLAS_CORETYPE set by us

# Instruction-set tier of each x86 core name `openblas_get_corename()` returns (lowercase);
# names not listed (Prescott, Nehalem, Core2, Atom, ...) are SSE-only: tier 0.
_TIERS = {
    "sandybridge": 1, "bulldozer": 1, "piledriver": 1, "steamroller": 1,
    "haswell": 2, "excavator": 2, "zen": 2,
    "skylakex": 3, "cooperlake": 3, "sapphirerapids": 3,
}
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}

# One SGEMM through the loaded library, compared with numpy in float64. Odd sizes exercise
# the kernels' edge paths; large enough to use several threads.
_PROBE = r"""
import ctypes, json, sys
name, verify = sys.argv[1], sys.argv[2] == "1"
out = {"library": None, "corename": None, "verified": None}
try:
    lib = ctypes.CDLL(name)
except OSError:
    print(json.dumps(out)); sys.exit()
lib.openblas_get_corename.restype = ctypes.c_char_p
out["library"], out["corename"] = name, lib.openblas_get_corename().decode()
if verify:
    import numpy as np
    rng = np.random.default_rng(0)
    m, k, n = 193, 517, 301
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((n, k), dtype=np.float32)
    c = np.zeros((m, n), np.float32)
    p = ctypes.c_void_p
    lib.cblas_sgemm(101, 111, 112, m, n, k, ctypes.c_float(1.0), p(a.ctypes.data), k,
                    p(b.ctypes.data), k, ctypes.c_float(0.0), p(c.ctypes.data), n)
    ref = a.astype(np.float64) @ b.astype(np.float64).T
    out["verified"] = bool(np.abs(c - ref).max() <= 1e-4 * np.abs(ref).max())
print(json.dumps(out))
"""

_STATUS: dict = {"loaded": False, "library": None, "corename": None, "coretype": None,
                 "verified": None}


def openblas_status() -> dict:
    """What `preload_openblas` did: `loaded` (bool), `library` (path or None), `corename`
    (the kernels OpenBLAS runs, or None), `coretype` (the OPENBLAS_CORETYPE bonsai-mlx set,
    or None), `verified` (whether that core passed the SGEMM check; None when none was set)."""
    return dict(_STATUS)


def cpu_coretype(flags: set[str], vendor: str = "") -> str | None:
    """The best OpenBLAS x86-64 core name for a CPU with these /proc/cpuinfo flags, or None
    when it has nothing above SSE (or is not x86)."""
    if _AVX512 <= flags:
        if {"amx_bf16", "amx_tile", "avx512_bf16"} <= flags:
            return "SapphireRapids"
        return "Cooperlake" if "avx512_bf16" in flags else "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Zen" if "AMD" in vendor else "Haswell"
    return "Sandybridge" if "avx" in flags else None


def core_tier(corename: str | None) -> int:
    """0 (SSE) .. 3 (AVX-512): the instruction set of an OpenBLAS x86 core name."""
    return _TIERS.get((corename or "").lower(), 0)


def needs_coretype(target: str | None, picked: str | None) -> bool:
    """Whether OpenBLAS's own pick runs a lower instruction set than the CPU offers."""
    return target is not None and picked is not None and core_tier(picked) < core_tier(target)


def _cpu_info() -> tuple[set[str], str]:
    """(flags, vendor) of the first CPU in /proc/cpuinfo; empty off x86-64 Linux."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set(), ""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set(), ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return set(fields.get("flags", "").split()), fields.get("vendor_id", "")


def _probe(coretype: str | None, verify: bool) -> dict | None:
    """Load OpenBLAS in a child process (with OPENBLAS_CORETYPE=coretype when given) and
    return {library, corename, verified}; None when the child fails."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    for name in LIBRARY_NAMES:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _PROBE, name, str(int(verify))],
                                  env=env, capture_output=True, text=True, timeout=60)
            found = json.loads(done.stdout)
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        if found["library"]:
            return found
    return None


def _choose_coretype() -> str | None:
    """The OPENBLAS_CORETYPE to set before loading, or None to keep OpenBLAS's choice."""
    forced = os.environ.get("OPENBLAS_CORETYPE")
    if forced:  # the user's, or ours inherited from a parent process (already verified)
        if forced == os.environ.get(_FORCED_ENV):
            _STATUS.update(coretype=forced, verified=True)
        return None
    target = cpu_coretype(*_cpu_info())
    if target is None:
        return None
    picked = os.environ.get(_PROBE_ENV)
    if picked is None:
        probe = _probe(None, verify=False)
        if probe is None:
            return None
        picked = os.environ[_PROBE_ENV] = probe["corename"]
    if not needs_coretype(target, picked):
        return None
    probe = _probe(target, verify=True)
    ok = bool(probe and probe["verified"] and core_tier(probe["corename"]) > core_tier(picked))
    _STATUS["verified"] = ok
    return target if ok else None


def _library_path(name: str) -> str:
    """The file a loaded library name resolved to (from /proc/self/maps), else the name."""
    stem = name.split(".so")[0]
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "/" in path and Path(path).name.startswith(stem):
                return path
    except (OSError, IndexError):
        pass
    return name


def preload_openblas() -> bool:
    """Load libopenblas globally if present on Linux (with the core type chosen as the
    module docstring says); return whether it was loaded."""
    if _STATUS["loaded"]:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("BONSAI_NO_OPENBLAS"):
        return False
    if "mlx.core" in sys.modules:
        return False  # too late: MLX has already bound its BLAS symbols
    coretype = _choose_coretype()
    if coretype:
        os.environ["OPENBLAS_CORETYPE"] = os.environ[_FORCED_ENV] = coretype
        _STATUS["coretype"] = coretype
    for name in LIBRARY_NAMES:
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        corename = getattr(lib, "openblas_get_corename", None)
        if corename is not None:
            corename.restype = ctypes.c_char_p
            corename = corename().decode()
        _STATUS.update(loaded=True, library=_library_path(name), corename=corename)
        return True
    return False


def __getattr__(name: str):
    if name == "OPENBLAS_LOADED":  # the flag this module exposed before openblas_status()
        return _STATUS["loaded"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
