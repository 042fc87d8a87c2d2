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

Those child processes cost ~45 ms per `import bonsai_mlx` (two of them, ~0.3 s, where a core
type must be checked), so their verdict is kept on disk, in `$BONSAI_OPENBLAS_CACHE`, else
`$XDG_CACHE_HOME/bonsai-mlx/openblas` (default ~/.cache), under a key of the library file
(its real path, modification time and size, as found in the linker's folders without loading
it), the linker's cache and LD_LIBRARY_PATH, and the CPU (model name and flags): a machine
pays for them once per OpenBLAS. A verdict is written only when the child loaded that very
file; an unreadable, corrupt or mismatched one is a miss (probed again, then replaced).
Processes started from this one inherit the answer in the environment and read nothing.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import platform
import re
import stat
import sys
import zlib
from pathlib import Path

LIBRARY_NAMES = ("libopenblas.so.0", "libopenblas.so")
# Caches the child's answer for processes this one starts (CLI tests, workers).
_PROBE_ENV = "BONSAI_OPENBLAS_DEFAULT_CORE"
_FORCED_ENV = "BONSAI_OPENBLAS_FORCED_CORE"  # marks an OPENBLAS_CORETYPE set by us
CACHE_ENV = "BONSAI_OPENBLAS_CACHE"  # a folder for the verdicts instead of the default
_CACHE_VERSION = 1  # bump when the verdict's meaning changes
VERDICT_BYTES = 4096  # a kept verdict is ~0.5 KB; a larger file is not one of ours
CORE_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")  # what openblas_get_corename() returns

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
import ctypes, json, os, sys
name, verify = sys.argv[1], sys.argv[2] == "1"
out = {"library": None, "path": None, "corename": None, "verified": None}
try:
    lib = ctypes.CDLL(name)
except OSError:
    print(json.dumps(out)); sys.exit()
lib.openblas_get_corename.restype = ctypes.c_char_p
out["library"], out["corename"] = name, lib.openblas_get_corename().decode()
for line in open("/proc/self/maps"):
    mapped = line.split()[-1]
    if os.path.basename(mapped).startswith("libopenblas"):
        out["path"] = os.path.realpath(mapped)
        break
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


@functools.lru_cache(maxsize=1)
def _cpu_fields() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo; empty off x86-64 Linux."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_info() -> tuple[set[str], str]:
    """(flags, vendor) of the first CPU in /proc/cpuinfo; empty off x86-64 Linux."""
    fields = _cpu_fields()
    return set(fields.get("flags", "").split()), fields.get("vendor_id", "")


def _probe(coretype: str | None, verify: bool) -> dict | None:
    """Load OpenBLAS in a child process (with OPENBLAS_CORETYPE=coretype when given) and
    return {library, path, corename, verified}; None when the child fails."""
    import subprocess  # here: with a kept verdict, `import bonsai_mlx` never needs it

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
    if _PROBE_ENV in os.environ:  # a parent process asked OpenBLAS already
        return _verdict(target, os.environ[_PROBE_ENV])[0]["coretype"]
    if getattr(sys, "frozen", False):  # a bundled app: sys.executable is not a Python
        return None
    key = _cache_key()
    if key is None:  # no OpenBLAS file where the linker looks: nothing to probe, every time
        return None
    verdict = _read_verdict(key, target)
    if verdict is None:
        probe = _probe(None, verify=False)
        if probe is None:
            return None
        verdict, complete = _verdict(target, probe["corename"])
        if complete and key is not None and probe.get("path") == key["library"]:
            _write_verdict(key, verdict)
    elif verdict["verified"] is not None:
        _STATUS["verified"] = verdict["verified"]
    os.environ[_PROBE_ENV] = verdict["picked"]
    return verdict["coretype"]


def _verdict(target: str, picked: str) -> tuple[dict, bool]:
    """({picked, coretype, verified}, complete) for OpenBLAS's own pick on a CPU whose best
    core is `target`: a core type only if `picked` is below it and `target` passes the SGEMM
    check in a child. `complete` is False when that child failed (not worth keeping)."""
    if not needs_coretype(target, picked):
        return {"picked": picked, "coretype": None, "verified": None}, True
    probe = _probe(target, verify=True)
    ok = bool(probe and probe["verified"] and core_tier(probe["corename"]) > core_tier(picked))
    _STATUS["verified"] = ok
    return {"picked": picked, "coretype": target if ok else None, "verified": ok}, probe is not None


# ---------------------------------------------------------------------------------------
# The verdict on disk. This module runs before mlx.core may be imported, so it cannot use
# `weights.atomic_path` or `kernels.device.cache_folder` (both import MLX); it follows them.


def _cache_folder() -> Path | None:
    """$BONSAI_OPENBLAS_CACHE, else $XDG_CACHE_HOME/bonsai-mlx/openblas (default ~/.cache);
    None when that is not an absolute path (no home folder: nothing is kept)."""
    try:
        if os.environ.get(CACHE_ENV):
            folder = Path(os.environ[CACHE_ENV]).expanduser()
        else:
            base = (os.environ.get("XDG_CACHE_HOME")
                    or os.path.join(os.path.expanduser("~"), ".cache"))
            folder = Path(base) / "bonsai-mlx" / "openblas"
    except RuntimeError:  # "~user" of an unknown user
        return None
    return folder if folder.is_absolute() else None


def _library_dirs() -> list[str]:
    """Where the dynamic linker looks, in its order: LD_LIBRARY_PATH, the folders of
    /etc/ld.so.conf (and the files it includes), then the default ones."""
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    confs = ["/etc/ld.so.conf"]
    while confs:
        try:
            lines = Path(confs.pop(0)).read_text().splitlines()
        except OSError:
            continue
        for line in (ln.split("#")[0].strip() for ln in lines):
            if line.startswith("include "):
                import glob  # here: most processes read a kept verdict, needing no folder list

                confs += sorted(glob.glob(line.split(None, 1)[1]))
            elif line:
                dirs.append(line)
    arch = getattr(sys.implementation, "_multiarch", "")
    return dirs + [f"/lib/{arch}", f"/usr/lib/{arch}", "/lib64", "/usr/lib64", "/lib", "/usr/lib"]


def _find_library() -> str | None:
    """The real path of the OpenBLAS file `preload_openblas` would load, found without
    loading it (that would fix its core type); None when not found."""
    dirs = _library_dirs()
    for name in LIBRARY_NAMES:
        for folder in dirs:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                return os.path.realpath(path)
    return None


def _cache_key() -> dict | None:
    """What a verdict depends on (see the module docstring); None without a library file."""
    library = _find_library()
    try:
        info = os.stat(library) if library else None
    except OSError:
        info = None
    if info is None:
        return None
    try:
        linker_cache = os.stat("/etc/ld.so.cache").st_mtime_ns
    except OSError:
        linker_cache = None
    flags, vendor = _cpu_info()
    return {
        "version": _CACHE_VERSION, "library": library, "mtime_ns": info.st_mtime_ns,
        "size": info.st_size, "ld_so_cache_mtime_ns": linker_cache,
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
        "cpu": _cpu_fields().get("model name", ""), "vendor": vendor,
        "flags": _crc(" ".join(sorted(flags))),
    }


def _crc(text: str) -> str:
    """A short digest (zlib's CRC-32: no hashlib, which loads OpenSSL, on every import)."""
    return f"{zlib.crc32(text.encode()):08x}"


def _verdict_path(key: dict) -> Path | None:
    """The file of `key`'s verdict (the key inside it is compared in full when read)."""
    folder = _cache_folder()
    return None if folder is None else folder / f"core-{_crc(json.dumps(key, sort_keys=True))}.json"


def _read_small_file(path: Path) -> bytes:
    """A regular file of this user's, at most VERDICT_BYTES: never a link, a FIFO or a device
    (which could block or never end), nor a file another user planted (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise OSError(f"{path}: not a regular file of this user's")
        return os.read(fd, VERDICT_BYTES + 1)
    finally:
        os.close(fd)


def _read_verdict(key: dict | None, target: str) -> dict | None:
    """The kept verdict for `key`; None when there is none or it is unusable (a core type
    other than the CPU's best, `target`, is never one this module chose; OpenBLAS's pick
    must read as a core name)."""
    path = None if key is None else _verdict_path(key)
    if path is None:
        return None
    try:
        data = _read_small_file(path)
        if len(data) > VERDICT_BYTES:
            return None
        record = json.loads(data)
        verdict = {k: record[k] for k in ("picked", "coretype", "verified")}
        if (record["key"] != key or not isinstance(verdict["picked"], str)
                or not CORE_NAME.fullmatch(verdict["picked"])
                or verdict["coretype"] not in (None, target)
                or verdict["verified"] not in (True, False, None)):
            return None
    except Exception:  # missing, corrupt or hostile (deep nesting: RecursionError): probe
        return None
    return verdict


def _write_verdict(key: dict, verdict: dict) -> None:
    """Keep `verdict` under `key`: a temporary file renamed into place (readers never see a
    half-written one); an unwritable folder only costs the next process its probe."""
    import tempfile  # here: only the first process on a machine writes
    path = _verdict_path(key)
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".core-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, **verdict}, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


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
