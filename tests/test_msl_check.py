"""The MSL front-end check (bonsai_mlx/kernels/msl_check.py): our kernels, as
mx.fast.metal_kernel builds them, pass clang's front end against a stub that makes Metal's
address spaces real; the address-space mistakes the emulator cannot see fail it."""

from bonsai_mlx.kernels import metal, msl_check

import mlx.core as mx
import pytest

pytestmark = pytest.mark.skipif(msl_check.clang() is None,
                                reason="the MSL check needs clang (apt-get install clang)")


def source_with(kernel: str, launches, old: str, new: str) -> str:
    spec = metal.kernel_spec(kernel)
    assert old in spec["source"], f"{kernel} no longer contains {old!r}: update the test"
    spec["source"] = spec["source"].replace(old, new)
    return msl_check.unit_source(launches, spec)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32], ids=str)
def test_every_kernel_passes_the_front_end(dtype):
    # Every template instantiation: the GEMV for M = 1 .. 8, both GEMM tile heights.
    launches = msl_check.kernel_launches(dtype)
    assert [len(v) for v in launches.values()] == [8, 2, 1, 8, 2, 1]
    for name, group in launches.items():
        msl_check.check_source(msl_check.unit_source(group), name)


def test_a_constant_buffer_passed_as_device_is_rejected():
    # A weight of < 8 elements is passed in `constant` memory (metal.py pads it out; here it
    # is not), and packed.h's helpers take `const device` pointers.
    packed, scales = mx.zeros((1, 4), mx.uint32), mx.zeros((1, 1), mx.float16)
    launch = metal.matmul_launch(mx.zeros((2, 128)), packed, scales, "gemv")
    source = msl_check.generated_source(launch)
    assert "const constant uint32_t* w [[buffer(" in source
    with pytest.raises(msl_check.MSLCheckError, match="address space '2' as a pointer to "
                                                      "address space '1'"):
        msl_check.check_source(source, "gemv with a constant weight")


def test_a_threadgroup_array_passed_as_device_is_rejected():
    # The x tile (threadgroup memory) passed where the loader takes x in device memory.
    launches = msl_check.kernel_launches(mx.float32)["gemm/binary"]
    source = source_with("gemm", launches, "load_x_tile<BM>(xs, x, M,",
                         "load_x_tile<BM>(xs, xs, M,")
    with pytest.raises(msl_check.MSLCheckError,
                       match=r"deduced type 'device float const \*' of 2nd parameter does not "
                             r"match adjusted type 'threadgroup float \*'"):
        msl_check.check_source(source, "gemm reading x from threadgroup memory")


def test_a_float_simdgroup_matrix_loaded_from_threadgroup_half_is_rejected():
    # The tempting shortcut for the float fragments of a tile staged in half: simdgroup_load.
    launches = msl_check.kernel_launches(mx.float16)["gemm/ternary"]
    old = "load_fragment(a[i], xs, sm + 8 * i, kk, lane);"
    new = "simdgroup_load(a[i], xs + (sm + 8 * i) * LD + kk, LD);"
    with pytest.raises(msl_check.MSLCheckError,
                       match=r"deduced conflicting types for parameter 'T' \('float' vs\. "
                             r"'_Float16'"):
        msl_check.check_source(source_with("gemm", launches, old, new), "gemm loading half")


def test_the_generated_source_is_what_mlx_builds():
    # The signature MLX writes (../shared/spec/metal-kernel-abi.md), incl. the template
    # instantiation whose attributes the check drops, and threadgroup storage made static.
    launch = msl_check.kernel_launches(mx.bfloat16)["gemm/binary"][0]
    source = msl_check.generated_source(launch)
    assert "template <typename T, int BM>\n[[kernel]] void " \
           "custom_kernel_bonsai_packed_gemm__bfloat16_t_64_bfloat16_t_uint32_t" \
           "_float16_t_bfloat16_t(" in source
    assert "  const device bfloat16_t* x [[buffer(0)]],\n  const constant int* x_shape " \
           "[[buffer(1)]]," in source
    assert 'template [[host_name("custom_kernel_bonsai_packed_gemm__bfloat16_t_64_bfloat16_t' \
           '_uint32_t_float16_t_bfloat16_t")]] [[kernel]]' in source
    unit = msl_check.for_clang(source)
    assert "static threadgroup T smem[" in unit and "[[host_name" not in unit
