"""Every Metal kernel, run in the CPU emulator (and on a real Apple GPU where there is one),
against exact float64 math on shapes that run every loop and edge, plus the dispatcher's path
choice and the weight checks. CI runs this file under two emulator schedules (.ci/run)."""

from bonsai_mlx import BonsaiError, kernels
from bonsai_mlx.kernels import emulator, metal, reference

import mlx.core as mx
import numpy as np
import pytest
from kernel_cases import (
    DEQUANTIZE_SHAPES,
    DTYPES,
    GEMM_SHAPES,
    GEMV_SHAPES,
    STAGED_WEIGHT_RTOL,
    assert_matches,
    check_dequantize,
    check_matmul,
    make_input,
    make_weight,
    needs_cxx,
)


@pytest.fixture(params=["emulator", pytest.param("metal", marks=pytest.mark.metal)])
def backend(request):
    """Both backends are always collected; without an Apple GPU the Metal ones show as
    skipped, "no Apple GPU" (tests/conftest.py)."""
    if request.param == "emulator" and emulator.compiler() is None:
        pytest.skip("the Metal emulator needs g++ (or $CXX) to compile kernels")
    return request.param


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_fused_gemm_matches_exact_math(backend, fmt, dtype, m, n, k):
    check_matmul("gemm", backend, fmt, dtype, m, n, k)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", GEMV_SHAPES)
def test_small_m_kernel_matches_exact_math(backend, fmt, dtype, m, n, k):
    check_matmul("gemv", backend, fmt, dtype, m, n, k)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k", DEQUANTIZE_SHAPES)
def test_dequantize_kernel_matches_exact_math(backend, fmt, dtype, n, k):
    check_dequantize(backend, fmt, dtype, n, k)


@needs_cxx
def test_every_ternary_byte_decodes_as_the_reference_does():
    # All 256 byte values (243 .. 255 never occur in a pack) through the kernels' TRITS table,
    # against reference.py's base-3 digits; K = 640: 128 bytes per row, two rows.
    packed = mx.arange(256, dtype=mx.uint32).astype(mx.uint8).reshape(2, 128)
    scales = mx.array(np.random.default_rng(0).uniform(0.5, 2, (2, 5)).astype(np.float16))
    got = metal.dequantize(packed, scales, mx.float32, backend="emulator")
    np.testing.assert_array_equal(np.array(got),
                                  np.array(reference.dequantize_ternary(packed, scales, 640)))


@needs_cxx
@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_launches_are_split_to_keep_offsets_in_32_bits(monkeypatch, fmt):
    # With a (pretend) 2^31 of 3000 elements: x of 20 rows x 256 runs as 11 + 9 rows, the
    # dequantized 40 x 256 weight as 4 launches of up to 11 rows.
    monkeypatch.setattr(metal, "MAX_ELEMENTS", 3000)
    launches = []
    run = metal.Launch.run
    monkeypatch.setattr(metal.Launch, "run", lambda self, b: launches.append(self) or run(self, b))
    packed, scales, dense = make_weight(fmt, 40, 256, seed=9)
    x, x64 = make_input((20, 256), mx.float32, seed=10)
    y = metal.packed_matmul(x, packed, scales, backend="emulator")
    assert_matches(y, x64 @ dense.T, np.abs(x64) @ np.abs(dense).T, mx.float32)
    w = metal.dequantize(packed, scales, mx.float32, backend="emulator")
    assert_matches(w, dense, np.zeros_like(dense), mx.float32)
    assert [launch.output_shapes[0] for launch in launches] == [
        (11, 40), (9, 40), (11, 256), (11, 256), (11, 256), (7, 256)]


@needs_cxx
@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_packed_matmul_picks_kernels_and_keeps_leading_dims(fmt):
    packed, scales, dense = make_weight(fmt, 40, 256, seed=5)
    for lead in [(2,), (3, 11)]:  # 2 rows -> small-M kernel; 33 rows -> fused GEMM
        x, x64 = make_input((*lead, 256), mx.float32, seed=6)
        y = metal.packed_matmul(x, packed, scales, backend="emulator")
        assert y.shape == (*lead, 40)
        assert_matches(y, x64 @ dense.T, np.abs(x64) @ np.abs(dense).T, mx.float32)


@needs_cxx
@pytest.mark.parametrize("fmt", ["binary", "ternary"])
@pytest.mark.parametrize("path", ["emulator", "dequant", "reference"])
def test_dispatch_paths_agree_with_reference(monkeypatch, fmt, path):
    monkeypatch.setenv("BONSAI_KERNELS", path)
    packed, scales, dense = make_weight(fmt, 48, 256, seed=7)
    x, x64 = make_input((2, 9, 256), mx.bfloat16, seed=8)
    matmul = kernels.binary_matmul if fmt == "binary" else kernels.ternary_matmul
    ref_matmul = reference.binary_matmul if fmt == "binary" else reference.ternary_matmul
    y = matmul(x, packed, scales)
    r = ref_matmul(x, packed, scales)
    assert y.shape == r.shape == (2, 9, 48) and y.dtype == r.dtype == mx.bfloat16
    # Both round a float32 result to bfloat16 once: at most one bfloat16 step apart; the
    # emulated GEMM (18 rows) also rounds its staged weights to bfloat16 (kernel_cases).
    got, want = np.array(y.astype(mx.float32)), np.array(r.astype(mx.float32))
    weight_rtol = STAGED_WEIGHT_RTOL[mx.bfloat16] if path == "emulator" else 0.0
    bound = np.abs(x64) @ np.abs(dense).T
    assert (np.abs(got - want) <= 2**-7 * np.abs(want) + weight_rtol * bound + 1e-3).all()
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


def test_tiny_weights_are_padded_out_of_the_constant_address_space():
    # MLX passes inputs of < 8 elements as `constant`; the kernels' helpers take `device`
    # (tests/test_msl_check.py shows the front end rejecting the unpadded source).
    packed, scales, _ = make_weight("binary", 1, 128)
    assert packed.size < 8 and scales.size < 8
    p, s = metal._pad_rows(packed, scales)
    assert p.size >= 8 and s.size >= 8 and p.shape[1] == 4 and s.shape[1] == 1
    np.testing.assert_array_equal(np.array(p[:1]), np.array(packed))


def _bad_weights():
    b, bs, _ = make_weight("binary", 4, 256)
    t, ts, _ = make_weight("ternary", 4, 256)
    cases = [
        ("K = 96", b[:, :3], bs[:, :1], "multiple of 128"),
        ("binary scales width", b, bs[:, :1], "needs 2 scales per row"),
        ("ternary row width", t[:, :50], ts, r"ceil\(K/5\) = 52 bytes per row, got 50"),
        ("ternary scales width", t, ts[:, :1], r"ceil\(K/5\) = 26 bytes per row, got 52"),
        ("scales rows", b, bs[:3], "N = 4 rows"),
        ("scales dtype", b, bs.astype(mx.float32), "float16"),
        ("packed dtype", b.astype(mx.int32), bs, r"uint32 \(binary\) or uint8"),
        ("packed ndim", b.reshape(-1), bs, "2 dimensions"),
        ("empty K", b[:, :0], bs[:, :0], "positive multiple of 128"),
    ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize("packed,scales,message", _bad_weights())
def test_mismatched_weights_are_user_errors_before_any_launch(packed, scales, message):
    # No backend runs: the checks come before the kernel is built ("nowhere" is no backend).
    x = mx.zeros((2, 256))
    with pytest.raises(BonsaiError, match=message):
        metal.packed_matmul(x, packed, scales, backend="nowhere")
    with pytest.raises(BonsaiError, match=message):
        metal.dequantize(packed, scales, backend="nowhere")


def test_activation_and_output_dtypes_are_checked():
    packed, scales, _ = make_weight("binary", 4, 128)
    with pytest.raises(BonsaiError, match="activations in bfloat16, float16, float32"):
        metal.packed_matmul(mx.zeros((2, 128), mx.int32), packed, scales, backend="nowhere")
    with pytest.raises(BonsaiError, match="input has shape \\(2, 256\\)"):
        metal.packed_matmul(mx.zeros((2, 256)), packed, scales, backend="nowhere")
    with pytest.raises(BonsaiError, match="output dtype"):
        metal.dequantize(packed, scales, mx.int8, backend="nowhere")
