"""The transformer's CPU attention (BLAS matmuls in blocks of query rows + numpy softmax)
against exact float64 attention, with gradients and under mx.compile."""

from bonsai_mlx.models import transformer

import mlx.core as mx
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
    monkeypatch.setattr(transformer, "_CPU_SCORE_ELEMENTS", block)
    with mx.stream(mx.cpu):
        out = transformer._attention_core(*qkv, 0.25)
    ref = exact_attention(*qkv, 0.25)
    assert out.shape == ref.shape
    assert np.abs(np.array(out) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_cpu_attention_gradients_equal_mlx_softmax(qkv):
    def loss(attention, q, k, v):
        return (attention(q, k, v) * mx.linspace(-1, 1, 16)).sum()

    ours = lambda q, k, v: transformer._attention_core(q, k, v, 0.25)  # noqa: E731
    plain = lambda q, k, v: mx.softmax((q @ k.swapaxes(-1, -2)) * 0.25, axis=-1) @ v  # noqa: E731
    got = mx.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(*qkv)
    want = mx.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(*qkv)
    for g, w in zip(got, want, strict=True):
        assert float(mx.abs(w).max()) > 0
        assert float(mx.abs(g - w).max()) <= 1e-4 * float(mx.abs(w).max())


def test_cpu_attention_compiles(qkv):
    compiled = mx.compile(lambda q, k, v: transformer._attention_core(q, k, v, 0.25))
    out = compiled(*qkv)
    ref = exact_attention(*qkv, 0.25)
    assert np.abs(np.array(out) - ref).max() <= 1e-5 * np.abs(ref).max()
