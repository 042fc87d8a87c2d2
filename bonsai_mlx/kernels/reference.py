"""Packed binary / ternary matmul in plain MLX ops: runs on every backend (CPU, Metal, CUDA).

This is the ground truth the Metal kernels are checked against. The byte layout
(docs/formats.md):

- binary: `packed` uint32 (N, K/32); bit j (LSB first) of word w of row n is weight
  (n, 32*w + j); bit 1 -> +s, bit 0 -> -s.
- ternary: `packed` uint8 (N, ceil(K/5)); byte b holds weights 5b .. 5b+4 as base-3 digits,
  least significant first, digit t = q + 1 (0 -> -s, 1 -> 0, 2 -> +s).
- `scales` float16 (N, K/128): one scale per group of 128 consecutive inputs.

The matmuls dequantise a block of output rows at a time to float32 and multiply, so the
transient memory stays below `_BLOCK_ELEMENTS` floats whatever the layer size.
"""

from __future__ import annotations

import mlx.core as mx

GROUP_SIZE = 128  # inputs per float16 scale, both formats (packed.h: GROUP)
_BLOCK_ELEMENTS = 1 << 24  # dequantised floats per block: 64 MB in float32

_SHIFTS = mx.arange(32, dtype=mx.uint32)
# _TRITS[byte] = the five digits of byte in base 3, least significant first, minus 1.
_TRITS = mx.array([[(b // 3**i) % 3 - 1 for i in range(5)] for b in range(256)], dtype=mx.int8)


def packed_k(packed: mx.array, scales: mx.array) -> int:
    """Input features K of a packed weight (binary: 32 per word; ternary: from the scales)."""
    return packed.shape[1] * 32 if packed.dtype == mx.uint32 else scales.shape[1] * GROUP_SIZE


def unpack_binary(packed: mx.array) -> mx.array:
    """uint32 (N, K/32) -> int8 (N, K) in {-1, +1}."""
    bits = (packed[..., None] >> _SHIFTS) & 1  # (N, K/32, 32)
    return (bits.astype(mx.int8) * 2 - 1).reshape(*packed.shape[:-1], -1)


def unpack_ternary(packed: mx.array, k: int) -> mx.array:
    """uint8 (N, ceil(K/5)) -> int8 (N, K) in {-1, 0, +1}."""
    trits = _TRITS[packed.astype(mx.int32)]  # (N, B, 5)
    return trits.reshape(*packed.shape[:-1], -1)[..., :k]


def _apply_scales(q: mx.array, scales: mx.array, dtype: mx.Dtype) -> mx.array:
    n, k = q.shape
    g = scales.shape[-1]
    if g * GROUP_SIZE != k:
        raise ValueError(f"scales {scales.shape} do not match K={k} (group size {GROUP_SIZE})")
    w = q.reshape(n, g, GROUP_SIZE).astype(mx.float32) * scales.astype(mx.float32)[..., None]
    return w.reshape(n, k).astype(dtype)


def dequantize_binary(packed: mx.array, scales: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Binary packed weight -> dense (N, K) in `dtype`."""
    return _apply_scales(unpack_binary(packed), scales, dtype)


def dequantize_ternary(
    packed: mx.array, scales: mx.array, k: int, dtype: mx.Dtype = mx.float32
) -> mx.array:
    """Ternary packed weight -> dense (N, K) in `dtype`."""
    return _apply_scales(unpack_ternary(packed, k), scales, dtype)


def _blocked_matmul(x: mx.array, n: int, k: int, dequantize_rows) -> mx.array:
    """x (..., K) @ W.T with W dequantised `rows` output rows at a time, float32 accumulation."""
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the packed weight expects {k}")
    x32 = x.astype(mx.float32)
    rows = max(1, _BLOCK_ELEMENTS // k)
    outs = [x32 @ dequantize_rows(i, min(i + rows, n)).T for i in range(0, n, rows)]
    y = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)
    return y.astype(x.dtype)


def binary_matmul(x: mx.array, packed: mx.array, scales: mx.array) -> mx.array:
    """x (..., K) @ W.T -> (..., N) for a binary packed W; output in x's dtype."""
    n, k = packed.shape[0], packed.shape[1] * 32
    return _blocked_matmul(
        x, n, k, lambda a, b: dequantize_binary(packed[a:b], scales[a:b], mx.float32)
    )


def ternary_matmul(x: mx.array, packed: mx.array, scales: mx.array) -> mx.array:
    """x (..., K) @ W.T -> (..., N) for a ternary packed W; output in x's dtype."""
    n, k = packed.shape[0], scales.shape[1] * GROUP_SIZE
    return _blocked_matmul(
        x, n, k, lambda a, b: dequantize_ternary(packed[a:b], scales[a:b], k, mx.float32)
    )
