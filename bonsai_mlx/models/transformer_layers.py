"""The FLUX.2 transformer's layers, named as diffusers names them, and the small element-wise
functions they share (`Fused`).

Numerics follow diffusers: the timestep sinusoid and the rotary embedding are computed in
float32 (the RoPE angles in float64, once per id set), everything else in the model dtype
(norms accumulate in float32 inside `mx.fast`).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

from bonsai_mlx.arrays import to_numpy
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models import cpu_ops

import mlx.core as mx
import mlx.nn as nn
import numpy as np

if TYPE_CHECKING:
    from bonsai_mlx.models.transformer import Flux2TransformerConfig

Rope = tuple[mx.array, mx.array]  # (cos, sin), each (S, head_dim / 2) float32, S = txt + img


def modulated_norm(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """LayerNorm without affine, then `(1 + scale) * x + shift`."""
    return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift


def gated_add(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    """The residual `x + gate * y`."""
    return x + gate * y


def swiglu(x: mx.array) -> mx.array:
    """SiLU of the first half times the second half (the last axis)."""
    a, b = mx.split(x, 2, axis=-1)
    return nn.silu(a) * b


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (2j, 2j+1) of x (B, H, S, D) by the angles of (S, D/2) tables.

    Done explicitly: `mx.fast.rope` takes one position per token, here each axis has its own.
    Computed in float32 like diffusers, then cast back.
    """
    xp = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)



class Fused:
    """The element-wise functions the blocks call, fused by `mx.compile` or run as they are.
    A model decides once (`Flux2Transformer(compile=...)`): on a GPU fusing pays; on the CPU
    backend compiling costs seconds of C++ compilation per new kernel for little gain."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        wrap = mx.compile if compiled else (lambda fn: fn)
        self.modulated_norm = wrap(modulated_norm)
        self.gated_add = wrap(gated_add)
        # uncompiled: numpy's vectorised exp on the CPU in float32 (cpu_ops), MLX elsewhere
        self.swiglu = wrap(swiglu) if compiled else cpu_ops.swiglu
        self.apply_rope = wrap(apply_rope)


def timestep_embedding(t: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """Sinusoidal embedding (B,) -> (B, dim) in float32, [cos | sin] order (diffusers'
    `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`)."""
    args = t.astype(mx.float32)[:, None] * _timestep_freqs(dim // 2, max_period)[None]
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


@functools.lru_cache(maxsize=8)
def _timestep_freqs(half: int, max_period: float) -> mx.array:
    """exp(-ln(max_period) * i / half) as float32: the exponent in float32 like diffusers,
    the exp correctly rounded (via float64). Arguments reach 1000 rad, so a 1-ulp
    difference in a frequency (MLX's float32 exp vs torch's) moves them by ~1e-4 rad."""
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / np.float32(half)
    return mx.array(np.exp(exponent.astype(np.float32).astype(np.float64)).astype(np.float32))


def rope_tables(
    ids: np.ndarray | mx.array, axes_dims: tuple[int, ...], theta: float
) -> Rope:
    """RoPE (cos, sin) tables for position ids (S, n_axes), each (S, sum(axes_dims) / 2).

    Angles and their cos/sin in float64 (text positions reach 511, where a float32 angle is
    off by ~3e-5 rad), then cast to float32, as diffusers does.
    """
    ids = to_numpy(ids)
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[-1] != len(axes_dims):
        raise BonsaiError(
            f"position ids must have shape (S, {len(axes_dims)}) or (B, S, {len(axes_dims)}), "
            f"got {ids.shape}"
        )
    pos = ids.astype(np.float32).astype(np.float64)
    angles = [
        np.outer(pos[:, i], 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        for i, d in enumerate(axes_dims)
    ]
    angle = np.concatenate(angles, axis=1)
    return mx.array(np.cos(angle).astype(np.float32)), mx.array(np.sin(angle).astype(np.float32))


def _heads(x: mx.array, head_dim: int) -> mx.array:
    """(B, S, H * D) -> (B, S, H, D)."""
    return x.reshape(*x.shape[:-1], -1, head_dim)


class ReferenceKV:
    """Keys and values of the reference-image tokens in one attention layer, each
    (1 or B, H, R, D) after the q/k norms and RoPE: what FLUX.2 [klein] KV
    (`Flux2KleinKVPipeline`) computes once and reuses at every denoising step.

    Empty, `fetch` keeps the keys and values it is given and returns them: the reference
    pass, in which reference tokens attend only to each other. Filled, it appends its own
    after the given ones: a denoising step, in which text and image tokens also attend to
    the references (attention is order-free over keys, so their place does not matter).
    """

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = keys, values
            return keys, values
        b = keys.shape[0]
        ref_k = mx.broadcast_to(self.keys, (b, *self.keys.shape[1:]))
        ref_v = mx.broadcast_to(self.values, (b, *self.values.shape[1:]))
        return mx.concatenate([keys, ref_k], axis=2), mx.concatenate([values, ref_v], axis=2)


def _attention(q: mx.array, k: mx.array, v: mx.array, rope: Rope, fused: Fused,
               cache: ReferenceKV | None = None) -> mx.array:
    """q, k, v (B, S, H, D) after the q/k norms -> (B, S, H * D); `cache` adds (or, empty,
    records) reference keys and values."""
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    cos, sin = rope
    q, k = fused.apply_rope(q, cos, sin), fused.apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.fetch(k, v)
    out = cpu_ops.attention(q, k, v, q.shape[-1] ** -0.5)
    b, h, s, d = out.shape
    return out.transpose(0, 2, 1, 3).reshape(b, s, h * d)


class TimestepEmbedder(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimeGuidanceEmbed(nn.Module):
    def __init__(self, config: Flux2TransformerConfig):
        super().__init__()
        self.in_channels = config.timestep_guidance_channels
        self.timestep_embedder = TimestepEmbedder(self.in_channels, config.inner_dim)
        if config.guidance_embeds:
            self.guidance_embedder = TimestepEmbedder(self.in_channels, config.inner_dim)

    def __call__(self, t: mx.array, guidance: mx.array | None, dtype: mx.Dtype) -> mx.array:
        temb = self.timestep_embedder(timestep_embedding(t, self.in_channels).astype(dtype))
        if guidance is not None and "guidance_embedder" in self:
            g = timestep_embedding(guidance, self.in_channels).astype(dtype)
            temb = temb + self.guidance_embedder(g)
        return temb


class Modulation(nn.Module):
    """`Linear(SiLU(temb))` chunked into `sets` x (shift, scale, gate), each (B, 1, dim)."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, dim * 3 * sets, bias=False)

    def __call__(self, temb: mx.array) -> list[tuple[mx.array, mx.array, mx.array]]:
        chunks = mx.split(self.linear(nn.silu(temb))[:, None, :], 3 * self.sets, axis=-1)
        return [tuple(chunks[3 * i : 3 * i + 3]) for i in range(self.sets)]


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, fused: Fused):
        super().__init__()
        self.fused = fused
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_out(self.fused.swiglu(self.linear_in(x)))


class JointAttention(nn.Module):
    """Double-stream attention: separate q/k/v per stream, one attention over [txt; img]."""

    def __init__(self, config: Flux2TransformerConfig, fused: Fused):
        super().__init__()
        dim, d, eps = config.inner_dim, config.attention_head_dim, config.eps
        self.head_dim, self.fused = d, fused
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = nn.RMSNorm(d, eps=eps)
        self.norm_k = nn.RMSNorm(d, eps=eps)
        self.to_out = [nn.Linear(dim, dim, bias=False)]
        self.add_q_proj = nn.Linear(dim, dim, bias=False)
        self.add_k_proj = nn.Linear(dim, dim, bias=False)
        self.add_v_proj = nn.Linear(dim, dim, bias=False)
        self.norm_added_q = nn.RMSNorm(d, eps=eps)
        self.norm_added_k = nn.RMSNorm(d, eps=eps)
        self.to_add_out = nn.Linear(dim, dim, bias=False)

    def __call__(
        self, x: mx.array, c: mx.array | None, rope: Rope, cache: ReferenceKV | None = None
    ) -> tuple[mx.array, mx.array | None]:
        d = self.head_dim
        q = self.norm_q(_heads(self.to_q(x), d))
        k = self.norm_k(_heads(self.to_k(x), d))
        v = _heads(self.to_v(x), d)
        if c is None:  # the reference pass: the image stream alone
            return self.to_out[0](_attention(q, k, v, rope, self.fused, cache)), None
        # joint sequence [txt; img], each (B, S, H, D)
        q = mx.concatenate([self.norm_added_q(_heads(self.add_q_proj(c), d)), q], axis=1)
        k = mx.concatenate([self.norm_added_k(_heads(self.add_k_proj(c), d)), k], axis=1)
        v = mx.concatenate([_heads(self.add_v_proj(c), d), v], axis=1)
        out = _attention(q, k, v, rope, self.fused, cache)
        n_txt = c.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class TransformerBlock(nn.Module):
    """Double-stream block: image and text streams with their own weights, joint attention."""

    def __init__(self, config: Flux2TransformerConfig, fused: Fused):
        super().__init__()
        self.eps, self.fused = config.eps, fused
        self.attn = JointAttention(config, fused)
        self.ff = FeedForward(config.inner_dim, config.mlp_hidden_dim, fused)
        self.ff_context = FeedForward(config.inner_dim, config.mlp_hidden_dim, fused)

    def __call__(self, x, c, mod_img, mod_txt, rope: Rope, cache: ReferenceKV | None = None
                 ) -> tuple[mx.array, mx.array | None]:
        """`c` None (with `mod_txt` None): the image stream alone (the reference pass)."""
        (shift, scale, gate), (shift2, scale2, gate2) = mod_img
        eps, norm, add = self.eps, self.fused.modulated_norm, self.fused.gated_add
        c_in = None
        if c is not None:
            (c_shift, c_scale, c_gate), (c_shift2, c_scale2, c_gate2) = mod_txt
            c_in = norm(c, c_shift, c_scale, eps)
        attn_x, attn_c = self.attn(norm(x, shift, scale, eps), c_in, rope, cache)
        x = add(x, gate, attn_x)
        x = add(x, gate2, self.ff(norm(x, shift2, scale2, eps)))
        if c is None:
            return x, None
        c = add(c, c_gate, attn_c)
        c = add(c, c_gate2, self.ff_context(norm(c, c_shift2, c_scale2, eps)))
        if c.dtype == mx.float16:
            c = mx.clip(c, -65504, 65504)
        return x, c


class ParallelSelfAttention(nn.Module):
    """Single-stream attention + SwiGLU MLP sharing one input and one output projection."""

    def __init__(self, config: Flux2TransformerConfig, fused: Fused):
        super().__init__()
        dim, d = config.inner_dim, config.attention_head_dim
        self.head_dim, self.fused = d, fused
        self.mlp_hidden = config.mlp_hidden_dim
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden, bias=False)
        self.norm_q = nn.RMSNorm(d, eps=config.eps)
        self.norm_k = nn.RMSNorm(d, eps=config.eps)
        self.to_out = nn.Linear(dim + self.mlp_hidden, dim, bias=False)

    def __call__(self, x: mx.array, rope: Rope, cache: ReferenceKV | None = None) -> mx.array:
        h = self.to_qkv_mlp_proj(x)
        dim = (h.shape[-1] - 2 * self.mlp_hidden) // 3
        q, k, v, mlp = mx.split(h, [dim, 2 * dim, 3 * dim], axis=-1)
        d = self.head_dim
        out = _attention(self.norm_q(_heads(q, d)), self.norm_k(_heads(k, d)), _heads(v, d), rope,
                         self.fused, cache)
        return self.to_out(mx.concatenate([out, self.fused.swiglu(mlp)], axis=-1))


class SingleTransformerBlock(nn.Module):
    def __init__(self, config: Flux2TransformerConfig, fused: Fused):
        super().__init__()
        self.eps, self.fused = config.eps, fused
        self.attn = ParallelSelfAttention(config, fused)

    def __call__(self, x: mx.array, mod, rope: Rope, cache: ReferenceKV | None = None
                 ) -> mx.array:
        shift, scale, gate = mod
        normed = self.fused.modulated_norm(x, shift, scale, self.eps)
        x = self.fused.gated_add(x, gate, self.attn(normed, rope, cache))
        if x.dtype == mx.float16:
            x = mx.clip(x, -65504, 65504)
        return x


class NormOut(nn.Module):
    """`LN(x) * (1 + scale) + shift` with (scale, shift) = Linear(SiLU(temb)), scale first."""

    def __init__(self, dim: int, eps: float, fused: Fused):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.linear = nn.Linear(dim, 2 * dim, bias=False)

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        scale, shift = mx.split(self.linear(nn.silu(temb))[:, None, :], 2, axis=-1)
        return self.fused.modulated_norm(x, shift, scale, self.eps)
