"""Packed binary / ternary matmuls: raw packed arrays in, arrays out.

Which implementation runs (docs/kernels.md):

- On an Apple GPU (`mx.metal.is_available()`), the Metal kernels in `metal/`:
  M <= 8 rows -> small-M kernel; 8 < M < DEQUANT_MIN_M -> fused tiled GEMM;
  M >= DEQUANT_MIN_M -> dequantize the layer with the Metal kernel, then `mx.matmul`.
- Elsewhere, the plain-MLX reference (`reference.py`).
- `BONSAI_KERNELS` forces a path: `metal` (fused kernels for every M), `dequant`
  (dequantize + `mx.matmul`), `reference`, or `emulator` (the Metal kernels run in the CPU
  emulator: slow, for debugging on Linux).
"""

from __future__ import annotations

import math
import os

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.kernels import reference

import mlx.core as mx

# From this many rows on, dequantize + MLX's dense GEMM is expected to beat the fused kernel:
# dequantizing costs ~4 bytes of traffic per weight once, the GEMM 2*M flops per weight.
# An estimate, not yet measured on Apple hardware: benchmarks/kernels.py measures it.
DEQUANT_MIN_M = 512
PATHS = ("metal", "dequant", "reference", "emulator")


def kernel_path(m: int | None = None) -> str:
    """The path a matmul with `m` rows takes: "metal", "dequant", "reference" or "emulator"."""
    forced = os.environ.get("BONSAI_KERNELS", "").strip().lower()
    if forced:
        if forced not in PATHS:
            raise BonsaiError(
                f"BONSAI_KERNELS={forced!r} is not one of {', '.join(PATHS)}; unset it for "
                "the automatic choice"
            )
        if forced == "metal" and not mx.metal.is_available():
            raise BonsaiError(
                "BONSAI_KERNELS=metal needs an Apple GPU (mx.metal.is_available() is False); "
                "use BONSAI_KERNELS=emulator to run the Metal kernels on the CPU"
            )
        return forced
    if not mx.metal.is_available():
        return "reference"
    if m is not None and m >= DEQUANT_MIN_M:
        return "dequant"
    return "metal"


def _dequantize(packed: mx.array, scales: mx.array, k: int, dtype: mx.Dtype, path: str):
    if path in ("metal", "dequant") and mx.metal.is_available():
        from bonsai_mlx.kernels import metal

        return metal.dequantize(packed, scales, dtype, backend="metal")
    if path == "emulator":
        from bonsai_mlx.kernels import metal

        return metal.dequantize(packed, scales, dtype, backend="emulator")
    if packed.dtype == mx.uint32:
        return reference.dequantize_binary(packed, scales, dtype)
    return reference.dequantize_ternary(packed, scales, k, dtype)


def _matmul(x: mx.array, packed: mx.array, scales: mx.array, fallback) -> mx.array:
    path = kernel_path(math.prod(x.shape[:-1]))
    if path == "reference":
        return fallback(x, packed, scales)
    from bonsai_mlx.kernels import metal

    if path == "dequant":
        k = reference.packed_k(packed, scales)
        if x.shape[-1] != k:
            raise BonsaiError(f"input has {x.shape[-1]} features, the packed weight expects {k}")
        if mx.metal.is_available():
            return x @ _dequantize(packed, scales, k, x.dtype, path).T
        # CPU: float32 is the fast dtype there, and MLX's CPU bfloat16 matmul is less exact.
        w = _dequantize(packed, scales, k, mx.float32, path)
        return (x.astype(mx.float32) @ w.T).astype(x.dtype)
    return metal.packed_matmul(x, packed, scales, backend=path)


def binary_matmul(x: mx.array, packed: mx.array, scales: mx.array) -> mx.array:
    """x (..., K) @ W.T -> (..., N) for a binary packed W (uint32 (N, K/32)); x's dtype."""
    return _matmul(x, packed, scales, reference.binary_matmul)


def ternary_matmul(x: mx.array, packed: mx.array, scales: mx.array) -> mx.array:
    """x (..., K) @ W.T -> (..., N) for a ternary packed W (uint8 (N, ceil(K/5))); x's dtype."""
    return _matmul(x, packed, scales, reference.ternary_matmul)


def dequantize_binary(packed: mx.array, scales: mx.array, dtype: mx.Dtype = mx.float32):
    """Binary packed W -> dense (N, K) in `dtype`."""
    path = kernel_path()
    return _dequantize(packed, scales, packed.shape[1] * 32, dtype, path)


def dequantize_ternary(packed: mx.array, scales: mx.array, k: int, dtype: mx.Dtype = mx.float32):
    """Ternary packed W -> dense (N, K) in `dtype`."""
    path = kernel_path()
    return _dequantize(packed, scales, k, dtype, path)


__all__ = [
    "DEQUANT_MIN_M",
    "binary_matmul",
    "dequantize_binary",
    "dequantize_ternary",
    "kernel_path",
    "ternary_matmul",
]
