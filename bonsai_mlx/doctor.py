"""`bonsai-mlx doctor`: what bonsai-mlx runs on here, and whether each Metal kernel works.

Run it first on a Mac, and paste its output in a bug report. It reports the platform, chip,
memory, MLX version and backend, Metal availability, each Metal kernel's self-check verdict
(kernels/selfcheck.py; `--recheck` runs the checks again instead of reading the cache) with
its time against the reference path it falls back to, OpenBLAS and its core type on Linux,
the compilers the emulator (g++) and the MSL check (clang) use, and the Hugging Face cache
with the models in it. `--json` prints the same as one JSON object.

Exit status: 0 when every kernel is usable (or there is no Apple GPU: the reference path is
the design there), 1 when a kernel fell back, 2 on a user error.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

from bonsai_mlx import __version__, kernels
from bonsai_mlx.kernels import device, metal, reference, selfcheck
from bonsai_mlx.weights import human_bytes

import click
import mlx.core as mx

# The shape each usable kernel is timed at against its fallback: an attention projection of
# FLUX.2 [klein] 4B; M = 1 (small-M kernel), 256 image tokens (GEMM), the whole layer
# (dequantize).
TIMING_N_K = (3072, 3072)
TIMING_M = {"gemv": 1, "gemm": 256, "dequantize": 1}
TIMING_REPEATS = 5
ENV_VARS = ("BONSAI_KERNELS", "BONSAI_KERNEL_CACHE", "BONSAI_EMULATOR_CACHE",
            "BONSAI_EMULATOR_SCHEDULE", "BONSAI_NO_OPENBLAS", "OPENBLAS_CORETYPE",
            "BONSAI_OPENBLAS_CACHE", "BONSAI_MALLOC_DEFAULT", "HF_HOME", "HF_HUB_CACHE",
            "HF_HUB_OFFLINE", "XDG_CACHE_HOME")


def _seconds(fn, repeats: int) -> float:
    mx.eval(fn())  # compile / warm up
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - start) / repeats


def time_kernel(kid: str) -> tuple[float, float]:
    """(kernel, reference fallback) milliseconds at the timing shape."""
    kernel, fmt, dtype = kid.split("/")
    n, k = TIMING_N_K
    x, packed, scales = selfcheck.random_problem(fmt, selfcheck.DTYPES[dtype],
                                                 TIMING_M[kernel], n, k)
    if kernel == "dequantize":
        def ours():
            return metal.dequantize(packed, scales, x.dtype, backend="metal")

        def fallback():
            if fmt == "binary":
                return reference.dequantize_binary(packed, scales, x.dtype)
            return reference.dequantize_ternary(packed, scales, k, x.dtype)
    else:
        def ours():
            return metal.packed_matmul(x, packed, scales, backend="metal", kernel=kernel)

        def fallback():
            return (reference.binary_matmul if fmt == "binary" else reference.ternary_matmul)(
                x, packed, scales)
    return (1e3 * _seconds(ours, TIMING_REPEATS), 1e3 * _seconds(fallback, TIMING_REPEATS))


def kernel_report(recheck: bool = False) -> dict[str, Any]:
    """The path the packed matmuls take here and, on a Metal device, every kernel's verdict."""
    forced = os.environ.get("BONSAI_KERNELS", "").strip().lower() or None
    kernels.kernel_path()  # a bad BONSAI_KERNELS is a user error (exit 2)
    dev = device.current()
    if not dev.has_metal:
        return {"forced": forced, "note": "no Apple GPU: reference path", "verdicts": []}
    if recheck:
        selfcheck.forget()
    rows = []
    for kid, verdict in selfcheck.verdicts(selfcheck.all_ids(), recheck=recheck).items():
        row = dict(asdict(verdict), id=kid, kernel_ms=None, fallback_ms=None)
        if verdict.usable:
            row["kernel_ms"], row["fallback_ms"] = time_kernel(kid)
        rows.append(row)
    return {"forced": forced, "device": dev.chip, "cache": str(selfcheck.cache_dir()),
            "verdicts": rows}


def _tool(path: str | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        version = (out.stdout.strip().splitlines() or [""])[0]
    except (OSError, subprocess.SubprocessError):
        version = "?"
    return {"path": path, "version": version}


def compilers() -> dict[str, Any]:
    """g++ (or $CXX) for the Metal emulator, clang for the MSL check: path and version."""
    from bonsai_mlx.kernels import msl_check

    cxx = shutil.which(os.environ.get("CXX", "g++"))
    return {"emulator": _tool(cxx), "msl_check": _tool(msl_check.clang())}


def hf_cache() -> dict[str, Any]:
    """The Hugging Face cache folder and the models in it, largest first."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    folder = str(constants.HF_HUB_CACHE)
    try:
        info = scan_cache_dir(folder)
    except CacheNotFound:
        return {"folder": folder, "models": [], "note": "does not exist yet (nothing downloaded)"}
    except (OSError, ValueError) as e:
        return {"folder": folder, "models": [], "note": f"unreadable: {e}"}
    models = [{"repo": r.repo_id, "bytes": r.size_on_disk, "files": r.nb_files}
              for r in info.repos if r.repo_type == "model"]
    return {"folder": folder, "models": sorted(models, key=lambda m: -m["bytes"])}


def report(recheck: bool = False) -> dict[str, Any]:
    """Everything `bonsai-mlx doctor` prints, as a JSON-ready dict."""
    from bonsai_mlx._blas import openblas_status
    from bonsai_mlx.bench import machine_info

    machine = machine_info()
    return {
        "bonsai_mlx": __version__,
        "platform": platform.platform(),
        "os": device.os_build(),
        "python": platform.python_version(),
        "chip": machine["chip"],
        "cpu": machine["cpu"],
        "cpu_count": machine["cpu_count"],
        "memory_bytes": machine["memory_bytes"],
        "mlx": mx.__version__,
        "backend": machine["backend"],
        "metal": device.current().has_metal,
        "kernels": kernel_report(recheck),
        "openblas": openblas_status() if sys.platform.startswith("linux") else None,
        "compilers": compilers(),
        "huggingface_cache": hf_cache(),
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def fell_back(rep: dict[str, Any]) -> list[str]:
    """Kernel ids whose self-check failed."""
    return [row["id"] for row in rep["kernels"]["verdicts"] if not row["usable"]]


def _human(n: float | None) -> str:
    return "unknown" if n is None else human_bytes(n)


def _kernel_lines(k: dict[str, Any]) -> list[str]:
    forced = f" (BONSAI_KERNELS={k['forced']} forces a path)" if k["forced"] else ""
    if not k["verdicts"]:
        return [f"kernels     {k['note']}{forced}"]
    lines = [f"kernels     {k['device']}{forced}; verdicts cached in {k['cache']} (--recheck "
             "runs the checks again)",
             f"  {'kernel/format/dtype':<28} {'verdict':<10} {'kernel ms':>10} "
             f"{'fallback ms':>12}"]
    for row in k["verdicts"]:
        if row["usable"]:
            lines.append(f"  {row['id']:<28} {'ok':<10} {row['kernel_ms']:>10.3f} "
                         f"{row['fallback_ms']:>12.3f}")
        else:
            lines.append(f"  {row['id']:<28} FELL BACK: {row['reason']}")
    return lines


def _tool_line(name: str, tool: dict[str, str] | None, use: str) -> str:
    if tool is None:
        return f"  {name:<10} not found ({use} unavailable)"
    return f"  {name:<10} {tool['version']} ({tool['path']}): {use}"


def format_report(rep: dict[str, Any]) -> str:
    """The text `bonsai-mlx doctor` prints: one fact a line, ready to paste."""
    lines = [f"bonsai-mlx {rep['bonsai_mlx']} doctor",
             f"platform    {rep['os']}"
             + (f" ({rep['platform']})" if rep["platform"] != rep["os"] else "")
             + f", Python {rep['python']}",
             f"chip        {rep['chip']}; CPU {rep['cpu']} ({rep['cpu_count']} cores); memory "
             f"{_human(rep['memory_bytes'])}",
             f"MLX         {rep['mlx']}, backend {rep['backend']}",
             f"Metal       {'available' if rep['metal'] else 'not available'}"]
    lines += _kernel_lines(rep["kernels"])
    blas = rep["openblas"]
    if blas is not None:
        state = (f"{blas['library']}, core {blas['corename']}" if blas["loaded"]
                 else "not loaded (MLX's bundled reference BLAS: slow float32 matmuls)")
        forced = f", OPENBLAS_CORETYPE={blas['coretype']}" if blas.get("coretype") else ""
        lines.append(f"OpenBLAS    {state}{forced}")
    c = rep["compilers"]
    lines += ["compilers", _tool_line("g++", c["emulator"], "Metal emulator tests"),
              _tool_line("clang", c["msl_check"], "MSL front-end check")]
    hf = rep["huggingface_cache"]
    lines.append(f"HF cache    {hf['folder']}: " + (hf.get("note") or
                 f"{len(hf['models'])} model(s), {_human(sum(m['bytes'] for m in hf['models']))}"))
    lines += [f"  {m['repo']:<50} {_human(m['bytes']):>10}" for m in hf["models"]]
    lines += [f"env         {k}={v}" for k, v in rep["environment"].items()]
    bad = fell_back(rep)
    lines.append(f"result      {len(bad)} kernel(s) fell back to the reference path: paste "
                 "this output in a bug report" if bad else "result      ok")
    return "\n".join(lines)


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--recheck", is_flag=True, help="Run every kernel's self-check again.")
def doctor_command(as_json: bool, recheck: bool) -> int:
    """Check this machine: Metal kernels (self-check and speed), BLAS, compilers, cached
    models. Exit 0 if every kernel is usable, 1 if one fell back, 2 on a user error."""
    rep = report(recheck)
    click.echo(json.dumps(rep, indent=1) if as_json else format_report(rep))
    return 1 if fell_back(rep) else 0

