"""Packed binary / ternary matmuls: raw packed arrays in, arrays out.

Which implementation runs (docs/kernels.md):

- On an Apple GPU (`device.current().has_metal`), the Metal kernels in `metal/`:
  M <= 8 rows -> small-M kernel; 8 < M < DEQUANT_MIN_M -> fused tiled GEMM;
  M >= DEQUANT_MIN_M -> dequantize the layer with the Metal kernel, then `mx.matmul`.
  Each kernel passes its self-check (`selfcheck.py`) before its first use, or its calls take
  the reference path, with one warning.
- Elsewhere, the plain-MLX reference (`reference.py`).
- `BONSAI_KERNELS` forces a path, without self-checks: `metal` (fused kernels for every M),
  `dequant` (dequantize + `mx.matmul`), `reference` (never touches a custom kernel), or
  `emulator` (the Metal kernels run in the CPU emulator: slow, for debugging on Linux).
"""

from __future__ import annotations

import math
import os

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.kernels import device, reference

import mlx.core as mx

# From this many rows on, dequantize + MLX's dense GEMM is expected to beat the fused kernel:
# dequantizing costs ~4 bytes of traffic per weight once, the GEMM 2*M flops per weight.
# An estimate, not yet measured on Apple hardware: benchmarks/kernels.py measures it.
DEQUANT_MIN_M = 512
PATHS = ("metal", "dequant", "reference", "emulator")


def _forced_path() -> str | None:
    forced = os.environ.get("BONSAI_KERNELS", "").strip().lower()
    if not forced:
        return None
    if forced not in PATHS:
        raise BonsaiError(
            f"BONSAI_KERNELS={forced!r} is not one of {', '.join(PATHS)}; unset it for "
            "the automatic choice"
        )
    if forced == "metal" and not device.current().has_metal:
        raise BonsaiError(
            "BONSAI_KERNELS=metal needs an Apple GPU (mx.metal.is_available() is False); "
            "use BONSAI_KERNELS=emulator to run the Metal kernels on the CPU"
        )
    return forced


def metal_kernel_for(path: str, m: int | None) -> str:
    """The Metal kernel a path runs for m rows (None: a dequantize call)."""
    from bonsai_mlx.kernels import metal

    if path == "dequant" or m is None:
        return "dequantize"
    return "gemv" if m <= metal.GEMV_MAX_M else "gemm"


def kernel_path(m: int | None = None, fmt: str | None = None, dtype: mx.Dtype | None = None) -> str:
    """The path a matmul with `m` rows takes (m None: a dequantize call): "metal", "dequant",
    "reference" or "emulator". With `fmt` ("binary" / "ternary") and the activation `dtype`,
    a Metal kernel that failed its self-check on this device gives "reference"."""
    forced = _forced_path()
    if forced:
        return forced
    if not device.current().has_metal:
        return "reference"
    path = "dequant" if m is not None and m >= DEQUANT_MIN_M else "metal"
    if fmt is None or dtype is None:
        return path
    from bonsai_mlx.kernels import metal, selfcheck

    if dtype not in metal.ACTIVATION_DTYPES:
        return "reference"
    return path if selfcheck.usable(metal_kernel_for(path, m), fmt, dtype) else "reference"


def _format(packed: mx.array) -> str:
    return "binary" if packed.dtype == mx.uint32 else "ternary"


def _dequantize(packed: mx.array, scales: mx.array, k: int, dtype: mx.Dtype, path: str):
    if path == "emulator" or (path in ("metal", "dequant") and device.current().has_metal):
        from bonsai_mlx.kernels import metal

        backend = "emulator" if path == "emulator" else "metal"
        return metal.dequantize(packed, scales, dtype, backend=backend)
    if packed.dtype == mx.uint32:
        return reference.dequantize_binary(packed, scales, dtype)
    return reference.dequantize_ternary(packed, scales, k, dtype)


def _matmul(x: mx.array, packed: mx.array, scales: mx.array, fallback) -> mx.array:
    path = kernel_path(math.prod(x.shape[:-1]), _format(packed), x.dtype)
    if path == "reference":
        return fallback(x, packed, scales)
    if path == "dequant":
        k = reference.packed_k(packed, scales)
        if x.shape[-1] != k:
            raise BonsaiError(f"input has {x.shape[-1]} features, the packed weight expects {k}")
        if device.current().has_metal:
            return x @ _dequantize(packed, scales, k, x.dtype, path).T
        # CPU: float32 is the fast dtype there, and MLX's CPU bfloat16 matmul is less exact.
        w = _dequantize(packed, scales, k, mx.float32, path)
        return (x.astype(mx.float32) @ w.T).astype(x.dtype)
    from bonsai_mlx.kernels import metal

    return metal.packed_matmul(x, packed, scales, backend=path)


def binary_matmul(x: mx.array, packed: mx.array, scales: mx.array) -> mx.array:
    """x (..., K) @ W.T -> (..., N) for a binary packed W (uint32 (N, K/32)); x's dtype."""
    return _matmul(x, packed, scales, reference.binary_matmul)


def ternary_matmul(x: mx.array, packed: mx.array, scales: mx.array) -> mx.array:
    """x (..., K) @ W.T -> (..., N) for a ternary packed W (uint8 (N, ceil(K/5))); x's dtype."""
    return _matmul(x, packed, scales, reference.ternary_matmul)


def dequantize_binary(packed: mx.array, scales: mx.array,
                      dtype: mx.Dtype = mx.float32) -> mx.array:
    """Binary packed W -> dense (N, K) in `dtype`."""
    path = kernel_path(None, "binary", dtype)
    return _dequantize(packed, scales, packed.shape[1] * 32, dtype, path)


def dequantize_ternary(packed: mx.array, scales: mx.array, k: int,
                       dtype: mx.Dtype = mx.float32) -> mx.array:
    """Ternary packed W -> dense (N, K) in `dtype`."""
    path = kernel_path(None, "ternary", dtype)
    return _dequantize(packed, scales, k, dtype, path)


__all__ = [
    "DEQUANT_MIN_M",
    "binary_matmul",
    "dequantize_binary",
    "dequantize_ternary",
    "kernel_path",
    "ternary_matmul",
]
