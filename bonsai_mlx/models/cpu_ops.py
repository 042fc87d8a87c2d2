"""Attention and element-wise work that MLX's CPU backend does slowly, done in numpy.

MLX's CPU `exp`, `sigmoid`, `tanh` and `erf` run scalar code: on a 2-core EPYC (Zen 4)
guest, `mx.exp` over 14 M float32 values took ~20x numpy's vectorised `np.exp`, and SiLU
~8x numpy's (benchmarks/RESULTS.md). So on the CPU, for float32, these functions evaluate
their input, compute in numpy (rows split over the cores; numpy releases the GIL in its
loops) and hand back a new MLX array. Everywhere else (a GPU, other dtypes) and inside
`mx.compile` / `mx.vmap`, which cannot evaluate arrays, they are plain MLX ops. Gradients
come from MLX vjps (numpy is invisible to `mx.grad`).

`attention` is `mx.fast.scaled_dot_product_attention` except on the CPU for float32, where
MLX's version is unfused (a matmul, a softmax with the scalar exp, a matmul): there the two
matmuls go to BLAS a block of query rows at a time and the softmax to numpy.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# Attention scores held at once on the CPU path (floats): 64 MB in float32.
SCORE_ELEMENTS = 1 << 24


def _numpy_rows(x: mx.array) -> np.ndarray | None:
    """x evaluated, as a 2-D numpy view (rows, last axis); None when numpy should not run:
    not float32, not on the CPU, or inside a transformation that cannot evaluate."""
    if x.dtype != mx.float32 or mx.default_device() != mx.cpu or x.size == 0 or x.ndim == 0:
        return None
    try:
        mx.eval(x)
    except ValueError:  # mx.compile / mx.vmap tracing
        return None
    return np.asarray(x).reshape(-1, x.shape[-1])


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_threads(), thread_name_prefix="bonsai-cpu-ops")


def _by_rows(kernel, a: np.ndarray, out_cols: int) -> np.ndarray:
    """out[r] = kernel(a[r], out[r]) for blocks of rows on the pool's threads."""
    out = np.empty((a.shape[0], out_cols), np.float32)
    bounds = np.linspace(0, a.shape[0], min(_threads(), a.shape[0]) + 1).astype(int)
    list(_pool().map(lambda i: kernel(a[bounds[i]:bounds[i + 1]], out[bounds[i]:bounds[i + 1]]),
                     range(len(bounds) - 1)))
    return out


def _softmax_kernel(x: np.ndarray, y: np.ndarray) -> None:
    np.subtract(x, x.max(axis=-1, keepdims=True), out=y)
    np.exp(y, out=y)
    y /= y.sum(axis=-1, keepdims=True)


def _swiglu_kernel(x: np.ndarray, y: np.ndarray) -> None:
    h = y.shape[-1]
    _silu_kernel(x[:, :h], y)
    y *= x[:, h:]


def _silu_kernel(x: np.ndarray, y: np.ndarray) -> None:
    np.negative(x, out=y)
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88 gives x / inf = -0: right
        np.exp(y, out=y)
    y += 1
    np.divide(x, y, out=y)  # x / (1 + exp(-x))


@mx.custom_function
def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x), as `nn.silu`."""
    a = _numpy_rows(x)
    if a is None:
        return nn.silu(x)
    return mx.array(_by_rows(_silu_kernel, a, a.shape[1]).reshape(x.shape))


# With one argument, a custom function's vjp gets that argument (not a tuple) as `primals`
# and returns one array.
@silu.vjp
def _silu_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    sig = mx.sigmoid(x)
    return cotangent * sig * (1 + x * (1 - sig))


# jvps too (forward mode): MLX would differentiate the numpy forward as a constant (zero).
@silu.jvp
def _silu_jvp(x: mx.array, tangent: mx.array) -> mx.array:
    sig = mx.sigmoid(x)
    return tangent * sig * (1 + x * (1 - sig))


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (max-subtracted, like `mx.softmax(precise=True)`)."""
    a = _numpy_rows(x)
    if a is None:
        return mx.softmax(x, axis=-1, precise=True)
    return mx.array(_by_rows(_softmax_kernel, a, a.shape[1]).reshape(x.shape))


@softmax.vjp
def _softmax_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


@softmax.jvp
def _softmax_jvp(x: mx.array, tangent: mx.array) -> mx.array:
    y = mx.softmax(x, axis=-1, precise=True)
    return y * (tangent - (tangent * y).sum(axis=-1, keepdims=True))


@mx.custom_function
def swiglu(x: mx.array) -> mx.array:
    """silu(a) * b for x = [a | b] split in halves along the last axis."""
    a = _numpy_rows(x)
    if a is None:
        first, second = mx.split(x, 2, axis=-1)
        return nn.silu(first) * second
    out = _by_rows(_swiglu_kernel, a, a.shape[1] // 2)
    return mx.array(out.reshape(*x.shape[:-1], x.shape[-1] // 2))


@swiglu.vjp
def _swiglu_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    a, b = mx.split(x, 2, axis=-1)
    sig = mx.sigmoid(a)
    d_a = cotangent * b * sig * (1 + a * (1 - sig))
    return mx.concatenate([d_a, cotangent * a * sig], axis=-1)


@swiglu.jvp
def _swiglu_jvp(x: mx.array, tangent: mx.array) -> mx.array:
    a, b = mx.split(x, 2, axis=-1)
    t_a, t_b = mx.split(tangent, 2, axis=-1)
    sig = mx.sigmoid(a)
    return t_a * b * sig * (1 + a * (1 - sig)) + a * sig * t_b


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q @ k.T * scale) @ v for (B, H, S, D) arrays (see the module docstring)."""
    if mx.default_device() != mx.cpu or q.dtype != mx.float32 or q.shape[2] == 0:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    b, h, s, _ = q.shape
    rows = max(1, SCORE_ELEMENTS // (b * h * k.shape[2]))
    q, kt = q * scale, k.swapaxes(-1, -2)
    outs = []
    for i in range(0, s, rows):
        out = softmax(q[:, :, i : i + rows] @ kt) @ v
        try:  # frees this block's scores and probabilities before the next block's
            mx.eval(out)
        except ValueError:  # mx.compile / mx.vmap tracing: MLX schedules it
            pass
        outs.append(out)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
