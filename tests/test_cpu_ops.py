"""bonsai_mlx/models/cpu_ops.py: attention (BLAS matmuls over blocks of query rows + numpy
softmax), SwiGLU and SiLU in numpy on the CPU, against exact float64 math, with gradients and
under mx.compile."""

from bonsai_mlx.models import cpu_ops

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest


def exact_attention(q, k, v, scale):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = q @ k.swapaxes(-1, -2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.fixture
def qkv():
    g = np.random.default_rng(0)
    # large logits, so a softmax without the max subtraction would overflow
    return [mx.array(g.standard_normal((2, 3, 37, 16), dtype=np.float32) * 6) for _ in "qkv"]


@pytest.mark.parametrize("block", [1 << 24, 3 * 2 * 37 * 5])  # one block; blocks of 5 rows
def test_cpu_attention_equals_exact_attention(qkv, block, monkeypatch):
    monkeypatch.setattr(cpu_ops, "SCORE_ELEMENTS", block)
    with mx.stream(mx.cpu):
        out = cpu_ops.attention(*qkv, 0.25)
    ref = exact_attention(*qkv, 0.25)
    assert out.shape == ref.shape
    assert np.abs(np.array(out) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_cpu_attention_gradients_equal_mlx_softmax(qkv):
    def loss(attention, q, k, v):
        return (attention(q, k, v) * mx.linspace(-1, 1, 16)).sum()

    ours = lambda q, k, v: cpu_ops.attention(q, k, v, 0.25)  # noqa: E731
    plain = lambda q, k, v: mx.softmax((q @ k.swapaxes(-1, -2)) * 0.25, axis=-1) @ v  # noqa: E731
    got = mx.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(*qkv)
    want = mx.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(*qkv)
    for g, w in zip(got, want, strict=True):
        assert float(mx.abs(w).max()) > 0
        assert float(mx.abs(g - w).max()) <= 1e-4 * float(mx.abs(w).max())


def test_cpu_attention_compiles(qkv):
    compiled = mx.compile(lambda q, k, v: cpu_ops.attention(q, k, v, 0.25))
    for inputs in (qkv, [a[:, :, ::-1] * 0.5 for a in qkv]):  # nothing frozen into the graph
        out = compiled(*inputs)
        ref = exact_attention(*inputs, 0.25)
        assert np.abs(np.array(out) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_cpu_attention_holds_one_block_of_scores_at_a_time(monkeypatch):
    """The full 8 x 2048 x 2048 scores are 128 MB; blocks of 4 MB keep the peak near one
    block's scores and probabilities, not every block's."""
    monkeypatch.setattr(cpu_ops, "SCORE_ELEMENTS", 1 << 20)
    g = np.random.default_rng(2)
    q, k, v = (mx.array(g.standard_normal((1, 8, 2048, 64), dtype=np.float32)) for _ in "qkv")
    with mx.stream(mx.cpu):
        mx.eval(q, k, v)
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        out = cpu_ops.attention(q, k, v, 0.125)
        mx.eval(out)
        peak = mx.get_peak_memory() - before
    assert peak < 32e6, f"{peak / 1e6:.0f} MB above the inputs"
    assert out.shape == (1, 8, 2048, 64)


def exact_swiglu(x):
    a, b = np.split(np.asarray(x, np.float64), 2, axis=-1)
    return a / (1 + np.exp(-a)) * b


@pytest.fixture
def gate_input():
    g = np.random.default_rng(1)
    return mx.array(g.standard_normal((3, 7, 2 * 24), dtype=np.float32) * 8)


def test_swiglu_equals_exact_math(gate_input):
    out = cpu_ops.swiglu(gate_input)
    ref = exact_swiglu(gate_input)
    assert out.shape == ref.shape and out.dtype == mx.float32
    assert np.abs(np.array(out) - ref).max() <= 1e-6 * np.abs(ref).max()


def _mlx_swiglu(x):
    a, b = mx.split(x, 2, axis=-1)
    return nn.silu(a) * b


def test_swiglu_gradient_equals_mlx_silu(gate_input):
    w = mx.linspace(-1, 1, 24)
    got = mx.grad(lambda x: (cpu_ops.swiglu(x) * w).sum())(gate_input)
    want = mx.grad(lambda x: (_mlx_swiglu(x) * w).sum())(gate_input)
    assert float(mx.abs(want).max()) > 0
    assert float(mx.abs(got - want).max()) <= 1e-5 * float(mx.abs(want).max())


def test_softmax_and_swiglu_fall_back_to_mlx_off_float32_and_under_compile(gate_input):
    compiled = mx.compile(cpu_ops.swiglu)
    ref = exact_swiglu(gate_input)
    assert np.abs(np.array(compiled(gate_input)) - ref).max() <= 1e-5 * np.abs(ref).max()
    half = cpu_ops.swiglu(gate_input.astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16
    assert np.abs(np.array(half.astype(mx.float32)) - ref).max() <= 3e-2 * np.abs(ref).max()
    s = gate_input.astype(mx.float16)
    assert cpu_ops.softmax(s).dtype == mx.float16


def test_silu_equals_exact_math_and_its_gradient_equals_mlx(gate_input):
    x = np.asarray(gate_input, np.float64)
    out = cpu_ops.silu(gate_input)
    ref = x / (1 + np.exp(-x))
    assert np.abs(np.array(out) - ref).max() <= 1e-6 * np.abs(ref).max()
    w = mx.linspace(-1, 1, gate_input.shape[-1])
    got = mx.grad(lambda a: (cpu_ops.silu(a) * w).sum())(gate_input)
    want = mx.grad(lambda a: (nn.silu(a) * w).sum())(gate_input)
    assert float(mx.abs(got - want).max()) <= 1e-5 * float(mx.abs(want).max())


def test_silu_of_a_scalar_equals_mlx():
    assert float(cpu_ops.silu(mx.array(1.5))) == pytest.approx(float(nn.silu(mx.array(1.5))))


def test_silu_of_very_negative_inputs_is_zero_without_warnings():
    import warnings

    x = mx.array([-1000.0, -100.0, -89.0, 0.0, 100.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = np.array(cpu_ops.silu(x))
    assert np.array_equal(out[:4], [0, 0, 0, 0]) and out[4] == 100.0



@pytest.fixture
def counted_ops(monkeypatch):
    """Calls of cpu_ops' functions, counted. The models look them up when called (attention,
    SiLU) or when built (SwiGLU): build models after this."""
    calls = dict.fromkeys(("attention", "swiglu", "silu"), 0)

    def counting(name, fn):
        def counted(*args):
            calls[name] += 1
            return fn(*args)

        return counted

    for name in calls:
        monkeypatch.setattr(cpu_ops, name, counting(name, getattr(cpu_ops, name)))
    return calls


def test_the_transformer_runs_attention_and_swiglu_through_cpu_ops(counted_ops, monkeypatch):
    from bonsai_mlx import bench

    model = bench.synthetic_transformer("bf16", mx.float32, tiny=True)  # dense, float32
    assert not model.compiled  # the CPU default: the element-wise functions run as they are
    cfg, g = model.config, np.random.default_rng(0)
    x = mx.array(g.standard_normal((1, 16, cfg.in_channels), dtype=np.float32))
    c = mx.array(g.standard_normal((1, 8, cfg.joint_attention_dim), dtype=np.float32))
    img = np.stack([np.zeros(16), np.arange(16) // 4, np.arange(16) % 4, np.zeros(16)], 1)
    txt = np.stack([np.zeros(8)] * 3 + [np.arange(8)], 1)
    refs = model.reference_kv(x[:, :4] * 0.5, img[:4] + [1, 0, 0, 0])
    counted_ops.update(attention=0, swiglu=0)
    out = model(x, c, 0.5, img, txt, reference_kv=refs)
    # one attention per block; SwiGLU in ff, ff_context and the single block's MLP
    assert counted_ops == {"attention": 2, "swiglu": 3, "silu": 0}
    # with the reference keys appended (24 + 4 keys for 24 queries) it is MLX's attention
    monkeypatch.setattr(cpu_ops, "attention", lambda q, k, v, scale:
                        mx.fast.scaled_dot_product_attention(q, k, v, scale=scale))
    expected = model(x, c, 0.5, img, txt, reference_kv=refs)
    np.testing.assert_allclose(np.array(out), np.array(expected), rtol=1e-5, atol=1e-5)


def test_the_vae_runs_silu_and_attention_through_cpu_ops(counted_ops):
    from bonsai_mlx import bench

    vae = bench.synthetic_vae(mx.float32, tiny=True)
    z = mx.array(np.random.default_rng(0).standard_normal(
        (1, 4, 4, vae.config.latent_channels), dtype=np.float32))
    resnets = 2 + sum(len(b.resnets) for b in vae.decoder.up_blocks)  # mid + up blocks
    vae.decode(z, tiled=False)
    # two per resnet and the output head's; the mid block's attention over all pixels
    assert counted_ops == {"attention": 1, "swiglu": 0, "silu": 2 * resnets + 1}
    counted_ops.update(attention=0, silu=0)
    vae.decode(z, tiled=True, tile_size=16)
    assert counted_ops["attention"] == 1 and counted_ops["silu"] > 2 * resnets + 1  # per tile


@pytest.mark.parametrize("name", ["silu", "softmax", "swiglu"])
def test_forward_mode_derivatives_equal_mlx(gate_input, name):
    plain = {"silu": nn.silu, "softmax": lambda x: mx.softmax(x, axis=-1, precise=True),
             "swiglu": lambda x: nn.silu(mx.split(x, 2, -1)[0]) * mx.split(x, 2, -1)[1]}[name]
    x = gate_input / 4
    tangent = mx.array(np.random.default_rng(3).standard_normal(x.shape, dtype=np.float32))
    with mx.stream(mx.cpu):
        (out,), (got,) = mx.jvp(getattr(cpu_ops, name), [x], [tangent])
        (ref,), (want,) = mx.jvp(plain, [x], [tangent])
    assert float(mx.abs(want).max()) > 0
    assert float(mx.abs(out - ref).max()) <= 1e-5 * float(mx.abs(ref).max())
    assert float(mx.abs(got - want).max()) <= 1e-5 * float(mx.abs(want).max())
