"""The Metal kernels for packed binary / ternary weights, through `mx.fast.metal_kernel`.

Sources live in `metal/` (repo) or `bonsai_mlx/metal/` (wheel): `packed.h` (formats, decode
helpers, tile sizes) and one body per kernel, designed after MLX's quantized kernels
(docs/kernels.md says why each choice):

- `packed_gemm.metal` ("gemm"): fused tiled GEMM, x and decoded W tiles staged in the
  activation dtype, float `simdgroup_matrix` accumulation; BM = 64 rows per threadgroup, or
  32 for M < 64 (template parameter);
- `packed_gemv.metal` ("gemv"): small-M kernel (M <= 8, M a template parameter), x in
  registers, simd_sum reduction over K;
- `dequantize.metal` ("dequantize"): packed -> dense (N, K), for dequantize-then-`mx.matmul`.

Each function takes `backend="metal"` (the factory of `device.current()`: `mx.fast.metal_kernel`
on a Mac, or a test double) or `"emulator"` (the CPU emulator in `emulator.py`, used by the
tests on Linux). Shapes and dtypes are checked before any launch (`BonsaiError`): a kernel
never reads past a buffer because a caller passed a mismatched weight. The kernels use 32-bit
offsets: larger problems are split into launches whose arrays have < 2^31 elements.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.kernels import device
from bonsai_mlx.kernels.reference import GROUP_SIZE

import mlx.core as mx

GEMM_BN = 64  # output features per threadgroup (packed.h: BN)
GEMM_BM = 64  # rows per threadgroup (template parameter BM) ...
GEMM_BM_NARROW = 32  # ... or this many for M < GEMM_BM: less padding in the last tile
GEMM_THREADS = 128
GEMV_MAX_M = 8
GEMV_THREADS = 64  # GEMV_SIMDGROUPS (2) x 32 lanes
GEMV_ROWS_PER_THREADGROUP = 2 * 4  # GEMV_SIMDGROUPS x GEMV_ROWS
DEQUANTIZE_CHUNK = 16  # outputs per thread
DEQUANTIZE_THREADGROUP = (32, 4, 1)
MAX_ELEMENTS = 2**31 - 1  # the kernels' offsets are 32-bit `int`
ACTIVATION_DTYPES = (mx.bfloat16, mx.float16, mx.float32)
KERNEL_FILES = {"gemv": "packed_gemv", "gemm": "packed_gemm", "dequantize": "dequantize"}


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


def kernel_source(kernel: str) -> tuple[str, str]:
    """(header, body) of a kernel ("gemv", "gemm" or "dequantize") as passed to metal_kernel."""
    folder = metal_source_dir()
    return _read_source(folder, KERNEL_FILES[kernel])


@functools.cache
def _read_source(folder: Path, stem: str) -> tuple[str, str]:
    return (folder / "packed.h").read_text(), (folder / f"{stem}.metal").read_text()


def source_hash(kernel: str) -> str:
    """Hash of everything that decides what a kernel computes: its sources and this module
    (tile sizes, grids)."""
    header, body = kernel_source(kernel)
    digest = hashlib.sha256("\0".join([header, body, Path(__file__).read_text()]).encode())
    return digest.hexdigest()[:16]


def _factory(backend: str):
    if backend == "metal":
        return device.resolve_factory(device.current().factory)
    if backend == "emulator":
        from bonsai_mlx.kernels import emulator

        return emulator.metal_kernel
    raise ValueError(f"unknown kernel backend {backend!r}")


def kernel_spec(kernel: str) -> dict:
    """The arguments `metal_kernel` builds a kernel from (name, inputs, outputs, sources)."""
    header, body = kernel_source(kernel)
    dequantize = kernel == "dequantize"
    return dict(
        name=f"bonsai_{KERNEL_FILES[kernel]}",
        input_names=["w", "scales"] if dequantize else ["x", "w", "scales"],
        output_names=["out"] if dequantize else ["y"],
        source=body,
        header=header,
    )


@functools.cache
def _built(kernel: str, factory, folder: Path):
    return factory(**kernel_spec(kernel))  # (folder: tests swap in sources with a bug)


@dataclass(frozen=True)
class Launch:
    """One kernel call: the arguments of the object `metal_kernel` returns."""

    kernel: str
    inputs: tuple
    template: tuple
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: tuple
    output_dtypes: tuple

    def run(self, backend: str) -> mx.array:
        build = _built(self.kernel, _factory(backend), metal_source_dir())
        return build(
            inputs=list(self.inputs),
            template=list(self.template),
            grid=self.grid,
            threadgroup=self.threadgroup,
            output_shapes=list(self.output_shapes),
            output_dtypes=list(self.output_dtypes),
        )[0]


def check_weight(packed: mx.array, scales: mx.array) -> tuple[int, int]:
    """(N, K) of a packed weight, after checking the format's shapes and dtypes
    (docs/formats.md): BonsaiError for anything a kernel would read out of bounds."""
    if packed.dtype not in (mx.uint32, mx.uint8) or packed.ndim != 2:
        raise BonsaiError(
            f"packed weight must be uint32 (binary) or uint8 (ternary) of 2 dimensions, got "
            f"{packed.dtype} {packed.shape}"
        )
    if scales.dtype != mx.float16 or scales.ndim != 2 or scales.shape[0] != packed.shape[0]:
        raise BonsaiError(
            f"scales must be float16 (N, K/{GROUP_SIZE}) with N = {packed.shape[0]} rows like "
            f"the packed weight, got {scales.dtype} {scales.shape}"
        )
    n = packed.shape[0]
    if packed.dtype == mx.uint32:
        k = packed.shape[1] * 32
        if k == 0 or k % GROUP_SIZE:
            raise BonsaiError(
                f"binary weight has {packed.shape[1]} words per row (K = {k}); K must be a "
                f"positive multiple of {GROUP_SIZE} (a multiple of 4 words)"
            )
        if scales.shape[1] != k // GROUP_SIZE:
            raise BonsaiError(
                f"binary weight with K = {k} needs {k // GROUP_SIZE} scales per row, "
                f"got scales {scales.shape}"
            )
        return n, k
    k = scales.shape[1] * GROUP_SIZE
    if k == 0 or packed.shape[1] != -(-k // 5):
        raise BonsaiError(
            f"ternary weight with scales {scales.shape} (K = {k}) needs ceil(K/5) = "
            f"{-(-k // 5)} bytes per row, got {packed.shape[1]}; K must be a positive "
            f"multiple of {GROUP_SIZE}"
        )
    return n, k


def _check_dtype(dtype: mx.Dtype, what: str) -> None:
    if dtype not in ACTIVATION_DTYPES:
        names = ", ".join(str(d).removeprefix("mlx.core.") for d in ACTIVATION_DTYPES)
        raise BonsaiError(f"the Metal kernels take {what} in {names}, got {dtype}")


def _pad_rows(packed: mx.array, scales: mx.array) -> tuple[mx.array, mx.array]:
    """Add zero rows so both arrays have >= 8 elements.

    MLX passes inputs of fewer than 8 elements in the `constant` address space, and the
    helpers in packed.h take `const device` pointers (tests/test_msl_check.py shows Metal's
    front end rejecting that); tiny weights only occur in tests.
    """
    rows = max(packed.shape[0], -(-8 // min(packed.shape[1], scales.shape[1])))
    if rows == packed.shape[0]:
        return packed, scales
    extra = rows - packed.shape[0]
    packed = mx.concatenate([packed, mx.zeros((extra, packed.shape[1]), dtype=packed.dtype)])
    scales = mx.concatenate([scales, mx.zeros((extra, scales.shape[1]), dtype=scales.dtype)])
    return packed, scales


def gemm_rows(m: int) -> int:
    """Rows per threadgroup of the tiled GEMM for an M-row problem (template parameter BM)."""
    return GEMM_BM if m >= GEMM_BM else GEMM_BM_NARROW


def matmul_launch(x2: mx.array, packed: mx.array, scales: mx.array, kernel: str) -> Launch:
    """The launch of "gemv" or "gemm" for x2 (M, K) and a checked, row-padded weight."""
    m = x2.shape[0]
    rows = packed.shape[0]
    if kernel == "gemv":
        grid = (-(-rows // GEMV_ROWS_PER_THREADGROUP) * GEMV_THREADS, 1, 1)
        return Launch(kernel, (x2, packed, scales), (("T", x2.dtype), ("M", m)), grid,
                      (GEMV_THREADS, 1, 1), ((m, rows),), (x2.dtype,))
    bm = gemm_rows(m)
    grid = (-(-rows // GEMM_BN) * GEMM_THREADS, -(-m // bm), 1)
    return Launch(kernel, (x2, packed, scales), (("T", x2.dtype), ("BM", bm)), grid,
                  (GEMM_THREADS, 1, 1), ((m, rows),), (x2.dtype,))


def _row_blocks(rows: int, row_elements: int) -> list[tuple[int, int]]:
    """[start, stop) blocks of `rows` such that rows x row_elements < 2^31 in each."""
    step = max(1, MAX_ELEMENTS // max(1, row_elements))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


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
    n, k = check_weight(packed, scales)
    if x.ndim < 1 or x.shape[-1] != k:
        raise BonsaiError(f"input has shape {x.shape}, the packed weight expects {k} features")
    _check_dtype(x.dtype, "activations")
    lead = x.shape[:-1]
    m = math.prod(lead)
    if m == 0:
        return mx.zeros((*lead, n), dtype=x.dtype)
    kernel = kernel or ("gemv" if m <= GEMV_MAX_M else "gemm")
    if kernel not in ("gemv", "gemm"):
        raise ValueError(f"kernel must be 'gemv' or 'gemm', got {kernel!r}")
    if kernel == "gemv" and m > GEMV_MAX_M:
        raise ValueError(f"the small-M kernel handles at most {GEMV_MAX_M} rows, got {m}")
    if packed.size > MAX_ELEMENTS:
        raise BonsaiError(f"a packed weight of shape {packed.shape} has more than 2^31 - 1 "
                          "elements, more than the Metal kernels address; split the layer")
    packed, scales = _pad_rows(packed, scales)
    x2 = x.reshape(m, k)
    blocks = [matmul_launch(x2[a:b], packed, scales, kernel).run(backend)
              for a, b in _row_blocks(m, max(k, packed.shape[0]))]
    y = blocks[0] if len(blocks) == 1 else mx.concatenate(blocks)
    if packed.shape[0] != n:
        y = y[:, :n]
    return y.reshape(*lead, n)


def dequantize_launch(packed: mx.array, scales: mx.array, dtype: mx.Dtype, k: int) -> Launch:
    """The launch of "dequantize" for a checked, row-padded weight."""
    rows = packed.shape[0]
    return Launch("dequantize", (packed, scales), (("T", dtype),),
                  (k // DEQUANTIZE_CHUNK, rows, 1), DEQUANTIZE_THREADGROUP, ((rows, k),), (dtype,))


def dequantize(
    packed: mx.array, scales: mx.array, dtype: mx.Dtype = mx.float32, *, backend: str = "metal"
) -> mx.array:
    """Packed W -> dense (N, K) in `dtype` (bfloat16, float16 or float32)."""
    n, k = check_weight(packed, scales)
    _check_dtype(dtype, "an output dtype")
    packed, scales = _pad_rows(packed, scales)
    blocks = [dequantize_launch(packed[a:b], scales[a:b], dtype, k).run(backend)
              for a, b in _row_blocks(packed.shape[0], k)]
    w = blocks[0] if len(blocks) == 1 else mx.concatenate(blocks)
    return w[:n] if packed.shape[0] != n else w


__all__ = ["ACTIVATION_DTYPES", "KERNEL_FILES", "Launch", "check_weight", "dequantize",
           "kernel_source", "kernel_spec",
           "metal_source_dir", "packed_matmul", "source_hash"]

