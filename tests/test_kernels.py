"""Every Metal kernel, run in the CPU emulator (and on a real Apple GPU where there is one),
against exact float64 math on awkward shapes, plus the dispatcher's path choice."""

from bonsai_mlx import BonsaiError, kernels
from bonsai_mlx.kernels import emulator, metal, reference

import mlx.core as mx
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    emulator.compiler() is None, reason="the Metal emulator needs g++ (or $CXX) to compile kernels"
)

BACKENDS = ["emulator"] + (["metal"] if mx.metal.is_available() else [])
DTYPES = [mx.bfloat16, mx.float16, mx.float32]
RTOL = {mx.bfloat16: 2.0**-8, mx.float16: 2.0**-10, mx.float32: 1e-6}


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "metal":
        request.applymarker(pytest.mark.metal)
    return request.param


def make_weight(fmt: str, n: int, k: int, seed: int = 0):
    """Random packed weight, packed here with numpy (independently of the package), and its
    exact dense float64 value."""
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


def assert_matches(y: mx.array, exact: np.ndarray, bound: np.ndarray, dtype) -> None:
    """|y - exact| within one rounding to `dtype` plus float32 accumulation error."""
    assert y.dtype == dtype
    got = np.array(y.astype(mx.float32)).astype(np.float64)
    assert got.shape == exact.shape
    tol = RTOL[dtype] * np.abs(exact) + 1e-5 * bound + 1e-6
    bad = np.abs(got - exact) > tol
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} outputs off, first at {np.argwhere(bad)[0]}: "
        f"{got[bad][0]} vs {exact[bad][0]}"
    )


GEMM_SHAPES = [(33, 64, 128), (300, 130, 384), (9, 1, 640), (64, 70, 256)]
GEMV_SHAPES = [(1, 70, 384), (3, 33, 128), (8, 64, 640)]


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_fused_gemm_matches_exact_math(backend, fmt, dtype, m, n, k):
    packed, scales, dense = make_weight(fmt, n, k)
    x, x64 = make_input((m, k), dtype)
    y = metal.packed_matmul(x, packed, scales, backend=backend, kernel="gemm")
    assert_matches(y, x64 @ dense.T, np.abs(x64) @ np.abs(dense).T, dtype)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", GEMV_SHAPES)
def test_small_m_kernel_matches_exact_math(backend, fmt, dtype, m, n, k):
    packed, scales, dense = make_weight(fmt, n, k, seed=2)
    x, x64 = make_input((m, k), dtype, seed=3)
    y = metal.packed_matmul(x, packed, scales, backend=backend)
    assert_matches(y, x64 @ dense.T, np.abs(x64) @ np.abs(dense).T, dtype)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", [(70, 384), (1, 128), (33, 640)])
def test_dequantize_kernel_matches_exact_math(backend, fmt, dtype, n, k):
    packed, scales, dense = make_weight(fmt, n, k, seed=4)
    w = metal.dequantize(packed, scales, dtype, backend=backend)
    assert_matches(w, dense, np.zeros_like(dense), dtype)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_packed_matmul_picks_kernels_and_keeps_leading_dims(fmt):
    packed, scales, dense = make_weight(fmt, 40, 256, seed=5)
    for lead in [(2,), (3, 11)]:  # 2 rows -> small-M kernel; 33 rows -> fused GEMM
        x, x64 = make_input((*lead, 256), mx.float32, seed=6)
        y = metal.packed_matmul(x, packed, scales, backend="emulator")
        assert y.shape == (*lead, 40)
        assert_matches(y, x64 @ dense.T, np.abs(x64) @ np.abs(dense).T, mx.float32)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
@pytest.mark.parametrize("path", ["emulator", "dequant", "reference"])
def test_dispatch_paths_agree_with_reference(monkeypatch, fmt, path):
    monkeypatch.setenv("BONSAI_KERNELS", path)
    packed, scales, _ = make_weight(fmt, 48, 256, seed=7)
    x, _ = make_input((2, 9, 256), mx.bfloat16, seed=8)
    matmul = kernels.binary_matmul if fmt == "binary" else kernels.ternary_matmul
    ref_matmul = reference.binary_matmul if fmt == "binary" else reference.ternary_matmul
    y = matmul(x, packed, scales)
    r = ref_matmul(x, packed, scales)
    assert y.shape == r.shape == (2, 9, 48) and y.dtype == r.dtype == mx.bfloat16
    # Both round a float32 result to bfloat16 once: at most one bfloat16 step apart.
    np.testing.assert_allclose(
        np.array(y.astype(mx.float32)), np.array(r.astype(mx.float32)), rtol=2**-7, atol=1e-3
    )
    deq = kernels.dequantize_binary if fmt == "binary" else kernels.dequantize_ternary
    args = (packed, scales) if fmt == "binary" else (packed, scales, 256)
    ref_deq = reference.dequantize_binary if fmt == "binary" else reference.dequantize_ternary
    np.testing.assert_array_equal(np.array(deq(*args)), np.array(ref_deq(*args)))


def test_default_path(monkeypatch):
    monkeypatch.delenv("BONSAI_KERNELS", raising=False)
    if mx.metal.is_available():
        assert kernels.kernel_path(4) == "metal"
        assert kernels.kernel_path(kernels.DEQUANT_MIN_M) == "dequant"
    else:
        assert kernels.kernel_path(4) == kernels.kernel_path(4096) == "reference"


def test_unknown_kernel_path_is_a_user_error(monkeypatch):
    monkeypatch.setenv("BONSAI_KERNELS", "cuda")
    with pytest.raises(BonsaiError, match="BONSAI_KERNELS"):
        kernels.kernel_path(1)
    if not mx.metal.is_available():
        monkeypatch.setenv("BONSAI_KERNELS", "metal")
        with pytest.raises(BonsaiError, match="Apple GPU"):
            kernels.kernel_path(1)


@pytest.mark.parametrize("order", ["simdgroups", "reverse"])
def test_gemm_without_its_barrier_fails_in_the_emulator(monkeypatch, order):
    # Guards the emulator's strength: the fused GEMM with the barrier that ends each K step
    # removed (next tiles overwrite threadgroup memory still being read) must go wrong under
    # the SIMD-group-at-a-time schedules (round-robin keeps SIMD-groups in step and misses it).
    monkeypatch.setenv("BONSAI_EMULATOR_SCHEDULE", order)
    folder = metal.metal_source_dir()
    source = (folder / "packed_gemm.metal").read_text()
    step_end = "        threadgroup_barrier(mem_flags::mem_threadgroup);\n    }\n\n    // Epilogue"
    assert step_end in source
    broken = source.replace(step_end, "    }\n\n    // Epilogue")
    kernel = emulator.metal_kernel(
        "broken_gemm", ["x", "w", "scales"], ["y"], broken, (folder / "packed.h").read_text()
    )
    packed, scales, dense = make_weight("binary", 64, 256)
    x, x64 = make_input((64, 256), mx.float32)
    y = kernel(
        inputs=[x, packed, scales],
        template=[("T", mx.float32)],
        grid=(128, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(64, 64)],
        output_dtypes=[mx.float32],
    )[0]
    with pytest.raises(AssertionError):
        assert_matches(y, x64 @ dense.T, np.abs(x64) @ np.abs(dense).T, mx.float32)


def test_tiny_weights_are_padded_out_of_the_constant_address_space():
    # MLX passes inputs of < 8 elements as `constant`; the kernels' helpers take `device`.
    packed, scales, _ = make_weight("binary", 1, 128)
    assert packed.size < 8 and scales.size < 8
    p, s = metal._pad_rows(packed, scales)
    assert p.size >= 8 and s.size >= 8 and p.shape[1] == 4 and s.shape[1] == 1
    np.testing.assert_array_equal(np.array(p[:1]), np.array(packed))
