"""Self-check of each Metal kernel before its first use on a device, with a fallback.

No kernel is trusted on a device it has not been seen to work on. The first time a kernel
("gemv", "gemm", "dequantize") x format ("binary", "ternary") x activation dtype is about to
run, it runs once on small random problems with awkward shapes, one per compiled variant
(every M of the small-M kernel, both GEMM tile heights; edges in M and N, every loop over K),
and its outputs are compared with the plain-MLX reference (`reference.py`). An
exception (compile or launch error), a non-finite output or a mismatch beyond tolerance makes
the kernel unusable for the process: one `KernelFallbackWarning` line names it, the MLX and
OS versions and the chip, and its calls take the reference path (stock MLX ops only).

On a real device the check runs in a child process (`python -m bonsai_mlx.kernels.selfcheck`):
a kernel that faults on the GPU aborts its process from a Metal completion handler, where no
Python code can catch it. Verdicts are cached on disk (`$BONSAI_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/bonsai-mlx/kernels`, default ~/.cache) under a key of the bonsai-mlx and MLX
versions, the OS build, the chip and the kernel's source hash, so the check costs once per
machine; a corrupt entry is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from bonsai_mlx import __version__
from bonsai_mlx.kernels import device, metal, reference
from bonsai_mlx.kernels.device import Device

import mlx.core as mx
import numpy as np

KERNELS = ("gemv", "gemm", "dequantize")
FORMATS = ("binary", "ternary")
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# (M, N, K) problems per kernel, one per compiled variant: the GEMV for every M (a template
# parameter), the GEMM with 64- and 32-row tiles. N off every tile edge, K > 1024 (more than 8
# scale groups) and, for the GEMV, more lanes' slices than one pass (each lane loops). The
# first failing problem decides the verdict.
PROBLEMS = {
    "gemv": [(m, 37, 2176) for m in range(1, metal.GEMV_MAX_M + 1)],
    "gemm": [(70, 67, 1152), (33, 67, 1152)],
    "dequantize": [(1, 37, 1152)],
}
RTOL = {"bfloat16": 2.0**-8, "float16": 2.0**-10, "float32": 2.0**-23}
# The GEMM stages scaled weights in the activation dtype: in bfloat16 a float16 scale is
# rounded (relative 2^-9), an error bounded by 2^-9 * sum |x| |w| (docs/kernels.md).
STAGED_WEIGHT_RTOL = {"bfloat16": 2.0**-9, "float16": 0.0, "float32": 0.0}
CHILD_TIMEOUT_S = 120.0
_LINE = "bonsai-selfcheck "  # prefix of the child's result lines on stdout


class KernelFallbackWarning(UserWarning):
    """A Metal kernel failed its self-check; its calls take the reference path."""


@dataclass
class Verdict:
    """The outcome of one kernel's self-check."""

    kernel: str
    fmt: str
    dtype: str
    usable: bool
    reason: str = ""
    error_ratio: float | None = None  # worst |kernel - reference| / tolerance (< 1 passes)
    seconds: float = 0.0
    cached: bool = False

    @property
    def id(self) -> str:
        return kernel_id(self.kernel, self.fmt, self.dtype)


def kernel_id(kernel: str, fmt: str, dtype: str | mx.Dtype) -> str:
    """"gemm/binary/bfloat16"."""
    if not isinstance(dtype, str):
        dtype = str(dtype).removeprefix("mlx.core.")
    return f"{kernel}/{fmt}/{dtype}"


def all_ids() -> list[str]:
    return [kernel_id(k, f, d) for f in FORMATS for d in DTYPES for k in KERNELS]


# ----------------------------------------------------------------------------------------
# The check itself (in this process, on device.current())


def random_problem(fmt: str, dtype: mx.Dtype, m: int, n: int, k: int,
                   seed: int = 0) -> tuple[mx.array, mx.array, mx.array]:
    """x (M, K) in `dtype` and a random packed W (N, K): (x, packed, scales)."""
    rng = np.random.default_rng(seed)
    if fmt == "binary":
        packed = mx.array(rng.integers(0, 2**32, size=(n, k // 32), dtype=np.uint32))
    else:
        packed = mx.array(rng.integers(0, 243, size=(n, -(-k // 5)), dtype=np.uint8))
    scales = mx.array(rng.uniform(0.25, 2.0, size=(n, k // 128)).astype(np.float16))
    x = mx.array(rng.standard_normal((m, k)).astype(np.float32)).astype(dtype)
    return x, packed, scales


def _run(kernel: str, fmt: str, dtype: mx.Dtype, m: int, n: int, k: int):
    """(kernel output, reference, error bound scale) as float32 arrays."""
    x, packed, scales = random_problem(fmt, dtype, m, n, k)
    if fmt == "binary":
        dense = reference.dequantize_binary(packed, scales, mx.float32)
    else:
        dense = reference.dequantize_ternary(packed, scales, k, mx.float32)
    if kernel == "dequantize":
        got = metal.dequantize(packed, scales, dtype, backend="metal")
        return got.astype(mx.float32), dense, mx.zeros_like(dense)
    got = metal.packed_matmul(x, packed, scales, backend="metal", kernel=kernel)
    x32 = x.astype(mx.float32)
    return got.astype(mx.float32), x32 @ dense.T, mx.abs(x32) @ mx.abs(dense).T


def _summary(e: BaseException) -> str:
    """One line for an exception: its first line and, for a compiler log (MLX puts the Metal
    compiler's output after "Unable to build metal library"), the first error in it."""
    lines = [line.strip() for line in str(e).strip().splitlines()] or [""]
    errors = [line for line in lines[1:] if "error" in line.lower()]
    text = lines[0] + (f" | {errors[0]}" if errors else "")
    return f"{type(e).__name__}: {text[:300]}"


def check(kid: str) -> Verdict:
    """Run one kernel ("gemm/binary/bfloat16") on each of its problems and judge it: usable
    if every problem passes; else the first failure's reason."""
    kernel, fmt, dtype = kid.split("/")
    start = time.perf_counter()
    verdict = Verdict(kernel, fmt, dtype, usable=True, error_ratio=0.0)
    for problem in PROBLEMS[kernel]:
        reason, ratio = _judge(kernel, fmt, dtype, problem)
        verdict.error_ratio = None if ratio is None or verdict.error_ratio is None \
            else max(verdict.error_ratio, ratio)
        if reason:
            verdict.usable = False
            verdict.reason = "{} (M={}, N={}, K={})".format(reason, *problem)
            break
    verdict.seconds = time.perf_counter() - start
    return verdict


def _judge(kernel: str, fmt: str, dtype: str, problem) -> tuple[str, float | None]:
    """(why one problem fails, or "", and its worst |kernel - reference| / tolerance)."""
    try:
        outputs = _run(kernel, fmt, DTYPES[dtype], *problem)
        mx.eval(*outputs)
        got, want, bound = (np.array(a, dtype=np.float64) for a in outputs)
    except Exception as e:  # compile errors, launch errors: anything means "do not use"
        return _summary(e), None
    if got.shape != want.shape:
        return f"output shape {got.shape}, expected {want.shape}", None
    weight_rtol = STAGED_WEIGHT_RTOL[dtype] if kernel == "gemm" else 0.0
    tol = 2 * RTOL[dtype] * np.abs(want) + (1e-4 + weight_rtol) * bound + 1e-6
    err = np.abs(got - want)
    ratio = float(np.nan_to_num(err / tol, nan=np.inf, posinf=np.inf).max(initial=0.0))
    if not np.isfinite(got).all():
        return f"{int((~np.isfinite(got)).sum())} of {got.size} outputs not finite", ratio
    if (err > tol).any():
        return (f"{int((err > tol).sum())} of {got.size} outputs off (max error "
                f"{err.max():.3g}, expected values up to {np.abs(want).max():.3g})"), ratio
    return "", ratio


# ----------------------------------------------------------------------------------------
# In a child process (real devices)


def _factory_spec(dev: Device) -> str:
    f = dev.factory
    return f if isinstance(f, str) else f"{f.__module__}:{f.__qualname__}"


def _child_run(dev: Device, ids: list[str]) -> tuple[dict[str, Verdict], str | None, str, bool]:
    """Run `ids` in one child: (verdicts it reported, the id it died on, why it died, whether
    the kernel killed it: a signal, not a time-out or an error of the child itself)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    spec = json.dumps({"chip": dev.chip, "factory": _factory_spec(dev)})
    cmd = [sys.executable, "-m", "bonsai_mlx.kernels.selfcheck", spec, *ids]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=CHILD_TIMEOUT_S)
        out, why = proc.stdout, _exit_reason(proc.returncode, proc.stderr)
        killed = proc.returncode < 0
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        why = f"the self-check did not finish within {CHILD_TIMEOUT_S:.0f} s"
        killed = False
    done: dict[str, Verdict] = {}
    started = None
    for line in out.splitlines():
        if not line.startswith(_LINE):
            continue
        record = json.loads(line[len(_LINE):])
        if "started" in record:
            started = record["started"]
        else:
            done[record["kernel"] + "/" + record["fmt"] + "/" + record["dtype"]] = \
                Verdict(**record)
            started = None
    return done, started, why, killed


def _exit_reason(code: int, stderr: str) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the self-check process died with {name} (a GPU fault aborts the process)"
    tail = stderr.strip().splitlines()[-1:] or [""]
    return f"the self-check process exited with status {code}: {tail[0][:240]}"


def _check_isolated(dev: Device, ids: list[str]) -> tuple[dict[str, Verdict], set[str]]:
    """Verdicts for `ids` from child processes, and the ids whose failure was the child's
    (time-out, start-up error), not the kernel's: those are not cached."""
    results: dict[str, Verdict] = {}
    transient: set[str] = set()
    todo = list(ids)
    while todo:
        done, died_on, why, killed = _child_run(dev, todo)
        results.update(done)
        culprit = died_on or next((i for i in todo if i not in done), None)
        if culprit is not None and culprit not in done:
            kernel, fmt, dtype = culprit.split("/")
            results[culprit] = Verdict(kernel, fmt, dtype, usable=False, reason=why)
            if not killed:
                transient.add(culprit)
        todo = [i for i in todo if i not in results]
    return results, transient


def _child_main(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    device.resolve_factory(spec["factory"])  # (failing here is the child's failure, not a verdict)
    dev = Device(chip=spec["chip"], has_metal=True, factory=spec["factory"], isolated=False)
    with device.use(dev):
        for kid in argv[1:]:
            print(_LINE + json.dumps({"started": kid}), flush=True)
            print(_LINE + json.dumps(asdict(check(kid))), flush=True)


# ----------------------------------------------------------------------------------------
# Verdict cache on disk


def cache_dir() -> Path:
    """Where verdicts are kept: $BONSAI_KERNEL_CACHE, else ~/.cache/bonsai-mlx/kernels."""
    return device.cache_folder("kernels", "BONSAI_KERNEL_CACHE")


def cache_key(dev: Device, kernel: str) -> dict[str, str]:
    return {"bonsai_mlx": __version__, "mlx": mx.__version__, "os": device.os_build(),
            "chip": dev.chip, "factory": _factory_spec(dev), "source": metal.source_hash(kernel)}


def _cache_path(dev: Device, kid: str) -> tuple[Path, dict[str, str]]:
    key = cache_key(dev, kid.split("/")[0])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{kid.replace('/', '-')}-{digest}.json", key


def _load(dev: Device, kid: str) -> Verdict | None:
    path, key = _cache_path(dev, kid)
    try:
        record = json.loads(path.read_text())
        if record.pop("key") != key:
            return None
        verdict = Verdict(**record)
        if verdict.id != kid or not isinstance(verdict.usable, bool):
            return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # missing or corrupt: check again
    verdict.cached = True
    return verdict


def _store(dev: Device, verdict: Verdict) -> None:
    from bonsai_mlx.weights import atomic_path

    path, key = _cache_path(dev, verdict.id)
    record = dict(asdict(verdict), key=key, cached=False)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=1))
    except OSError:
        pass  # an unwritable cache costs a check per process, nothing else


# ----------------------------------------------------------------------------------------
# Verdicts for the dispatcher and `bonsai-mlx doctor`

_LOCK = threading.RLock()
_known: dict[tuple[Device, str], Verdict] = {}
_warned: set[tuple[Device, str]] = set()


def verdicts(ids: list[str], *, recheck: bool = False) -> dict[str, Verdict]:
    """Verdicts for kernel ids on the current device: remembered, cached on disk, or checked
    now (in a child process when the device is isolated). `recheck` ignores both caches."""
    dev = device.current()
    with _LOCK:
        out: dict[str, Verdict] = {}
        for kid in ids:
            v = None if recheck else (_known.get((dev, kid)) or _load(dev, kid))
            if v is not None:
                out[kid] = v
        todo = [kid for kid in ids if kid not in out]
        if todo:
            if dev.isolated:
                fresh, transient = _check_isolated(dev, todo)
            else:
                fresh, transient = {k: check(k) for k in todo}, set()
            for kid, v in fresh.items():
                if kid not in transient:
                    _store(dev, v)
            out.update(fresh)
        for kid, v in out.items():
            _known[(dev, kid)] = v
        return out


def usable(kernel: str, fmt: str, dtype: mx.Dtype) -> bool:
    """Whether a kernel may run on the current device; warns once per process if not."""
    kid = kernel_id(kernel, fmt, dtype)
    dev = device.current()
    with _LOCK:
        verdict = _known.get((dev, kid))
        if verdict is None:
            # A child process costs more than the checks: check the format's kernels together.
            group = [kernel_id(k, fmt, dtype) for k in KERNELS] if dev.isolated else [kid]
            verdict = verdicts(group)[kid]
        if not verdict.usable and (dev, kid) not in _warned:
            _warned.add((dev, kid))
            warnings.warn(fallback_message(dev, verdict), KernelFallbackWarning, stacklevel=4)
    return verdict.usable


def fallback_message(dev: Device, verdict: Verdict) -> str:
    """The one line a failed kernel is reported with."""
    cached = " (cached verdict)" if verdict.cached else ""
    return (f"Metal kernel {verdict.kernel} ({verdict.fmt}, {verdict.dtype}) failed its "
            f"self-check{cached} on {dev.chip}, {device.os_build()}, MLX {mx.__version__}: "
            f"{verdict.reason}; its calls use the plain-MLX reference path (slower). Run "
            "`bonsai-mlx doctor` and paste its output in a bug report.")


def forget() -> None:
    """Drop this process's verdicts and warnings (tests; `doctor --recheck`)."""
    with _LOCK:
        _known.clear()
        _warned.clear()


if __name__ == "__main__":
    _child_main(sys.argv[1:])
