"""The FLUX.2 [klein] transformer (diffusers' `Flux2Transformer2DModel`) in MLX.

Parameter names are exactly diffusers' (`transformer_blocks.0.attn.to_q.weight`, ...), so a
diffusers `transformer/` folder loads unchanged; `sanitize` maps Black Forest Labs'
single-file names onto them. Every linear layer is a plain bias-free `nn.Linear` called as
`self.<name>(x)`, so the quantised layers can replace them by path.

The layers are in `transformer_layers.py`; here: the config, the model's dataflow, loading
(`from_pretrained`, checkpoint names, the packable layers) and saving.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bonsai_mlx.arrays import to_mx, to_numpy
from bonsai_mlx.checks import BaseConfig, flag, integer, number
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.transformer_layers import (
    Fused,
    Modulation,
    NormOut,
    ReferenceKV,
    Rope,
    SingleTransformerBlock,
    TimeGuidanceEmbed,
    TransformerBlock,
    rope_tables,
)
from bonsai_mlx.quant.layers import PACKED_LINEAR
from bonsai_mlx.quant.loading import (
    QUANT_CONFIG,
    WEIGHTS_STEM,
    apply_packed_layout,
    packed_quantization_config,
    read_quantization_config,
)
from bonsai_mlx.weights import (
    DTYPES,
    load_into,
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
# Upper bounds on config.json's sizes, far above every FLUX.2 transformer (klein 4B: 5 + 20
# blocks, 24 heads of 128; klein 9B: 8 + 24, 32 heads, text width 12288; dev: 8 + 48, 48
# heads): a larger value is a broken or hostile config, refused before any layer is built.
MAX_LAYERS = 512  # num_layers, num_single_layers
MAX_HEADS = 1024  # num_attention_heads
MAX_WIDTH = 65536  # channels, head and text widths, and heads x head width
MAX_PATCH_SIZE = 16
MAX_MLP_RATIO = 16.0


@dataclass
class Flux2TransformerConfig(BaseConfig):
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
        for name, high in (("patch_size", MAX_PATCH_SIZE), ("in_channels", MAX_WIDTH),
                           ("attention_head_dim", MAX_WIDTH), ("num_attention_heads", MAX_HEADS),
                           ("joint_attention_dim", MAX_WIDTH),
                           ("timestep_guidance_channels", MAX_WIDTH), ("num_layers", MAX_LAYERS),
                           ("num_single_layers", MAX_LAYERS), ("out_channels", MAX_WIDTH)):
            value = getattr(self, name)
            if not (name == "out_channels" and value is None):
                low = 0 if "layers" in name else 1
                setattr(self, name, integer(value, name, low=low, high=high))
        for name in ("mlp_ratio", "rope_theta", "eps"):
            setattr(self, name, number(getattr(self, name), name, positive=True))
        if self.mlp_ratio > MAX_MLP_RATIO:
            raise BonsaiError(f"mlp_ratio must be at most {MAX_MLP_RATIO:g}, not {self.mlp_ratio}")
        if self.inner_dim > MAX_WIDTH:
            raise BonsaiError(f"num_attention_heads x attention_head_dim must be at most "
                              f"{MAX_WIDTH}, not {self.inner_dim}")
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": DIFFUSERS_CLASS, **d}


# The published transformers' shapes (their transformer/config.json), for byte counts and
# synthetic benchmarks: Klein 4B (and its Bonsai compressions) and Klein 9B (base, KV).
KLEIN_4B = Flux2TransformerConfig()
KLEIN_9B = Flux2TransformerConfig(num_layers=8, num_single_layers=24, num_attention_heads=32,
                                  joint_attention_dim=12288)


def _per_sample(v, batch: int, name: str) -> mx.array:
    """A scalar or (B,) value -> (B,) float32."""
    v = to_mx(v, mx.float32).reshape(-1)
    if v.size not in (1, batch):
        raise BonsaiError(f"{name} must be a scalar or have {batch} values, got {v.size}")
    return mx.broadcast_to(v, (batch,))



class ContextMemo:
    """The text projections (`context_embedder` outputs) of one generation, keyed by the
    identity of the (immutable) input array: with classifier-free guidance two prompts
    alternate every step. Make one per generation and pass it to every step's call
    (`context_memo=`). `version`: the model's `adapters_version` (bumped by every LoRA
    change), so a LoRA changed between steps (a callback scheduling its scale) is not seen
    stale."""

    def __init__(self) -> None:
        self._entries: list[tuple[mx.array, int, mx.array]] = []

    def get(self, source: mx.array, version: int = 0) -> mx.array | None:
        return next((value for s, v, value in self._entries if s is source and v == version),
                    None)

    def put(self, source: mx.array, value: mx.array, version: int = 0) -> None:
        self._entries = [(source, version, value), *self._entries[:1]]


class Flux2Transformer(nn.Module):
    """FLUX.2 transformer. `model(hidden_states, encoder_hidden_states, timestep, img_ids,
    txt_ids)` -> (B, N, out_channels), with diffusers' meaning of every argument."""

    def __init__(self, config: Flux2TransformerConfig | dict, dtype: str | mx.Dtype = "bfloat16",
                 *, compile: bool | None = None):
        super().__init__()
        if isinstance(config, dict):
            config = Flux2TransformerConfig.from_dict(config)
        self.config = config
        dim = config.inner_dim
        # Decided once, here: fused element-wise functions on a GPU, plain ones on the CPU.
        gpu = mx.default_device().type == mx.DeviceType.gpu
        fused = Fused(gpu if compile is None else compile)
        self.time_guidance_embed = TimeGuidanceEmbed(config)
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.x_embedder = nn.Linear(config.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim, bias=False)
        self.transformer_blocks = [
            TransformerBlock(config, fused) for _ in range(config.num_layers)
        ]
        self.single_transformer_blocks = [
            SingleTransformerBlock(config, fused) for _ in range(config.num_single_layers)
        ]
        self.norm_out = NormOut(dim, config.eps, fused)
        self.proj_out = nn.Linear(
            dim, config.patch_size * config.patch_size * config.out_channels, bias=False
        )
        self._dtype = parse_dtype(dtype)
        self.set_dtype(self._dtype)
        self.compiled = fused.compiled

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype."""
        return self._dtype

    def rope_tables(self, img_ids: np.ndarray | mx.array, txt_ids: np.ndarray | mx.array) -> Rope:
        """RoPE tables for the joint sequence [txt, img]; compute once, pass as `rope=`."""
        txt, img = to_numpy(txt_ids), to_numpy(img_ids)
        txt = txt[0] if txt.ndim == 3 else txt
        img = img[0] if img.ndim == 3 else img
        if txt.ndim != 2 or img.ndim != 2:
            raise BonsaiError(
                f"img_ids / txt_ids must be (N, 4) or (B, N, 4), got {img.shape} and {txt.shape}"
            )
        return rope_tables(
            np.concatenate([txt, img], axis=0), self.config.axes_dims_rope, self.config.rope_theta
        )

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
        context_memo: ContextMemo | None = None,
        reference_kv: list[ReferenceKV] | None = None,
    ) -> mx.array:
        """hidden_states (B, N, in_channels), encoder_hidden_states (B, L, joint_attention_dim),
        timestep (B,) or scalar sigma in [0, 1], img_ids (N, 4) | (B, N, 4), txt_ids (L, 4) |
        (B, L, 4) (not needed when `rope` is given), numpy or MLX. Returns (B, N,
        out_channels) in the model dtype. `context_memo` reuses text projections across
        the steps of one generation; with `reference_kv` (from `reference_kv`) every
        attention also sees the cached reference tokens."""
        x, c, temb, rope = self._inputs(hidden_states, encoder_hidden_states, timestep,
                                        img_ids, txt_ids, guidance, rope, context_memo)
        n_txt = c.shape[1]
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        (mod_single,) = self.single_stream_modulation(temb)
        double, single = self._split_caches(reference_kv)
        x = self.x_embedder(x)
        for block, cache in zip(self.transformer_blocks, double, strict=True):
            x, c = block(x, c, mod_img, mod_txt, rope, cache)
        x = mx.concatenate([c, x], axis=1)
        for block, cache in zip(self.single_transformer_blocks, single, strict=True):
            x = block(x, mod_single, rope, cache)
        return self.proj_out(self.norm_out(x[:, n_txt:], temb))

    def reference_kv(
        self,
        references: np.ndarray | mx.array,
        reference_ids: np.ndarray | mx.array,
        timestep: float = 0.0,
    ) -> list[ReferenceKV]:
        """The reference-image tokens (1 or B, R, in_channels) run alone through every block,
        attending only to each other, modulated at `timestep` (0: clean); returns each
        attention layer's keys and values (double blocks, then single blocks), for
        `__call__(..., reference_kv=)`. This is diffusers' KV "extract" step: its reference
        tokens see neither text nor noise, so they never change and are computed once."""
        cfg = self.config
        x = to_mx(references, self.dtype)
        if x.ndim != 3 or x.shape[-1] != cfg.in_channels:
            raise BonsaiError(
                f"references must be (B, R, {cfg.in_channels}), got {tuple(x.shape)}")
        rope = rope_tables(reference_ids, cfg.axes_dims_rope, cfg.rope_theta)
        if rope[0].shape[0] != x.shape[1]:
            raise BonsaiError(f"{rope[0].shape[0]} reference ids for {x.shape[1]} tokens")
        t = _per_sample(timestep, x.shape[0], "timestep") * 1000
        temb = self.time_guidance_embed(t, None, self.dtype)
        mod_img = self.double_stream_modulation_img(temb)
        (mod_single,) = self.single_stream_modulation(temb)
        caches = [ReferenceKV() for _ in range(cfg.num_layers + cfg.num_single_layers)]
        double, single = self._split_caches(caches)
        x = self.x_embedder(x)
        for block, cache in zip(self.transformer_blocks, double, strict=True):
            x, _ = block(x, None, mod_img, None, rope, cache)
        for block, cache in zip(self.single_transformer_blocks, single, strict=True):
            x = block(x, mod_single, rope, cache)
        # the last block's output is never used; evaluating the caches computes only them
        mx.eval([(c.keys, c.values) for c in caches])
        return caches

    def _split_caches(self, caches: list[ReferenceKV] | None) -> tuple[list, list]:
        n, n_single = len(self.transformer_blocks), len(self.single_transformer_blocks)
        if caches is None:
            return [None] * n, [None] * n_single
        if len(caches) != n + n_single:
            raise BonsaiError(f"reference_kv has {len(caches)} layers; this transformer has "
                              f"{n + n_single} (make it with this model's reference_kv)")
        return caches[:n], caches[n:]

    def _inputs(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids,
                guidance, rope: Rope | None, context_memo: ContextMemo | None,
                ) -> tuple[mx.array, mx.array, mx.array, Rope]:
        """The call's arguments checked and as the blocks take them: image tokens in the
        model dtype, the projected text (B, L, dim), the time embedding (B, dim), RoPE."""
        cfg = self.config
        x = to_mx(hidden_states, self.dtype)
        if x.ndim != 3 or x.shape[-1] != cfg.in_channels:
            raise BonsaiError(
                f"hidden_states must be (B, N, {cfg.in_channels}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        ctx_shape = tuple(encoder_hidden_states.shape)
        if len(ctx_shape) != 3 or ctx_shape[0] != b or ctx_shape[2] != cfg.joint_attention_dim:
            raise BonsaiError(
                f"encoder_hidden_states must be ({b}, L, {cfg.joint_attention_dim}), "
                f"got {ctx_shape}")
        c = self._embed_context(encoder_hidden_states, context_memo)
        if rope is None:
            if img_ids is None or txt_ids is None:
                raise BonsaiError("pass img_ids and txt_ids, or precomputed rope= tables")
            rope = self.rope_tables(img_ids, txt_ids)
        if rope[0].shape[0] != c.shape[1] + n:
            raise BonsaiError(
                f"RoPE tables cover {rope[0].shape[0]} tokens but the input has {c.shape[1]} "
                f"text + {n} image tokens; build them from this input's ids"
            )
        t = _per_sample(timestep, b, "timestep") * 1000
        g = None if guidance is None else _per_sample(guidance, b, "guidance") * 1000
        return x, c, self.time_guidance_embed(t, g, self.dtype), rope

    def _embed_context(self, encoder_hidden_states, memo: ContextMemo | None) -> mx.array:
        version = getattr(self, "adapters_version", 0)  # see ContextMemo
        out = memo.get(encoder_hidden_states, version) if memo is not None else None
        if out is None:
            out = self.context_embedder(to_mx(encoder_hidden_states, self.dtype))
            if memo is not None and isinstance(encoder_hidden_states, mx.array):  # immutable
                memo.put(encoder_hidden_states, out, version)
        return out

    # -- loading --------------------------------------------------------------------------

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """See the module-level `sanitize`."""
        return sanitize(weights)

    def packable_layers(self) -> list[str]:
        """The linear layers a binary / ternary model packs (see `packed_layer_paths`)."""
        return packed_layer_paths(len(self.transformer_blocks),
                                  len(self.single_transformer_blocks))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | mx.Dtype = "bfloat16",
        *,
        config: Flux2TransformerConfig | dict | None = None,
        affine_baseline: bool = False,
        compile: bool | None = None,
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
        `compile`: fuse the element-wise functions with mx.compile (default: on a GPU).
        """
        path = _checkpoint_path(path)
        quant = read_quantization_config(path) if path.is_dir() else None
        if affine_baseline and quant is None:
            raise BonsaiError(f"{path} is not a Bonsai MLX pack (no {QUANT_CONFIG}); "
                              "affine_baseline needs one")
        weights = sanitize(load_weights(path, WEIGHTS_STEM))
        config = _read_config(path, config, weights, packed=quant is not None)
        model = cls(config, dtype, compile=compile)
        if quant is not None:
            weights = apply_packed_layout(model, quant, weights, affine_baseline=affine_baseline)
        load_into(model, weights, path)
        return model

    # -- saving ---------------------------------------------------------------------------

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
# Checkpoints: where they are, their config, their names, their packable layers

DOUBLE_BLOCK_LINEARS = (
    "attn.to_q", "attn.to_k", "attn.to_v",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
)
SINGLE_BLOCK_LINEARS = ("attn.to_qkv_mlp_proj", "attn.to_out")


def packed_layer_paths(num_layers: int = 5, num_single_layers: int = 20) -> list[str]:
    """The layers binary / ternary checkpoints pack, diffusers names, block by block: every
    linear of the blocks, 12 per double block and 2 per single block (the embedders,
    modulations and output projection stay dense)."""
    return [f"transformer_blocks.{i}.{n}" for i in range(num_layers)
            for n in DOUBLE_BLOCK_LINEARS] + [
        f"single_transformer_blocks.{i}.{n}" for i in range(num_single_layers)
        for n in SINGLE_BLOCK_LINEARS]


PACKED_LAYERS = packed_layer_paths(5, 20)  # FLUX.2 [klein] 4B: 100 layers


def _checkpoint_path(path: str | Path) -> Path:
    """A transformer folder or file; a model root without config.json stands for its
    `transformer/` (or a Bonsai pack's `transformer-packed-mflux/`) subfolder."""
    path = Path(path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        for sub in ("transformer", "transformer-packed-mflux"):
            if (path / sub).is_dir():
                return path / sub
    if not (path.is_dir() or path.is_file()):
        raise BonsaiError(f"{path} does not exist; pass a transformer folder or a .safetensors")
    return path


def _read_config(path: Path, config: Flux2TransformerConfig | dict | None,
                 weights: dict[str, mx.array], packed: bool) -> Flux2TransformerConfig:
    """`config` if given, else the folder's config.json (a diffusers one beside a single
    file), else inferred from the tensor shapes (not for packed tensors)."""
    if isinstance(config, Flux2TransformerConfig):
        return config
    if config is not None:
        return Flux2TransformerConfig.from_dict(config)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if config_file.is_file():
        d = read_json(config_file)
        if path.is_dir() or d.get("_class_name") == DIFFUSERS_CLASS:
            return Flux2TransformerConfig.from_dict(d, str(config_file))
    if packed:
        raise BonsaiError(f"{config_file} does not exist; a packed transformer needs it")
    return infer_config(weights, path)



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
