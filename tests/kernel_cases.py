"""The kernel checks shared by tests/test_kernels.py (the real kernels) and
tests/test_kernel_bugs.py (copies of them with one deliberate bug each): random packed
weights packed here with numpy, independently of the package, exact float64 math to compare
with, and the shapes that run every loop and edge of every kernel."""

from __future__ import annotations

import shutil

from bonsai_mlx.kernels import emulator, metal

import mlx.core as mx
import numpy as np
import pytest

DTYPES = [mx.bfloat16, mx.float16, mx.float32]
RTOL = {mx.bfloat16: 2.0**-8, mx.float16: 2.0**-10, mx.float32: 1e-6}
# The tiled GEMM stages scaled weights in the activation dtype (as MLX's qmm_t, and as the
# dequantize path does): in bfloat16 each float16 scale is rounded to bfloat16 (relative
# error <= 2^-9), an error bounded by 2^-9 * sum |x| |w|. In float16 and float32 the weights
# (+-s, 0) are exact.
STAGED_WEIGHT_RTOL = {mx.bfloat16: 2.0**-9, mx.float16: 0.0, mx.float32: 0.0}
needs_cxx = pytest.mark.skipif(emulator.compiler() is None,
                               reason="the Metal emulator needs g++ (or $CXX) to compile kernels")
needs_pattern_init = pytest.mark.skipif(
    emulator.compiler() is None
    or emulator.PATTERN_INIT not in emulator.cxx_flags(emulator.compiler()),
    reason="uninitialised locals are only caught with -ftrivial-auto-var-init (g++ >= 12, clang)")

# (M, N, K). GEMM: both tile heights (32 rows for M < 64, else 64), partial tiles in M and N
# (64 columns), N = 1, K up to 1152 (9 scale groups: K > 1024 catches a scale index wrapping at
# 8 groups). GEMV: M = 1, 2, 3, 8 (slices of 32, 16, 16 and 8 inputs per lane), N off the
# 8 rows per threadgroup, K = 2176 (17 scale groups; 5 steps of 512 inputs at M = 2, the last
# one partial), lanes idle in a partial last step everywhere. Dequantize: N off the 4-row
# threadgroup, K off the 512 inputs of a 32-lane row, K > 1024.
GEMM_SHAPES = [(33, 64, 128), (300, 130, 384), (9, 1, 640), (64, 70, 256), (65, 65, 1152)]
GEMV_SHAPES = [(1, 70, 384), (3, 33, 128), (8, 64, 640), (2, 33, 2176)]
DEQUANTIZE_SHAPES = [(70, 384), (1, 128), (33, 640), (9, 1152)]


def make_weight(fmt: str, n: int, k: int, seed: int = 0):
    """Random packed weight and its exact dense float64 value."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.25, 2.0, size=(n, k // 128)).astype(np.float16)
    s = np.repeat(scales.astype(np.float64), 128, axis=1)
    if fmt == "binary":
        bits = rng.integers(0, 2, size=(n, k), dtype=np.uint64)
        words = (bits.reshape(n, k // 32, 32) << np.arange(32, dtype=np.uint64)).sum(-1)
        packed = mx.array(words.astype(np.uint32))
        dense = np.where(bits == 1, s, -s)
    else:
        q = rng.integers(-1, 2, size=(n, k))
        digits = np.ones((n, -(-k // 5) * 5), dtype=np.int64)  # padding trits are 1 (zero)
        digits[:, :k] = q + 1
        packed = mx.array((digits.reshape(n, -1, 5) * 3 ** np.arange(5)).sum(-1).astype(np.uint8))
        dense = q * s
    return packed, mx.array(scales), dense


def make_input(shape, dtype, seed=1):
    x = mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))
    x = x.astype(dtype)
    return x, np.array(x.astype(mx.float32)).astype(np.float64)


def assert_matches(y: mx.array, exact: np.ndarray, bound: np.ndarray, dtype,
                   weight_rtol: float = 0.0) -> None:
    """Every output finite and |y - exact| within one rounding to `dtype` plus float32
    accumulation error (plus `weight_rtol` * bound for weights rounded to `dtype`)."""
    assert y.dtype == dtype
    got = np.array(y.astype(mx.float32)).astype(np.float64)
    assert got.shape == exact.shape
    bad = ~np.isfinite(got)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} outputs are not finite (unwritten or NaN), first at "
        f"{np.argwhere(bad)[0]}"
    )
    tol = RTOL[dtype] * np.abs(exact) + (1e-5 + weight_rtol) * bound + 1e-6
    bad = np.abs(got - exact) > tol
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} outputs off, first at {np.argwhere(bad)[0]}: "
        f"{got[bad][0]} vs {exact[bad][0]}"
    )


def check_matmul(kernel: str, backend: str, fmt: str, dtype, m: int, n: int, k: int) -> None:
    """The GEMM or GEMV kernel on (M, N, K) against exact math."""
    packed, scales, dense = make_weight(fmt, n, k, seed=m + n + k)
    x, x64 = make_input((m, k), dtype, seed=m + 1)
    y = metal.packed_matmul(x, packed, scales, backend=backend, kernel=kernel)
    weight_rtol = STAGED_WEIGHT_RTOL[dtype] if kernel == "gemm" else 0.0
    assert_matches(y, x64 @ dense.T, np.abs(x64) @ np.abs(dense).T, dtype, weight_rtol)


def check_dequantize(backend: str, fmt: str, dtype, n: int, k: int) -> None:
    packed, scales, dense = make_weight(fmt, n, k, seed=4)
    w = metal.dequantize(packed, scales, dtype, backend=backend)
    assert_matches(w, dense, np.zeros_like(dense), dtype)


def with_bug(tmp_path, monkeypatch, file: str, old: str, new: str) -> None:
    """Run the kernels from a copy of metal/ in which `file` has `old` replaced by `new`."""
    folder = tmp_path / "metal"
    shutil.copytree(metal.metal_source_dir(), folder)
    source = (folder / file).read_text()
    assert old in source, f"{file} no longer contains {old!r}: update the injected bug"
    (folder / file).write_text(source.replace(old, new))
    monkeypatch.setattr(metal, "metal_source_dir", lambda: folder)
