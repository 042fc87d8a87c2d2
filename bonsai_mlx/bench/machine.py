"""The machine a benchmark ran on, and its approximate peak (the roofline's ceiling)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from bonsai_mlx import __version__

import mlx.core as mx

# Approximate dense 16-bit peak TFLOP/s. Apple GPUs run FP16 at their FP32 FMA rate
# (cores x 128 ALUs x 2 FLOP x clock); per-core figures are derived from Apple's and
# reviewers' published totals and are good to ~10%. M5's GPU neural accelerators are not
# counted (a fraction above 1 is possible there). NVIDIA: dense BF16 tensor-core figures
# from the datasheets, no sparsity. CPUs: unknown (n/a).
APPLE_GPU_TFLOPS_PER_CORE = {"M1": 0.33, "M2": 0.36, "M3": 0.41, "M4": 0.44, "M5": 0.45}
APPLE_GPU_DEFAULT_CORES = {  # the largest GPU of each variant, used when the count is unknown
    "M1": 8, "M1 Pro": 16, "M1 Max": 32, "M1 Ultra": 64,
    "M2": 10, "M2 Pro": 19, "M2 Max": 38, "M2 Ultra": 76,
    "M3": 10, "M3 Pro": 18, "M3 Max": 40, "M3 Ultra": 80,
    "M4": 10, "M4 Pro": 20, "M4 Max": 40,
    "M5": 10,
}
NVIDIA_BF16_TFLOPS = (  # first match wins (substring of the device name)
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 4090", 165.0),
)



def backend() -> str:
    """'metal', 'cuda' or 'cpu': where MLX runs by default in this process."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "gpu"


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    if sys.platform == "darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "hw.memsize"])
        return int(out) if out.isdigit() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _apple_gpu_cores() -> int | None:
    out = _run(["system_profiler", "SPDisplaysDataType"])
    m = re.search(r"Total Number of Cores:\s*(\d+)", out)
    return int(m.group(1)) if m else None


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]  # the checkout holding bonsai_mlx/
    if not (root / ".git").exists():
        return None
    rev = _run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"])
    if not rev:
        return None
    dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return rev + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """Chip, CPU, memory, OS, MLX version and backend, bonsai-mlx version, git revision."""
    be = backend()
    try:
        device = mx.device_info()
    except Exception:  # not every backend reports it
        device = {}
    cpu = _cpu_model()
    chip = str(device.get("device_name") or cpu) if be != "cpu" else cpu
    info: dict[str, Any] = {
        "chip": chip,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "os": platform.platform(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "mlx_version": mx.__version__,
        "backend": be,
        "bonsai_mlx_version": __version__,
        "git_revision": _git_revision(),
    }
    if be == "metal":
        info["gpu_cores"] = _apple_gpu_cores()
    if be == "cpu":
        from bonsai_mlx._blas import openblas_status

        blas = openblas_status()
        info["blas"] = "openblas" if blas["loaded"] else "mlx bundled"
        info["openblas_core"] = blas["corename"]
    return info


def peak_tflops(machine: dict[str, Any]) -> tuple[float | None, str]:
    """(approximate dense 16-bit peak TFLOP/s, where the figure comes from) for a machine."""
    chip = machine.get("chip") or ""
    if machine.get("backend") == "metal":
        m = re.search(r"\b(M\d)(?:\s+(Pro|Max|Ultra))?\b", chip)
        if m and m.group(1) in APPLE_GPU_TFLOPS_PER_CORE:
            family = m.group(1)
            variant = f"{family} {m.group(2)}" if m.group(2) else family
            cores = machine.get("gpu_cores") or APPLE_GPU_DEFAULT_CORES.get(variant)
            if cores:
                peak = APPLE_GPU_TFLOPS_PER_CORE[family] * cores
                return round(peak, 2), f"approx. {variant} {cores}-core GPU FP16"
        return None, f"unknown Apple GPU {chip!r}"
    if machine.get("backend") == "cuda":
        for name, peak in NVIDIA_BF16_TFLOPS:
            if name.lower() in chip.lower():
                return peak, f"NVIDIA {name} dense BF16 (datasheet)"
        return None, f"unknown GPU {chip!r}"
    return None, "CPU peak unknown"

