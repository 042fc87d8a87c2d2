"""The FLUX.2 [klein] transformer (diffusers' `Flux2Transformer2DModel`) in MLX.

Parameter names are exactly diffusers' (`transformer_blocks.0.attn.to_q.weight`, ...), so a
diffusers `transformer/` folder loads unchanged; `sanitize` maps Black Forest Labs'
single-file names onto them. Every linear layer is a plain bias-free `nn.Linear` called as
`self.<name>(x)`, so the quantised layers can replace them by path.

Numerics follow diffusers: the timestep sinusoid and the rotary embedding are computed in
float32 (the RoPE angles in float64, once per id set), everything else in the model dtype
(norms accumulate in float32 inside `mx.fast`).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bonsai_mlx.checks import config_from_dict, flag, integer, number
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models import cpu_ops
from bonsai_mlx.quant.layers import PACKED_LINEAR
from bonsai_mlx.quant.loading import (
    QUANT_CONFIG,
    WEIGHTS_STEM,
    load_packed_transformer_weights,
    packed_layout,
    packed_quantization_config,
)
from bonsai_mlx.weights import (
    DTYPES,
    check_weights,
    load_weights,
    parse_dtype,
    read_json,
    save_safetensors,
    write_json,
)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

DIFFUSERS_CLASS = "Flux2Transformer2DModel"
BFL_PREFIX = "model.diffusion_model."

Rope = tuple[mx.array, mx.array]  # (cos, sin), each (S, head_dim / 2) float32, S = txt + img


@dataclass
class Flux2TransformerConfig:
    """Fields and names as in diffusers' `transformer/config.json`; defaults are Klein 4B."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 5
    num_single_layers: int = 20
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 7680
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = field(default=(32, 32, 32, 32))
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = False

    def __post_init__(self) -> None:
        for name in ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "timestep_guidance_channels", "num_layers",
                     "num_single_layers", "out_channels"):
            value = getattr(self, name)
            if not (name == "out_channels" and value is None):
                setattr(self, name, integer(value, name, low=0 if "layers" in name else 1))
        for name in ("mlp_ratio", "rope_theta", "eps"):
            setattr(self, name, number(getattr(self, name), name, positive=True))
        self.guidance_embeds = flag(self.guidance_embeds, "guidance_embeds")
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if not isinstance(self.axes_dims_rope, (list, tuple)):
            raise BonsaiError(f"axes_dims_rope must be a list, not {self.axes_dims_rope!r}")
        self.axes_dims_rope = tuple(integer(d, "axes_dims_rope", low=1)
                                    for d in self.axes_dims_rope)
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(
            d % 2 for d in self.axes_dims_rope
        ):
            raise BonsaiError(
                f"axes_dims_rope {list(self.axes_dims_rope)} must be even and sum to "
                f"attention_head_dim {self.attention_head_dim}; fix the transformer config"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None
                  ) -> Flux2TransformerConfig:
        """Build from a config.json dict, ignoring keys that are not fields (`_class_name`, ...);
        errors name `source`."""
        return config_from_dict(cls, d, source)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": DIFFUSERS_CLASS, **d}


# ---------------------------------------------------------------------------------------
# Small pure functions, fused with mx.compile on a GPU. On the CPU backend compiling means
# seconds of C++ compilation per new kernel for little gain, so they run eagerly there.
# COMPILE: None = on a GPU only; True / False forces it (tests compare both paths).
COMPILE: bool | None = None


def _maybe_compiled(fn):
    compiled = mx.compile(fn)

    def call(*args):
        use = COMPILE if COMPILE is not None else mx.default_device() == mx.gpu
        return compiled(*args) if use else fn(*args)

    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


@_maybe_compiled
def _modulated_norm(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """LayerNorm without affine, then `(1 + scale) * x + shift`."""
    return mx.fast.layer_norm(x, None, None, eps) * (1 + scale) + shift


@_maybe_compiled
def _gated_add(x: mx.array, gate: mx.array, y: mx.array) -> mx.array:
    return x + gate * y


def _swiglu(x: mx.array) -> mx.array:
    """silu(a) * b for x = [a | b]; in numpy on the CPU (cpu_ops), fused on a GPU."""
    if mx.default_device() == mx.cpu:
        return cpu_ops.swiglu(x)
    return _swiglu_fused(x)


@_maybe_compiled
def _swiglu_fused(x: mx.array) -> mx.array:
    a, b = mx.split(x, 2, axis=-1)
    return nn.silu(a) * b


@_maybe_compiled
def _apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (2j, 2j+1) of x (B, H, S, D) by the angles of (S, D/2) tables.

    Done explicitly: `mx.fast.rope` takes one position per token, here each axis has its own.
    Computed in float32 like diffusers, then cast back.
    """
    xp = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    out = mx.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


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
    ids = _as_numpy(ids)
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


def _as_numpy(a: np.ndarray | mx.array) -> np.ndarray:
    if isinstance(a, mx.array):
        if mx.issubdtype(a.dtype, mx.floating):
            a = a.astype(mx.float32)
        return np.array(a)
    return np.asarray(a)


def _per_sample(v, batch: int, name: str) -> mx.array:
    """A scalar or (B,) value -> (B,) float32."""
    v = _as_mx(v, mx.float32).reshape(-1)
    if v.size not in (1, batch):
        raise BonsaiError(f"{name} must be a scalar or have {batch} values, got {v.size}")
    return mx.broadcast_to(v, (batch,))


def _as_mx(a: np.ndarray | mx.array, dtype: mx.Dtype) -> mx.array:
    if not isinstance(a, mx.array):
        a = mx.array(np.ascontiguousarray(a, dtype=np.float32))
    return a.astype(dtype)


# ---------------------------------------------------------------------------------------
# Modules (names as in diffusers)


def _heads(x: mx.array, head_dim: int) -> mx.array:
    """(B, S, H * D) -> (B, S, H, D)."""
    return x.reshape(*x.shape[:-1], -1, head_dim)


def _attention(q: mx.array, k: mx.array, v: mx.array, rope: Rope) -> mx.array:
    """q, k, v (B, S, H, D) after the q/k norms -> (B, S, H * D)."""
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    cos, sin = rope
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
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
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_out(_swiglu(self.linear_in(x)))


class JointAttention(nn.Module):
    """Double-stream attention: separate q/k/v per stream, one attention over [txt; img]."""

    def __init__(self, config: Flux2TransformerConfig):
        super().__init__()
        dim, d, eps = config.inner_dim, config.attention_head_dim, config.eps
        self.head_dim = d
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

    def __call__(self, x: mx.array, c: mx.array, rope: Rope) -> tuple[mx.array, mx.array]:
        d = self.head_dim
        # joint sequence [txt; img], each (B, S, H, D)
        q = mx.concatenate([self.norm_added_q(_heads(self.add_q_proj(c), d)),
                            self.norm_q(_heads(self.to_q(x), d))], axis=1)
        k = mx.concatenate([self.norm_added_k(_heads(self.add_k_proj(c), d)),
                            self.norm_k(_heads(self.to_k(x), d))], axis=1)
        v = mx.concatenate([_heads(self.add_v_proj(c), d), _heads(self.to_v(x), d)], axis=1)
        out = _attention(q, k, v, rope)
        n_txt = c.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class TransformerBlock(nn.Module):
    """Double-stream block: image and text streams with their own weights, joint attention."""

    def __init__(self, config: Flux2TransformerConfig):
        super().__init__()
        self.eps = config.eps
        self.attn = JointAttention(config)
        self.ff = FeedForward(config.inner_dim, config.mlp_hidden_dim)
        self.ff_context = FeedForward(config.inner_dim, config.mlp_hidden_dim)

    def __call__(self, x, c, mod_img, mod_txt, rope: Rope) -> tuple[mx.array, mx.array]:
        (shift, scale, gate), (shift2, scale2, gate2) = mod_img
        (c_shift, c_scale, c_gate), (c_shift2, c_scale2, c_gate2) = mod_txt
        eps = self.eps
        attn_x, attn_c = self.attn(
            _modulated_norm(x, shift, scale, eps), _modulated_norm(c, c_shift, c_scale, eps), rope
        )
        x = _gated_add(x, gate, attn_x)
        x = _gated_add(x, gate2, self.ff(_modulated_norm(x, shift2, scale2, eps)))
        c = _gated_add(c, c_gate, attn_c)
        c = _gated_add(c, c_gate2, self.ff_context(_modulated_norm(c, c_shift2, c_scale2, eps)))
        if c.dtype == mx.float16:
            c = mx.clip(c, -65504, 65504)
        return x, c


class ParallelSelfAttention(nn.Module):
    """Single-stream attention + SwiGLU MLP sharing one input and one output projection."""

    def __init__(self, config: Flux2TransformerConfig):
        super().__init__()
        dim, d = config.inner_dim, config.attention_head_dim
        self.head_dim = d
        self.mlp_hidden = config.mlp_hidden_dim
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * dim + 2 * self.mlp_hidden, bias=False)
        self.norm_q = nn.RMSNorm(d, eps=config.eps)
        self.norm_k = nn.RMSNorm(d, eps=config.eps)
        self.to_out = nn.Linear(dim + self.mlp_hidden, dim, bias=False)

    def __call__(self, x: mx.array, rope: Rope) -> mx.array:
        h = self.to_qkv_mlp_proj(x)
        dim = (h.shape[-1] - 2 * self.mlp_hidden) // 3
        q, k, v, mlp = mx.split(h, [dim, 2 * dim, 3 * dim], axis=-1)
        d = self.head_dim
        out = _attention(self.norm_q(_heads(q, d)), self.norm_k(_heads(k, d)), _heads(v, d), rope)
        return self.to_out(mx.concatenate([out, _swiglu(mlp)], axis=-1))


class SingleTransformerBlock(nn.Module):
    def __init__(self, config: Flux2TransformerConfig):
        super().__init__()
        self.eps = config.eps
        self.attn = ParallelSelfAttention(config)

    def __call__(self, x: mx.array, mod, rope: Rope) -> mx.array:
        shift, scale, gate = mod
        x = _gated_add(x, gate, self.attn(_modulated_norm(x, shift, scale, self.eps), rope))
        if x.dtype == mx.float16:
            x = mx.clip(x, -65504, 65504)
        return x


class NormOut(nn.Module):
    """`LN(x) * (1 + scale) + shift` with (scale, shift) = Linear(SiLU(temb)), scale first."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, 2 * dim, bias=False)

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        scale, shift = mx.split(self.linear(nn.silu(temb))[:, None, :], 2, axis=-1)
        return _modulated_norm(x, shift, scale, self.eps)


class _ContextMemo:
    """The last two text projections, keyed by the identity of the (immutable) input array
    and of the projection weight: with CFG the two prompts alternate every step. A plain
    object, kept out of the parameter tree (an nn.Module adopts lists and tuples)."""

    def __init__(self) -> None:
        self.entries: list[tuple[mx.array, mx.array, mx.array]] = []

    def get(self, source, weight) -> mx.array | None:
        for s, w, value in self.entries:
            if s is source and w is weight:
                return value
        return None

    def put(self, source: mx.array, weight: mx.array, value: mx.array) -> None:
        self.entries = [(source, weight, value), *self.entries[:1]]


class Flux2Transformer(nn.Module):
    """FLUX.2 transformer. `model(hidden_states, encoder_hidden_states, timestep, img_ids,
    txt_ids)` -> (B, N, out_channels), with diffusers' meaning of every argument."""

    def __init__(self, config: Flux2TransformerConfig | dict, dtype: str | mx.Dtype = "bfloat16"):
        super().__init__()
        if isinstance(config, dict):
            config = Flux2TransformerConfig.from_dict(config)
        self.config = config
        dim = config.inner_dim
        self.time_guidance_embed = TimeGuidanceEmbed(config)
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.x_embedder = nn.Linear(config.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = [TransformerBlock(config) for _ in range(config.num_layers)]
        self.single_transformer_blocks = [
            SingleTransformerBlock(config) for _ in range(config.num_single_layers)
        ]
        self.norm_out = NormOut(dim, config.eps)
        self.proj_out = nn.Linear(
            dim, config.patch_size * config.patch_size * config.out_channels, bias=False
        )
        self._dtype = parse_dtype(dtype)
        self.set_dtype(self._dtype)
        # Text projections reused while the same encoder_hidden_states arrays come back
        # (every denoising step of one generation).
        self._context_memo = _ContextMemo()

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype."""
        return self._dtype

    def rope_tables(self, img_ids: np.ndarray | mx.array, txt_ids: np.ndarray | mx.array) -> Rope:
        """RoPE tables for the joint sequence [txt, img]; compute once, pass as `rope=`."""
        txt, img = _as_numpy(txt_ids), _as_numpy(img_ids)
        txt = txt[0] if txt.ndim == 3 else txt
        img = img[0] if img.ndim == 3 else img
        if txt.ndim != 2 or img.ndim != 2:
            raise BonsaiError(
                f"img_ids / txt_ids must be (N, 4) or (B, N, 4), got {img.shape} and {txt.shape}"
            )
        return rope_tables(
            np.concatenate([txt, img], axis=0), self.config.axes_dims_rope, self.config.rope_theta
        )

    def clear_context_memo(self) -> None:
        """Forget the memoised text projections; call after changing layers in place (a
        LoRA adapter loaded, rescaled or removed)."""
        self._context_memo = _ContextMemo()

    def _embed_context(self, encoder_hidden_states) -> mx.array:
        # a wrapped layer (LoRA) has no weight of its own: key on the layer itself
        weight = getattr(self.context_embedder, "weight", self.context_embedder)
        out = self._context_memo.get(encoder_hidden_states, weight)
        if out is None:
            out = self.context_embedder(_as_mx(encoder_hidden_states, self.dtype))
            if isinstance(encoder_hidden_states, mx.array):  # immutable, so safe to reuse
                self._context_memo.put(encoder_hidden_states, weight, out)
        return out

    def __call__(
        self,
        hidden_states: np.ndarray | mx.array,
        encoder_hidden_states: np.ndarray | mx.array,
        timestep: np.ndarray | mx.array | float,
        img_ids: np.ndarray | mx.array | None = None,
        txt_ids: np.ndarray | mx.array | None = None,
        *,
        guidance: np.ndarray | mx.array | float | None = None,
        rope: Rope | None = None,
    ) -> mx.array:
        """hidden_states (B, N, in_channels), encoder_hidden_states (B, L, joint_attention_dim),
        timestep (B,) or scalar sigma in [0, 1], img_ids (N, 4) | (B, N, 4), txt_ids (L, 4) |
        (B, L, 4) (not needed when `rope` is given). Returns (B, N, out_channels) in the
        model dtype."""
        cfg = self.config
        x = _as_mx(hidden_states, self.dtype)
        if x.ndim != 3 or x.shape[-1] != cfg.in_channels:
            raise BonsaiError(
                f"hidden_states must be (B, N, {cfg.in_channels}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        ctx_shape = tuple(encoder_hidden_states.shape)
        if len(ctx_shape) != 3 or ctx_shape[0] != b or ctx_shape[2] != cfg.joint_attention_dim:
            raise BonsaiError(
                f"encoder_hidden_states must be ({b}, L, {cfg.joint_attention_dim}), "
                f"got {ctx_shape}")
        c = self._embed_context(encoder_hidden_states)
        n_txt = c.shape[1]
        if rope is None:
            if img_ids is None or txt_ids is None:
                raise BonsaiError("pass img_ids and txt_ids, or precomputed rope= tables")
            rope = self.rope_tables(img_ids, txt_ids)
        if rope[0].shape[0] != n_txt + n:
            raise BonsaiError(
                f"RoPE tables cover {rope[0].shape[0]} tokens but the input has {n_txt} text + "
                f"{n} image tokens; build them from this input's ids"
            )

        t = _per_sample(timestep, b, "timestep") * 1000
        g = None if guidance is None else _per_sample(guidance, b, "guidance") * 1000
        temb = self.time_guidance_embed(t, g, self.dtype)  # (B, dim)
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        (mod_single,) = self.single_stream_modulation(temb)

        x = self.x_embedder(x)
        for block in self.transformer_blocks:
            x, c = block(x, c, mod_img, mod_txt, rope)
        x = mx.concatenate([c, x], axis=1)
        for block in self.single_transformer_blocks:
            x = block(x, mod_single, rope)
        x = self.norm_out(x[:, n_txt:], temb)
        return self.proj_out(x)

    # -- loading --------------------------------------------------------------------------

    def load_checked_weights(self, weights: dict[str, mx.array], source: str | Path) -> None:
        """Load diffusers-named tensors after checking names and shapes against the model.

        Floating tensors are cast to the dtype of the parameter they replace; any other
        dtype mismatch is an error. Raises BonsaiError naming `source`.
        """
        params = dict(tree_flatten(self.parameters()))
        check_weights(weights, {k: tuple(v.shape) for k, v in params.items()}, source)
        loaded = []
        for k, v in weights.items():
            want = params[k].dtype
            if v.dtype != want:
                if not (mx.issubdtype(v.dtype, mx.floating) and mx.issubdtype(want, mx.floating)):
                    raise BonsaiError(f"{source}: tensor {k} is {v.dtype}, the model needs {want}")
                v = v.astype(want)
            loaded.append((k, v))
        self.load_weights(loaded)
        mx.eval(self.parameters())
        self.clear_context_memo()

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """See the module-level `sanitize`."""
        return sanitize(weights)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | mx.Dtype = "bfloat16",
        *,
        config: Flux2TransformerConfig | dict | None = None,
        affine_baseline: bool = False,
    ) -> Flux2Transformer:
        """Load a diffusers `transformer/` folder (single or sharded safetensors; a model
        root holding `transformer/` also works) or a Black Forest Labs single-file
        checkpoint (with or without the `model.diffusion_model.` prefix), or a packed
        transformer folder (a `quantization_config.json` beside config.json: the bonsai-mlx
        layout, or a Bonsai MLX 1-/2-bit pack `transformer-packed-mflux/`, converted exactly
        to binary / ternary layers, or run as stock `nn.QuantizedLinear` with
        `affine_baseline=True`).

        The config comes from `config`, else the folder's config.json (for a single file: a
        diffusers config.json beside it), else it is inferred from the tensor shapes.
        """
        path = Path(path).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                for sub in ("transformer", "transformer-packed-mflux"):
                    if (path / sub).is_dir():
                        path = path / sub
                        break
            if packed_layout(path) is not None:
                if config is None:
                    config_file = path / "config.json"
                    config = Flux2TransformerConfig.from_dict(read_json(config_file), config_file)
                model = cls(config, dtype)
                return load_packed_transformer_weights(model, path,
                                                       affine_baseline=affine_baseline)
            if affine_baseline:
                raise BonsaiError(f"{path} is not a Bonsai MLX pack (no {QUANT_CONFIG}); "
                                  "affine_baseline needs one")
            weights = load_weights(path, WEIGHTS_STEM)
            config_file = path / "config.json"
        elif path.is_file():
            weights = load_weights(path)
            config_file = path.parent / "config.json"
        else:
            raise BonsaiError(f"{path} does not exist; pass a transformer folder or a .safetensors")
        weights = sanitize(weights)
        if config is None and config_file.is_file():
            d = read_json(config_file)
            if path.is_dir() or d.get("_class_name") == DIFFUSERS_CLASS:
                config = Flux2TransformerConfig.from_dict(d, config_file)
        if config is None:
            config = infer_config(weights, path)
        model = cls(config, dtype)
        model.load_checked_weights(weights, path)
        return model

    # -- saving ---------------------------------------------------------------------------

    @property
    def is_packed(self) -> bool:
        """Whether binary / ternary layers replace the dense ones."""
        packed_types = tuple(PACKED_LINEAR.values())
        return any(isinstance(m, packed_types) for _, m in self.named_modules())

    def save_pretrained(self, folder: str | Path, *, dtype: str | mx.Dtype | None = None) -> dict:
        """Write a diffusers-style `transformer/` folder: config.json and
        diffusion_pytorch_model.safetensors, plus quantization_config.json when the model is
        packed (docs/formats.md). Packed weights and their float16 scales are written as they
        are; every other float tensor in `dtype` (default: the model's dtype; use the
        checkpoint's own dtype for a lossless copy). Returns the quantization config ({} for
        a dense model). Each file is written atomically; the caller makes the folder atomic.
        """
        folder = Path(folder)
        dense_dtype = self.dtype if dtype is None else parse_dtype(dtype)
        packed_types = tuple(PACKED_LINEAR.values())
        packed = {p for p, m in self.named_modules() if isinstance(m, packed_types)}

        def stored(name: str, v: mx.array) -> mx.array:
            # packed scales are float16 by the format; integer codes stay as they are
            if name.rpartition(".")[0] in packed or not mx.issubdtype(v.dtype, mx.floating):
                return v
            return v.astype(dense_dtype)

        tensors = {k: stored(k, v) for k, v in tree_flatten(self.parameters())}
        quant = {}
        if packed:
            quant = packed_quantization_config(self)
            quant["dense_dtype"] = next(n for n, d in DTYPES.items() if d == dense_dtype)
        save_safetensors(folder / f"{WEIGHTS_STEM}.safetensors", tensors,
                         metadata={"format": "mlx"} if packed else {"format": "pt"})
        write_json(folder / "config.json", self.config.to_dict())
        if quant:
            write_json(folder / QUANT_CONFIG, quant)
        elif (folder / QUANT_CONFIG).exists():
            (folder / QUANT_CONFIG).unlink()
        return quant


# ---------------------------------------------------------------------------------------
# Checkpoint names


# Black Forest Labs module name -> diffusers module name (the parameter suffix is kept,
# except RMSNorm `scale` -> `weight`).
_BFL_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # halves swapped in sanitize
}
_BFL_DOUBLE = {  # inside double_blocks.N -> transformer_blocks.N (fused qkv handled apart)
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_BFL_SINGLE = {  # inside single_blocks.N -> single_transformer_blocks.N
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
_BFL_QKV = {"img_attn.qkv": ("to_q", "to_k", "to_v"),
            "txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
_BFL_BLOCK = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")


def bfl_module_to_diffusers(module: str) -> tuple[tuple[str, ...], bool] | None:
    """A Black Forest Labs module name -> (diffusers module names, swap halves), or None
    for a name that is not BFL's (diffusers names, unknown names).

    One name, or three for a double block's fused qkv (its output rows split in three, in
    q, k, v order). `swap halves`: the final layer's output is (shift, scale) in BFL's
    order and (scale, shift) in diffusers'. Used for weights (`sanitize`) and LoRA files.
    """
    m = _BFL_BLOCK.fullmatch(module)
    if m is None:
        if module not in _BFL_TOP:
            return None
        return (_BFL_TOP[module],), module == "final_layer.adaLN_modulation.1"
    kind, index, sub = m.groups()
    if kind == "double_blocks" and sub in _BFL_QKV:
        return tuple(f"transformer_blocks.{index}.attn.{n}" for n in _BFL_QKV[sub]), False
    if kind == "double_blocks" and sub in _BFL_DOUBLE:
        return (f"transformer_blocks.{index}.{_BFL_DOUBLE[sub]}",), False
    if kind == "single_blocks" and sub in _BFL_SINGLE:
        return (f"single_transformer_blocks.{index}.{_BFL_SINGLE[sub]}",), False
    return None


def bfl_module_names() -> list[str]:
    """Every BFL module name `bfl_module_to_diffusers` knows, blocks as `{i}` patterns."""
    return (list(_BFL_TOP) + [f"double_blocks.{{i}}.{n}" for n in (*_BFL_DOUBLE, *_BFL_QKV)]
            + [f"single_blocks.{{i}}.{n}" for n in _BFL_SINGLE])


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Map Black Forest Labs single-file names onto diffusers names; diffusers names pass.

    Strips `model.diffusion_model.`, splits each fused qkv in three along the output
    dimension, and swaps the final layer's (shift, scale) halves into diffusers' (scale,
    shift). Names it does not know are kept, so `check_weights` reports them.
    """
    if any(k.startswith(BFL_PREFIX) for k in weights):
        weights = {k.removeprefix(BFL_PREFIX): v for k, v in weights.items()}
    out: dict[str, mx.array] = {}
    for key, v in weights.items():
        module, _, param = key.rpartition(".")
        mapped = bfl_module_to_diffusers(module)
        if mapped is None:
            out[key] = v
            continue
        names, swap = mapped
        param = "weight" if param == "scale" else param
        if swap:
            shift, scale = mx.split(v, 2, axis=0)
            v = mx.concatenate([scale, shift], axis=0)
        for name, part in zip(names, mx.split(v, len(names), axis=0), strict=True):
            out[f"{name}.{param}"] = part
    return out


def infer_config(weights: dict[str, mx.array], source: str | Path) -> Flux2TransformerConfig:
    """A config from diffusers-named tensor shapes (for a checkpoint without config.json).

    Shapes fix every field except the RoPE split, theta and eps, which take Klein's
    values (four equal axes, theta 2000, eps 1e-6).
    """

    def shape(name: str) -> tuple[int, ...]:
        if name not in weights:
            raise BonsaiError(
                f"cannot infer the transformer config from {source}: it has no tensor {name}; "
                "is this a FLUX.2 transformer checkpoint? (or pass config=)"
            )
        return tuple(weights[name].shape)

    def count(prefix: str) -> int:
        idx = {int(m.group(1)) for k in weights if (m := re.match(prefix + r"\.(\d+)\.", k))}
        return max(idx) + 1 if idx else 0

    inner, in_channels = shape("x_embedder.weight")
    num_layers = count("transformer_blocks")
    num_single = count("single_transformer_blocks")
    if num_layers:
        head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
        mlp_hidden = shape("transformer_blocks.0.ff.linear_out.weight")[1]
    elif num_single:
        head_dim = shape("single_transformer_blocks.0.attn.norm_q.weight")[0]
        mlp_hidden = shape("single_transformer_blocks.0.attn.to_out.weight")[1] - inner
    else:
        raise BonsaiError(f"{source} has no transformer blocks; is it a FLUX.2 checkpoint?")
    if head_dim % 8:
        raise BonsaiError(
            f"{source}: head dim {head_dim} cannot be split into four RoPE axes; put the "
            "model's config.json beside it or pass config="
        )
    return Flux2TransformerConfig(
        patch_size=1,
        in_channels=in_channels,
        out_channels=shape("proj_out.weight")[0],
        num_layers=num_layers,
        num_single_layers=num_single,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=shape("context_embedder.weight")[1],
        timestep_guidance_channels=shape("time_guidance_embed.timestep_embedder.linear_1.weight")[1],
        mlp_ratio=mlp_hidden / inner,
        axes_dims_rope=(head_dim // 4,) * 4,
        guidance_embeds=any(k.startswith("time_guidance_embed.guidance_embedder.")
                            for k in weights),
    )
