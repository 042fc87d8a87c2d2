"""The CPU emulator for `mx.fast.metal_kernel` on small kernels with known answers, and its
checks: out-of-bounds accesses, uninitialised locals, races under each schedule."""

from bonsai_mlx.kernels import emulator
from bonsai_mlx.kernels.emulator import EmulatorError, metal_kernel

import mlx.core as mx
import numpy as np
import pytest
from kernel_cases import needs_cxx, needs_pattern_init


def make(backend, *args, **kwargs):
    if backend == "metal":
        return mx.fast.metal_kernel(*args, **kwargs)
    return metal_kernel(*args, **kwargs)


def run1(kernel, **kwargs):
    out = kernel(**kwargs)
    return [np.array(o.astype(mx.float32)) for o in out]


@pytest.fixture(params=["emulator", pytest.param("metal", marks=pytest.mark.metal)])
def backend(request):
    """Always collected; without an Apple GPU the Metal ones show as skipped."""
    if request.param == "emulator" and emulator.compiler() is None:
        pytest.skip("the Metal emulator needs g++ (or $CXX) to compile kernels")
    return request.param


def test_elementwise_with_template_shapes_and_strides(backend):
    source = """
        uint i = thread_position_in_grid.x;
        uint j = thread_position_in_grid.y;
        if (i >= uint(inp_shape[1]) || j >= uint(inp_shape[0])) return;
        T v = inp[j * inp_strides[0] + i * inp_strides[1]];
        out[j * inp_shape[1] + i] = metal::exp(v) * T(SCALE) + T(inp_ndim);
    """
    k = make(backend, "elementwise", ["inp"], ["out"], source)
    x = np.linspace(-1, 1, 35, dtype=np.float32).reshape(5, 7)
    (y,) = run1(
        k,
        inputs=[mx.array(x)],
        template=[("T", mx.float32), ("SCALE", 3)],
        grid=(8, 5, 1),
        threadgroup=(4, 2, 1),
        output_shapes=[(5, 7)],
        output_dtypes=[mx.float32],
    )
    np.testing.assert_allclose(y, np.exp(x) * 3 + 2, rtol=1e-6)


REDUCE = """
    threadgroup float buf[128];
    uint t = thread_position_in_threadgroup.x;
    buf[t] = x[thread_position_in_grid.x];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint s = 64; s > 0; s >>= 1) {
        if (t < s) buf[t] += buf[t + s];
        LOOP_BARRIER
    }
    AFTER_LOOP
    if (t == 0) y[threadgroup_position_in_grid.x] = buf[0];
"""
BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


def reduce_sums(backend, loop_barrier, after_loop):
    src = REDUCE.replace("LOOP_BARRIER", loop_barrier).replace("AFTER_LOOP", after_loop)
    k = make(backend, "tg_reduce", ["x"], ["y"], src)
    x = np.arange(3 * 128, dtype=np.float32)
    (y,) = run1(
        k,
        inputs=[mx.array(x)],
        grid=(3 * 128, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(3,)],
        output_dtypes=[mx.float32],
    )
    return y, x.reshape(3, 128).sum(axis=1)


def test_threadgroup_reduction_with_barriers(backend):
    y, expected = reduce_sums(backend, BARRIER, "")
    np.testing.assert_array_equal(y, expected)


@needs_cxx
def test_misplaced_barrier_changes_the_result():
    # The same reduction with the loop's barrier moved after the loop: a real race, which
    # the emulator must expose (fibers run one after another between barriers).
    y, expected = reduce_sums("emulator", "", BARRIER)
    assert not np.array_equal(y, expected)


def test_simd_functions(backend):
    source = """
        uint i = thread_position_in_grid.x;
        uint lane = thread_index_in_simdgroup;
        float v = x[i];
        out[i * 6 + 0] = simd_sum(v);
        out[i * 6 + 1] = simd_max(v);
        out[i * 6 + 2] = simd_shuffle(v, (lane + 5) % 32);
        out[i * 6 + 3] = simd_shuffle_down(v, 3);
        out[i * 6 + 4] = simd_shuffle_xor(v, 1);
        out[i * 6 + 5] = simd_broadcast(v, 7);
    """
    k = make(backend, "simd_ops", ["x"], ["out"], source)
    rng = np.random.default_rng(0)
    x = rng.integers(-50, 50, size=64).astype(np.float32)
    (y,) = run1(
        k,
        inputs=[mx.array(x)],
        grid=(64, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(64, 6)],
        output_dtypes=[mx.float32],
    )
    g = x.reshape(2, 32)
    lane = np.arange(32)
    expected = np.stack(
        [
            np.repeat(g.sum(1), 32),
            np.repeat(g.max(1), 32),
            g[:, (lane + 5) % 32].ravel(),
            np.where(lane + 3 < 32, g[:, np.minimum(lane + 3, 31)], g).ravel(),
            g[:, lane ^ 1].ravel(),
            np.repeat(g[:, 7], 32),
        ],
        axis=1,
    )
    np.testing.assert_array_equal(y, expected)


MMA = """
    uint sg = simdgroup_index_in_threadgroup;
    simdgroup_matrix<T, 8, 8> A, B;
    simdgroup_matrix<float, 8, 8> C = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
    simdgroup_load(A, a + sg * 64, 8);
    simdgroup_load(B, b + sg * 64, 8, ulong2(0, 0), TRANSPOSE_B);
    simdgroup_multiply_accumulate(C, A, B, C);
    simdgroup_store(C, c + sg * 64, 8);
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_simdgroup_matrix_multiply_accumulate(backend, dtype, transpose_b):
    k = make(backend, "mma8", ["a", "b"], ["c"], MMA)
    rng = np.random.default_rng(1)
    a = rng.integers(-4, 5, size=(2, 8, 8)).astype(np.float32)
    b = rng.integers(-4, 5, size=(2, 8, 8)).astype(np.float32)
    (c,) = run1(
        k,
        inputs=[mx.array(a).astype(dtype), mx.array(b).astype(dtype)],
        template=[("T", dtype), ("TRANSPOSE_B", transpose_b)],
        grid=(64, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(2, 8, 8)],
        output_dtypes=[mx.float32],
    )
    bb = b.transpose(0, 2, 1) if transpose_b else b
    np.testing.assert_array_equal(c, a @ bb + 1)


@needs_cxx
def test_thread_elements_follow_the_fragment_layout():
    # Lane l holds row fm, columns fn, fn + 1 (the layout MLX's steel GEMM uses).
    source = """
        simdgroup_matrix<float, 8, 8> A;
        simdgroup_load(A, a, 8);
        uint l = thread_index_in_simdgroup;
        out[2 * l] = A.thread_elements()[0];
        out[2 * l + 1] = A.thread_elements()[1];
    """
    k = metal_kernel("frag_layout", ["a"], ["out"], source)
    a = np.arange(64, dtype=np.float32)
    (y,) = run1(
        k,
        inputs=[mx.array(a)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(64,)],
        output_dtypes=[mx.float32],
    )
    lane = np.arange(32)
    qid = lane // 4
    fm = (qid & 4) + (lane // 2) % 4
    fn = (qid & 2) * 2 + (lane % 2) * 2
    expected = np.stack([fm * 8 + fn, fm * 8 + fn + 1], axis=1).ravel()
    np.testing.assert_array_equal(y, expected)
    assert sorted(expected) == list(range(64))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_and_bfloat_io(backend, dtype):
    source = """
        uint i = thread_position_in_grid.x;
        float v = float(x[i]);
        y[i] = T(v * 3.0f + 0.5f);
        z[i] = v;
    """
    k = make(backend, "half_io", ["x"], ["y", "z"], source)
    x = mx.array(np.linspace(-3, 3, 50, dtype=np.float32)).astype(dtype)
    y, z = k(
        inputs=[x],
        template=[("T", dtype)],
        grid=(50, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(50,), (50,)],
        output_dtypes=[dtype, mx.float32],
    )
    assert y.dtype == dtype
    xf = np.array(x.astype(mx.float32))
    np.testing.assert_array_equal(np.array(z), xf)
    expected = mx.array(xf * 3 + 0.5).astype(dtype)  # one rounding, as the kernel does
    np.testing.assert_array_equal(
        np.array(y.astype(mx.float32)), np.array(expected.astype(mx.float32))
    )


def test_partial_edge_threadgroups(backend):
    # grid (10, 3) in threadgroups of (4, 2): edge groups are smaller, outside threads absent.
    source = """
        uint3 g = thread_position_in_grid;
        uint idx = g.y * 12 + g.x;
        out[idx * 3 + 0] = float(threads_per_threadgroup.x * threads_per_threadgroup.y);
        out[idx * 3 + 1] = float(thread_index_in_threadgroup);
        uint3 tg = threadgroup_position_in_grid;
        out[idx * 3 + 2] = float(tg.x + 10 * tg.y);
    """
    k = make(backend, "edges", ["dummy"], ["out"], source)
    (y,) = run1(
        k,
        inputs=[mx.zeros((16,))],
        grid=(10, 3, 1),
        threadgroup=(4, 2, 1),
        output_shapes=[(4, 12, 3)],
        output_dtypes=[mx.float32],
        init_value=-1.0,
    )
    gy, gx = np.mgrid[0:3, 0:10]
    sx = np.where(gx >= 8, 2, 4)
    sy = np.where(gy >= 2, 1, 2)
    lx, ly = gx % 4, gy % 2
    np.testing.assert_array_equal(y[:3, :10, 0], sx * sy)
    np.testing.assert_array_equal(y[:3, :10, 1], ly * sx + lx)
    np.testing.assert_array_equal(y[:3, :10, 2], gx // 4 + 10 * (gy // 2))
    assert (y[:, 10:] == -1).all() and (y[3] == -1).all()  # no thread outside the grid


@needs_cxx
def test_scalar_and_small_inputs_use_constant_references():
    source = """
        uint i = thread_position_in_grid.x;
        out[i] = a[i] * s + small[i % 3];
    """
    k = metal_kernel("consts", ["a", "s", "small"], ["out"], source)
    inputs = [mx.arange(20, dtype=mx.float32), mx.array(2.0), mx.array([1.0, 2.0, 3.0])]
    func = k.kernel_name(
        [emulator._to_numpy(x) for x in inputs], [x.dtype for x in inputs], [mx.float32], []
    )
    src = k.generate_source(
        func, [emulator._to_numpy(x) for x in inputs], [x.dtype for x in inputs], [mx.float32], []
    )
    assert func == "custom_kernel_consts_float_floats_floatc_float"
    assert "const device float* a [[buffer(0)]]" in src
    assert "const constant float& s [[buffer(1)]]" in src
    assert "const constant float* small [[buffer(2)]]" in src
    assert "uint3 thread_position_in_grid [[thread_position_in_grid]]" in src
    (y,) = run1(
        k,
        inputs=inputs,
        grid=(20, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(20,)],
        output_dtypes=[mx.float32],
    )
    np.testing.assert_array_equal(y, np.arange(20) * 2 + np.array([1, 2, 3])[np.arange(20) % 3])


@needs_cxx
def test_divergent_barrier_is_reported():
    source = """
        threadgroup float t[64];
        uint i = thread_position_in_threadgroup.x;
        t[i] = 1.0f;
        if (i < 32) threadgroup_barrier(mem_flags::mem_threadgroup);
        else simdgroup_barrier(mem_flags::mem_none);
        if (i < 32) { threadgroup_barrier(mem_flags::mem_threadgroup); }
        out[i] = t[63 - i];
    """
    k = metal_kernel("divergent", ["x"], ["out"], source)
    with pytest.raises(EmulatorError, match="divergent threadgroup_barrier"):
        k(
            inputs=[mx.zeros((64,))],
            grid=(64, 1, 1),
            threadgroup=(64, 1, 1),
            output_shapes=[(64,)],
            output_dtypes=[mx.float32],
        )


@needs_cxx
def test_threadgroup_memory_limit_is_enforced():
    source = """
        threadgroup float big[9000];
        big[thread_position_in_threadgroup.x] = 0.0f;
        out[0] = big[0];
    """
    k = metal_kernel("too_big", ["x"], ["out"], source)
    with pytest.raises(EmulatorError, match="32 KiB"):
        k(
            inputs=[mx.zeros((8,))],
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )


@needs_cxx
def test_unwritten_outputs_are_nan_without_init_value():
    k = metal_kernel("half_write", ["x"], ["out"], "out[0] = x[0];")
    (y,) = run1(
        k,
        inputs=[mx.ones((8,))],
        grid=(1, 1, 1),
        threadgroup=(1, 1, 1),
        output_shapes=[(2,)],
        output_dtypes=[mx.float32],
    )
    assert y[0] == 1 and np.isnan(y[1])


@needs_cxx
@pytest.mark.parametrize("order", ["simdgroups", "reverse", "round-robin"])
def test_every_schedule_runs_barriers_correctly_and_exposes_races(monkeypatch, order):
    monkeypatch.setenv("BONSAI_EMULATOR_SCHEDULE", order)
    y, expected = reduce_sums("emulator", BARRIER, "")
    np.testing.assert_array_equal(y, expected)
    y, expected = reduce_sums("emulator", "", BARRIER)
    assert not np.array_equal(y, expected)


def run_on_16(name: str, source: str):
    k = metal_kernel(name, ["x"], ["out"], source)
    return run1(
        k,
        inputs=[mx.arange(16, dtype=mx.float32)],
        grid=(16, 1, 1),
        threadgroup=(16, 1, 1),
        output_shapes=[(16,)],
        output_dtypes=[mx.float32],
    )[0]


@needs_cxx
@pytest.mark.parametrize(
    "source,message",
    [
        ("out[thread_position_in_grid.x + 1] = x[0];",
         r"out-of-bounds (write|access) past the end of output 'out' \(byte 64 of 64\)"),
        # one lane at fault, so the message is the same under every schedule
        ("out[thread_position_in_grid.x] = x[thread_position_in_grid.x == 15 ? 16 : 0];",
         r"out-of-bounds (read|access) past the end of input 'x' \(byte 64 of 64\)"),
        ("out[thread_position_in_grid.x == 0 ? -3 : int(thread_position_in_grid.x)] = 1.0f;",
         r"out-of-bounds write up to 12 byte\(s\) before the start of output 'out'"),
        ("device float* p = (device float*)nullptr; p[0] = 1.0f;",
         r"(write|access) of address 0x0, next to no buffer"),
        ("volatile float big[200000]; big[thread_position_in_grid.x] = 1.0f;",
         r"stack overflow in a kernel thread"),
    ],
    ids=["write-past-end", "read-past-end", "write-before-start", "wild-pointer", "stack"],
)
def test_out_of_bounds_accesses_are_emulator_errors_not_crashes(source, message):
    # Buffers end against inaccessible pages (a fault names the buffer) and carry a canary
    # below; the test process survives and the next launch runs normally. (Reads and writes
    # are told apart on x86-64 Linux; elsewhere the message says "access".)
    with pytest.raises(EmulatorError, match=message):
        run_on_16("oob", source)
    np.testing.assert_array_equal(run_on_16("copy", "out[thread_position_in_grid.x] = "
                                            "x[thread_position_in_grid.x];"), np.arange(16))


@needs_cxx
def test_the_previous_fault_handler_is_restored_after_a_launch(tmp_path):
    # After a faulting launch, a real crash elsewhere still reaches Python's faulthandler.
    import subprocess
    import sys

    script = (
        "import ctypes, bonsai_mlx, mlx.core as mx\n"
        "from bonsai_mlx.kernels.emulator import metal_kernel, EmulatorError\n"
        "k = metal_kernel('oob', ['x'], ['out'], 'out[thread_position_in_grid.x + 1] = 0;')\n"
        "try:\n"
        "    k(inputs=[mx.zeros((16,))], grid=(16, 1, 1), threadgroup=(16, 1, 1),\n"
        "      output_shapes=[(16,)], output_dtypes=[mx.float32])\n"
        "except EmulatorError:\n"
        "    print('caught', flush=True)\n"
        "ctypes.string_at(0)\n"
    )
    env = dict(__import__("os").environ, BONSAI_EMULATOR_CACHE=str(emulator.cache_dir()))
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", script], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "caught"
    assert proc.returncode != 0 and "Fatal Python error: Segmentation fault" in proc.stderr


@needs_pattern_init
def test_uninitialised_locals_are_not_zero():
    # Compiled with -ftrivial-auto-var-init=pattern: a kernel reading a local it never wrote
    # gets a pattern (g++: -1.7e38), not the 0 that an accumulator bug would hide behind.
    y = run_on_16("uninit", "float acc[4]; out[thread_position_in_grid.x] = "
                  "acc[thread_position_in_grid.x % 4];")
    assert (y != 0).all()
