"""Each class of kernel bug the checks must catch, put into a copy of the real kernel source
and run through the same checks and shapes as tests/test_kernels.py: every injected bug makes
those checks fail with an AssertionError or an EmulatorError, never a crash of the test
process. (Address-space mistakes, which the emulator cannot see, are in test_msl_check.py.)
If a kernel is rewritten, update the injected snippets: `with_bug` fails when they are gone."""

from bonsai_mlx.kernels.emulator import EmulatorError

import mlx.core as mx
import pytest
from kernel_cases import (
    DEQUANTIZE_SHAPES,
    GEMM_SHAPES,
    GEMV_SHAPES,
    check_dequantize,
    check_matmul,
    needs_cxx,
    needs_pattern_init,
    with_bug,
)

pytestmark = needs_cxx


def failures(kernel: str, fmt: str, shapes, dtype=mx.float32) -> dict[tuple, Exception]:
    """Shape -> the error the test suite's check raised for it (shapes that pass: absent)."""
    out = {}
    for shape in shapes:
        try:
            if kernel == "dequantize":
                check_dequantize("emulator", fmt, dtype, *shape)
            else:
                check_matmul(kernel, "emulator", fmt, dtype, *shape)
        except (AssertionError, EmulatorError) as e:
            out[shape] = e
    return out


def test_half_a_tile_left_unwritten_fails_as_non_finite(tmp_path, monkeypatch):
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal",
             "yr[n + 1] = T(stage[r * 8 + c + 1]);", "")
    errors = failures("gemm", "binary", GEMM_SHAPES)
    assert set(errors) == {s for s in GEMM_SHAPES if s[1] > 1}  # N = 1 has no odd column
    assert all("not finite" in str(e) for e in errors.values())


def test_missing_barrier_between_k_steps_is_caught_one_simdgroup_at_a_time(tmp_path,
                                                                          monkeypatch):
    # The next K step's tiles overwrite threadgroup memory other SIMD-groups still read.
    # Round-robin keeps SIMD-groups in step and misses this race: CI runs both schedules.
    monkeypatch.setenv("BONSAI_EMULATOR_SCHEDULE", "simdgroups")
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal",
             "        threadgroup_barrier(mem_flags::mem_threadgroup);\n    }\n\n    // Epilogue",
             "    }\n\n    // Epilogue")
    errors = failures("gemm", "binary", GEMM_SHAPES)
    assert errors and all(isinstance(e, AssertionError) for e in errors.values())


def test_simdgroups_sharing_a_staging_buffer_are_caught_round_robin(tmp_path, monkeypatch):
    # Every SIMD-group stages its 8 x 8 blocks in the same 64 floats: one SIMD-group at a
    # time never overlaps them, round-robin does (the race the other schedule misses).
    monkeypatch.setenv("BONSAI_EMULATOR_SCHEDULE", "round-robin")
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal",
             "threadgroup float* stage = smem + sg * 64;", "threadgroup float* stage = smem;")
    errors = failures("gemm", "ternary", GEMM_SHAPES)
    assert errors and all(isinstance(e, AssertionError) for e in errors.values())


def test_uninitialised_gemv_accumulator_is_caught(tmp_path, monkeypatch):
    with_bug(tmp_path, monkeypatch, "packed_gemv.metal",
             "        for (int m = 0; m < GEMV_MAX_M; ++m) {\n            acc[m] = 0.0f;\n"
             "        }\n", "")
    errors = failures("gemv", "binary", GEMV_SHAPES)
    assert set(errors) == set(GEMV_SHAPES)  # (the pattern summed over 32 lanes: -inf)
    assert all(isinstance(e, AssertionError) for e in errors.values())


@needs_pattern_init
def test_uninitialised_gemm_accumulator_is_caught(tmp_path, monkeypatch):
    # Without the pattern, the one-threadgroup shapes start from a fresh (zero) stack and pass.
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal",
             "acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);", "")
    errors = failures("gemm", "ternary", GEMM_SHAPES)
    assert set(errors) == set(GEMM_SHAPES)


def test_write_past_the_output_is_an_emulator_error(tmp_path, monkeypatch):
    # Without its column guard the epilogue writes y[m, N] for odd N: past the end of the
    # buffer in the last row.
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal", "if (n + 1 < N) {", "if (true) {")
    errors = failures("gemm", "binary", GEMM_SHAPES)
    odd = {s for s in GEMM_SHAPES if s[1] % 2}
    assert odd and odd <= set(errors)
    assert all(isinstance(errors[s], EmulatorError) for s in odd)
    assert all("past the end of output 'y'" in str(errors[s]) for s in odd)


def test_ternary_dequantize_writing_the_padding_trits_is_an_emulator_error(tmp_path,
                                                                            monkeypatch):
    # When K is not a multiple of 5 the last byte of a ternary row holds padding trits:
    # decoding them reads a scale past the row (and would write past it): out of bounds in
    # the last row.
    with_bug(tmp_path, monkeypatch, "packed.h", "if (k >= K) break;", "")
    errors = failures("dequantize", "ternary", DEQUANTIZE_SHAPES)
    assert set(errors) == {s for s in DEQUANTIZE_SHAPES if s[1] % 5}
    assert all(isinstance(e, EmulatorError) and "past the end of input 'scales'" in str(e)
               for e in errors.values())


def test_gemv_reading_one_unit_too_far_is_an_emulator_error(tmp_path, monkeypatch):
    # The lanes' loop runs one packed unit too far: the inputs of the unit past the row are
    # read past the end of x (last row of x) and of the weight (last row of W).
    with_bug(tmp_path, monkeypatch, "packed_gemv.metal", "unit < units_per_row;",
             "unit <= units_per_row;")
    errors = failures("gemv", "binary", GEMV_SHAPES)
    assert set(errors) == set(GEMV_SHAPES)
    assert all(isinstance(e, EmulatorError) and "past the end of input" in str(e)
               for e in errors.values())


def test_ternary_gemm_reading_one_byte_too_far_is_an_emulator_error(tmp_path, monkeypatch):
    # Without `j < 15` the W tile loader fetches the next byte after its last trit: past the
    # row's end when K is a multiple of 5 (K = 640).
    with_bug(tmp_path, monkeypatch, "packed.h", "if (++d == 5 && j < 15) {", "if (++d == 5) {")
    errors = failures("gemm", "ternary", GEMM_SHAPES)
    assert {s for s in GEMM_SHAPES if s[2] % 5 == 0} <= set(errors)
    assert any("past the end of input 'w'" in str(e) for e in errors.values())


@pytest.mark.parametrize("kernel,file,old,new,shapes", [
    ("gemv", "packed.h", "ulong(unit / 4)", "ulong((unit / 4) % 8)", GEMV_SHAPES),
    ("gemm", "packed.h", "ulong(k0 / GROUP)", "ulong((k0 / GROUP) % 8)", GEMM_SHAPES),
    ("dequantize", "packed.h", "ulong(unit / 4)", "ulong((unit / 4) % 8)", DEQUANTIZE_SHAPES),
], ids=["gemv", "gemm", "dequantize"])
def test_scale_index_wrapping_after_8_groups_is_caught_only_by_k_above_1024(
        tmp_path, monkeypatch, kernel, file, old, new, shapes):
    with_bug(tmp_path, monkeypatch, file, old, new)
    errors = failures(kernel, "binary", shapes)
    k = -1  # K is the last entry of every shape
    assert {s for s in errors} == {s for s in shapes if s[k] > 1024}
