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
    # The epilogue writes only the first 4 of each lane's 8 outputs.
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal", "for (int e = 0; e < 8; ++e) {",
             "for (int e = 0; e < 4; ++e) {")
    errors = failures("gemm", "binary", GEMM_SHAPES)
    assert set(errors) == {s for s in GEMM_SHAPES if s[1] > 4}  # N = 1 has no column 4
    assert all("not finite" in str(e) for e in errors.values())


def test_missing_barrier_between_k_steps_is_caught_one_simdgroup_at_a_time(tmp_path,
                                                                          monkeypatch):
    # The next K step's tiles overwrite threadgroup memory other SIMD-groups still read.
    # Round-robin keeps SIMD-groups in step and misses this race: CI runs both schedules.
    monkeypatch.setenv("BONSAI_EMULATOR_SCHEDULE", "simdgroups")
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal",
             "        threadgroup_barrier(mem_flags::mem_threadgroup);  // before the next step's "
             "tiles\n", "")
    errors = failures("gemm", "binary", GEMM_SHAPES)
    assert errors and all(isinstance(e, AssertionError) for e in errors.values())


def test_simdgroups_sharing_a_staging_buffer_are_caught_round_robin(tmp_path, monkeypatch):
    # Every SIMD-group stages its 8-row strips in the same place: one SIMD-group at a time
    # never overlaps them, round-robin does (the race the other schedule misses).
    monkeypatch.setenv("BONSAI_EMULATOR_SCHEDULE", "round-robin")
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal",
             "threadgroup T* stage = smem + sg * (8 * LD);", "threadgroup T* stage = smem;")
    errors = failures("gemm", "ternary", GEMM_SHAPES)
    assert errors and all(isinstance(e, AssertionError) for e in errors.values())


def test_uninitialised_gemv_accumulator_is_caught(tmp_path, monkeypatch):
    with_bug(tmp_path, monkeypatch, "packed_gemv.metal", "            acc[m][r] = 0.0f;\n", "")
    errors = failures("gemv", "binary", GEMV_SHAPES)
    assert set(errors) == set(GEMV_SHAPES)
    assert all(isinstance(e, AssertionError) for e in errors.values())


@needs_pattern_init
def test_uninitialised_gemm_accumulator_is_caught(tmp_path, monkeypatch):
    # Without the pattern, the one-threadgroup shapes start from a fresh (zero) stack and pass.
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal",
             "acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);", "")
    errors = failures("gemm", "ternary", GEMM_SHAPES)
    assert set(errors) == set(GEMM_SHAPES)


def test_write_past_the_output_is_an_emulator_error(tmp_path, monkeypatch):
    # Without its column guard the epilogue writes all 8 outputs of a lane: past the end of the
    # buffer in the last row when N is not a multiple of 8.
    with_bug(tmp_path, monkeypatch, "packed_gemm.metal", "if (n + e < N) {", "if (true) {")
    errors = failures("gemm", "binary", GEMM_SHAPES)
    ragged = {s for s in GEMM_SHAPES if s[1] % 8}
    assert ragged and ragged <= set(errors)
    assert all(isinstance(errors[s], EmulatorError) for s in ragged)
    assert all("past the end of output 'y'" in str(errors[s]) for s in ragged)


def test_dequantize_reading_the_next_groups_scale_is_an_emulator_error(tmp_path, monkeypatch):
    # The scale of a thread's 16 outputs taken at their end, not their start: the last chunk of
    # a row reads the scale after the row's last (past the end of the scales in the last row).
    with_bug(tmp_path, monkeypatch, "dequantize.metal", "scales[n * groups + k / GROUP]",
             "scales[n * groups + (k + 16) / GROUP]")
    for fmt in ("binary", "ternary"):
        errors = failures("dequantize", fmt, DEQUANTIZE_SHAPES)
        assert set(errors) == set(DEQUANTIZE_SHAPES)
        assert all(isinstance(e, EmulatorError) and "past the end of input 'scales'" in str(e)
                   for e in errors.values())


def test_gemv_reading_one_step_too_far_is_an_emulator_error(tmp_path, monkeypatch):
    # The lanes' guard lets a lane start a slice at k = K: its inputs are read past the end
    # of x (last row of x) and its weights past the end of W (last row of W).
    with_bug(tmp_path, monkeypatch, "packed_gemv.metal", "if (k < K) {", "if (k <= K) {")
    errors = failures("gemv", "binary", GEMV_SHAPES)
    assert set(errors) == set(GEMV_SHAPES)
    assert all(isinstance(e, EmulatorError) and "past the end of input" in str(e)
               for e in errors.values())


def test_ternary_decoder_reading_a_byte_it_does_not_need_is_an_emulator_error(tmp_path,
                                                                              monkeypatch):
    # Without its guard the decoder of 8 weights always reads 3 bytes: the third is past the
    # row when the chunk ends in the row's last byte (K = 640, the last row: past the buffer).
    with_bug(tmp_path, monkeypatch, "packed.h", "if (5u * uint(j) < d + uint(L)) {",
             "if (true) {")
    errors = failures("gemv", "ternary", GEMV_SHAPES)
    eight = {s for s in GEMV_SHAPES if s[0] > 4}  # M > 4: chunks of 8 weights
    assert eight and set(errors) == eight
    assert all(isinstance(e, EmulatorError) and "past the end of input 'w'" in str(e)
               for e in errors.values())


@pytest.mark.parametrize("kernel,file,old,new,shapes", [
    ("gemv", "packed_gemv.metal", "k / GROUP", "(k / GROUP) % 8", GEMV_SHAPES),
    ("gemm", "packed.h", "k0 / GROUP", "(k0 / GROUP) % 8", GEMM_SHAPES),
    ("dequantize", "dequantize.metal", "k / GROUP", "(k / GROUP) % 8", DEQUANTIZE_SHAPES),
], ids=["gemv", "gemm", "dequantize"])
def test_scale_index_wrapping_after_8_groups_is_caught_only_by_k_above_1024(
        tmp_path, monkeypatch, kernel, file, old, new, shapes):
    with_bug(tmp_path, monkeypatch, file, old, new)
    errors = failures(kernel, "binary", shapes)
    k = -1  # K is the last entry of every shape
    assert {s for s in errors} == {s for s in shapes if s[k] > 1024}
