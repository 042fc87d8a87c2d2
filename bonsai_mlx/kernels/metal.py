"""The Metal kernels for packed binary / ternary weights, through `mx.fast.metal_kernel`.

Sources live in `metal/` (repo) or `bonsai_mlx/metal/` (wheel): `packed.h` (formats, tile
sizes, decode helpers) and one body per kernel:

- `packed_gemm.metal`: fused tiled GEMM, W tiles unpacked into threadgroup memory,
  `simdgroup_matrix` 8x8 multiply-accumulate (any M; meant for M > 8);
- `packed_gemv.metal`: small-M kernel (M <= 8), simd_sum reduction over K;
- `dequantize.metal`: packed -> dense (N, K), for dequantize-then-`mx.matmul`.

Each function takes `backend="metal"` (a real Apple GPU) or `"emulator"` (the CPU emulator in
`emulator.py`, used by the tests on Linux). Kernels are built once per backend.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.kernels.reference import packed_k

import mlx.core as mx

GEMM_TILE = (64, 64)  # (BM, BN) in packed.h
GEMM_THREADS = 128
GEMV_MAX_M = 8
GEMV_THREADS = 256  # 8 simdgroups
GEMV_ROWS_PER_THREADGROUP = 8 * 4  # 8 simdgroups x GEMV_ROWS
ACTIVATION_DTYPES = (mx.bfloat16, mx.float16, mx.float32)


def metal_source_dir() -> Path:
    """`bonsai_mlx/metal/` in a wheel, else the repository's `metal/` (editable install)."""
    here = Path(__file__).resolve().parent.parent
    for folder in (here / "metal", here.parent / "metal"):
        if (folder / "packed.h").is_file():
            return folder
    raise BonsaiError(
        f"Metal kernel sources not found in {here / 'metal'} or {here.parent / 'metal'}; "
        "reinstall bonsai-mlx"
    )


@functools.cache
def _kernel(kind: str, backend: str):
    folder = metal_source_dir()
    header = (folder / "packed.h").read_text()
    source = (folder / f"{kind}.metal").read_text()
    if backend == "metal":
        factory = mx.fast.metal_kernel
    elif backend == "emulator":
        from bonsai_mlx.kernels import emulator

        factory = emulator.metal_kernel
    else:
        raise ValueError(f"unknown kernel backend {backend!r}")
    outputs = ["out"] if kind == "dequantize" else ["y"]
    inputs = ["w", "scales"] if kind == "dequantize" else ["x", "w", "scales"]
    return factory(
        name=f"bonsai_{kind}",
        input_names=inputs,
        output_names=outputs,
        source=source,
        header=header,
    )


def _check(packed: mx.array, scales: mx.array) -> None:
    if packed.dtype not in (mx.uint32, mx.uint8) or packed.ndim != 2 or scales.ndim != 2:
        raise BonsaiError(
            f"packed weight must be uint32 (binary) or uint8 (ternary) of 2 dimensions, got "
            f"{packed.dtype} {packed.shape} with scales {scales.shape}"
        )


def _pad_rows(packed: mx.array, scales: mx.array) -> tuple[mx.array, mx.array]:
    """Add zero rows so both arrays have >= 8 elements.

    MLX passes inputs of fewer than 8 elements in the `constant` address space, and the
    helpers in packed.h take `const device` pointers; tiny weights only occur in tests.
    """
    rows = max(packed.shape[0], -(-8 // min(packed.shape[1], scales.shape[1])))
    if rows == packed.shape[0]:
        return packed, scales
    extra = rows - packed.shape[0]
    packed = mx.concatenate([packed, mx.zeros((extra, packed.shape[1]), dtype=packed.dtype)])
    scales = mx.concatenate([scales, mx.zeros((extra, scales.shape[1]), dtype=scales.dtype)])
    return packed, scales


def packed_matmul(
    x: mx.array,
    packed: mx.array,
    scales: mx.array,
    *,
    backend: str = "metal",
    kernel: str | None = None,
) -> mx.array:
    """x (..., K) @ W.T -> (..., N) in x's dtype; binary (uint32) or ternary (uint8) W.

    M <= 8 rows use the small-M kernel ("gemv"), larger M the fused tiled GEMM ("gemm");
    `kernel` forces one (the GEMV handles at most 8 rows).
    """
    _check(packed, scales)
    n, k = packed.shape[0], packed_k(packed, scales)
    if x.shape[-1] != k:
        raise BonsaiError(f"input has {x.shape[-1]} features, the packed weight expects {k}")
    dtype = x.dtype if x.dtype in ACTIVATION_DTYPES else mx.float32
    lead = x.shape[:-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k).astype(dtype)
    if m == 0:
        return mx.zeros((*lead, n), dtype=dtype)
    packed, scales = _pad_rows(packed, scales)
    rows = packed.shape[0]
    kernel = kernel or ("gemv" if m <= GEMV_MAX_M else "gemm")
    if kernel == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"the small-M kernel handles at most {GEMV_MAX_M} rows, got {m}")
    if kernel == "gemv":
        source, threads = "packed_gemv", GEMV_THREADS
        grid = (-(-rows // GEMV_ROWS_PER_THREADGROUP) * threads, 1, 1)
    else:
        bm, bn = GEMM_TILE
        source, threads = "packed_gemm", GEMM_THREADS
        grid = (-(-rows // bn) * threads, -(-m // bm), 1)
    y = _kernel(source, backend)(
        inputs=[x2, packed, scales],
        template=[("T", dtype)],
        grid=grid,
        threadgroup=(threads, 1, 1),
        output_shapes=[(m, rows)],
        output_dtypes=[dtype],
    )[0]
    if rows != n:
        y = y[:, :n]
    return y.reshape(*lead, n)


def dequantize(
    packed: mx.array, scales: mx.array, dtype: mx.Dtype = mx.float32, *, backend: str = "metal"
) -> mx.array:
    """Packed W -> dense (N, K) in `dtype` (bfloat16, float16 or float32)."""
    _check(packed, scales)
    n = packed.shape[0]
    k = packed_k(packed, scales)
    packed, scales = _pad_rows(packed, scales)
    rows, units = packed.shape
    w = _kernel("dequantize", backend)(
        inputs=[packed, scales],
        template=[("T", dtype)],
        grid=(units, rows, 1),
        threadgroup=(32, 8, 1),
        output_shapes=[(rows, k)],
        output_dtypes=[dtype],
    )[0]
    return w[:n] if rows != n else w
