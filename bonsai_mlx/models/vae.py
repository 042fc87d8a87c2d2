"""The FLUX.2 autoencoder (diffusers' `AutoencoderKLFlux2`) in MLX, NHWC throughout.

The parameter tree uses diffusers' names (`decoder.up_blocks.0.resnets.1.conv2.weight`), so a
diffusers `vae/` folder loads after one change: convolution weights go from PyTorch's
(O, I, kH, kW) to MLX's (O, kH, kW, I). Black Forest Labs' `ae.safetensors` names are mapped
onto diffusers' in `sanitize`.

Text-to-image only decodes, so the encoder is read from disk the first time `encode` runs.

Tiled decoding runs the decoder on overlapping latent tiles and blends them with linear ramps
(`decode_tiled`). It is not identical to an untiled decode: each tile has its own GroupNorm
statistics and its own mid-block attention context, and sees zero padding at its edges. The
blending itself is exact (a local map tiles to float precision, see tests/test_vae.py); how
close the result is depends on the weights. Measured relative errors are in the README note.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.weights import (
    check_weights,
    load_weights,
    parse_dtype,
    read_json,
    resolve_model_path,
)

# Above this many output pixels, decode/encode tile by default (2048x2048 tiles, 1024x1024
# does not). The untiled decode's peak memory grows with the image; tiles keep it at the
# cost of one tile.
AUTO_TILE_PIXELS = 1536 * 1536


@dataclass
class VAEConfig:
    """diffusers' `AutoencoderKLFlux2` config.json (unknown keys are ignored)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = field(default=(2, 2))

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        for k in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            if kwargs.get(k) is not None:
                kwargs[k] = tuple(kwargs[k])
        return cls(**kwargs)

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for FLUX.2)."""
        return 2 ** (len(self.block_out_channels) - 1)


class GroupNorm(nn.Module):
    """PyTorch-style GroupNorm on NHWC input; statistics in float32 whatever the dtype."""

    def __init__(self, num_groups: int, dims: int, eps: float = 1e-6):
        super().__init__()
        if dims % num_groups:
            raise BonsaiError(f"GroupNorm: {dims} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        g = x.astype(mx.float32).reshape(B, H * W, self.num_groups, C // self.num_groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = mx.square(g - mean).mean(axis=(1, 3), keepdims=True)
        g = ((g - mean) * mx.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return (g * self.weight + self.bias).astype(x.dtype)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a residual (the mid block's)."""

    # Query rows per attention call: bounds the (rows x pixels) score matrix that backends
    # without a fused kernel for head dim 512 materialise (2048x2048 decode: 65536 pixels).
    query_chunk = 4096

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        h = self.group_norm(x).reshape(B, 1, H * W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        scale = C**-0.5
        n = H * W
        if n <= self.query_chunk:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        else:
            out = mx.concatenate(
                [
                    mx.fast.scaled_dot_product_attention(
                        q[:, :, i : i + self.query_chunk], k, v, scale=scale
                    )
                    for i in range(0, n, self.query_chunk)
                ],
                axis=2,
            )
        return x + self.to_out[0](out).reshape(B, H, W, C)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock(channels, channels, groups) for _ in range(2)]
        self.attentions = [Attention(channels, groups)] if attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        # Asymmetric padding (bottom and right only), as the original model.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
        return self.conv(x.reshape(B, 2 * H, 2 * W, C))  # nearest x2


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)
        ]
        self.downsamplers = [Downsample(out_ch)] if downsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.downsamplers:
            x = layer(x)
            mx.eval(x)  # see UpBlock
        return x


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(layers)
        ]
        self.upsamplers = [Upsample(out_ch)] if upsample else []

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.resnets + self.upsamplers:
            x = layer(x)
            # Evaluating layer by layer frees each layer's temporaries before the next one
            # allocates: 40% lower peak memory than one graph for the whole decoder.
            mx.eval(x)
        return x


class Encoder(nn.Module):
    """(B, H, W, 3) -> (B, H/f, W/f, 2 * latent_channels) moments (mean | logvar)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, h, w, latent_channels) -> (B, h*f, w*f, 3)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.decoder_block_out_channels or cfg.block_out_channels))
        g = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.conv_norm_out = GroupNorm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class LatentBatchNorm(nn.Module):
    """The frozen BatchNorm (no affine) that normalises patchified latents."""

    def __init__(self, channels: int):
        super().__init__()
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))


class VAE(nn.Module):
    """FLUX.2 autoencoder: `decode`, `encode`, `normalize_latents`, `denormalize_latents`.

    Holds the decoder, `post_quant_conv` and the latent BatchNorm statistics; the encoder
    and `quant_conv` are read from the weight files on the first `encode` (see
    `encoder_loaded`).
    """

    def __init__(self, config: VAEConfig, dtype: mx.Dtype = mx.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.decoder = Decoder(config)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.bn = LatentBatchNorm(math.prod(config.patch_size) * config.latent_channels)
        self._load_encoder_weights: Callable[[], dict[str, mx.array]] | None = None

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    @property
    def encoder_loaded(self) -> bool:
        return "encoder" in self

    # ---- loading --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | mx.Dtype = "bfloat16") -> VAE:
        """Load a diffusers `vae/` folder or a Black Forest Labs `ae.safetensors` file.

        `path` is a folder (diffusers `config.json` + safetensors, a folder holding
        `ae.safetensors`, or a pipeline folder / Hub repo id with a `vae/` subfolder) or a
        single `.safetensors` file. Without a config.json the config is inferred from
        tensor shapes (GroupNorm groups: 32, as in FLUX.2). Only the decoder is read now.
        """
        dtype = parse_dtype(dtype)
        local = Path(path).expanduser()
        # A local file or folder as is; anything else is an alias or a Hub repo id.
        path = local if local.exists() else resolve_model_path(path, allow_patterns=["vae/*"])
        if path.is_dir() and (path / "vae").is_dir() and not any(path.glob("*.safetensors")):
            path = path / "vae"  # a whole pipeline folder or Hub repo
        source, stem = path, None
        if path.is_dir():
            for candidate in ("diffusion_pytorch_model", "ae"):
                if (path / f"{candidate}.safetensors").is_file() or (
                    path / f"{candidate}.safetensors.index.json"
                ).is_file():
                    stem = candidate
                    break

        def read() -> dict[str, mx.array]:
            return sanitize(load_weights(source, stem))

        weights = read()
        config_file = path / "config.json" if path.is_dir() else None
        if config_file is not None and config_file.is_file():
            config = VAEConfig.from_dict(read_json(config_file))
        else:
            config = infer_config(weights, path)

        vae = cls(config, dtype)
        expected = {k: v.shape for k, v in tree_flatten(vae.parameters())}
        encoder_expected = {
            f"encoder.{k}": v.shape for k, v in tree_flatten(Encoder(config).parameters())
        }
        if config.use_quant_conv:
            n = 2 * config.latent_channels
            encoder_expected.update({"quant_conv.weight": (n, 1, 1, n), "quant_conv.bias": (n,)})
        has_encoder = any(k in weights for k in encoder_expected)
        if has_encoder:
            expected.update(encoder_expected)
        check_weights(weights, expected, source)

        own = {k for k, _ in tree_flatten(vae.parameters())}
        vae.load_weights([(k, v) for k, v in weights.items() if k in own])
        vae._cast_weights()
        mx.eval(vae.parameters())
        if has_encoder:
            vae._load_encoder_weights = read
        del weights  # the encoder's tensors were never read from disk (mx.load is lazy)
        return vae

    def _cast_weights(self) -> None:
        """Cast every weight to the compute dtype; BatchNorm statistics stay float32."""
        self.update(
            dict_map(
                self.parameters(),
                lambda k, v: v.astype(mx.float32 if k.startswith("bn.") else self.dtype),
            )
        )

    def load_encoder(self) -> None:
        """Read the encoder and `quant_conv` from the weight files (done by `encode`)."""
        if self.encoder_loaded:
            return
        if self._load_encoder_weights is None:
            raise BonsaiError(
                "this VAE was loaded without encoder weights, so it cannot encode images; "
                "load a checkpoint that includes the encoder"
            )
        weights = self._load_encoder_weights()
        self.encoder = Encoder(self.config)
        if self.config.use_quant_conv:
            n = 2 * self.config.latent_channels
            self.quant_conv = nn.Conv2d(n, n, 1)
        self.load_weights(
            [(k, v.astype(self.dtype)) for k, v in weights.items()
             if k.startswith(("encoder.", "quant_conv."))],
            strict=False,
        )
        mx.eval(self.encoder.parameters())
        if self.config.use_quant_conv:
            mx.eval(self.quant_conv.parameters())

    def unload_encoder(self) -> None:
        """Drop the encoder's weights (the next `encode` reads them again)."""
        for name in ("encoder", "quant_conv"):
            if name in self:
                del self[name]

    # ---- latents --------------------------------------------------------------------

    def normalize_latents(self, z: mx.array) -> mx.array:
        """(B, h, w, C) latents -> patchify 2x2 + BatchNorm -> (B, h/2, w/2, 4C).

        Channel index c*4 + py*2 + px, as diffusers' `_patchify_latents`.
        """
        B, h, w, C = z.shape
        py, px = self.config.patch_size
        if h % py or w % px:
            raise BonsaiError(f"latent size {h}x{w} is not a multiple of the patch {py}x{px}")
        p = z.reshape(B, h // py, py, w // px, px, C).transpose(0, 1, 3, 5, 2, 4)
        p = p.reshape(B, h // py, w // px, C * py * px).astype(mx.float32)
        std = mx.sqrt(self.bn.running_var + self.config.batch_norm_eps)
        return ((p - self.bn.running_mean) / std).astype(z.dtype)

    def denormalize_latents(self, p: mx.array) -> mx.array:
        """The inverse of `normalize_latents`: (B, h, w, 4C) -> (B, 2h, 2w, C)."""
        B, h, w, n = p.shape
        py, px = self.config.patch_size
        std = mx.sqrt(self.bn.running_var + self.config.batch_norm_eps)
        z = (p.astype(mx.float32) * std + self.bn.running_mean).astype(p.dtype)
        z = z.reshape(B, h, w, n // (py * px), py, px).transpose(0, 1, 4, 2, 5, 3)
        return z.reshape(B, h * py, w * px, n // (py * px))

    # ---- decode / encode ------------------------------------------------------------

    def decode(
        self,
        z: mx.array,
        *,
        tiled: bool | None = None,
        tile_size: int = 1024,
        tile_overlap: int = 128,
    ) -> mx.array:
        """(B, h, w, latent_channels) un-normalised latents -> (B, h*f, w*f, 3), f = 8.

        Output is about [-1, 1] (not clamped, as diffusers). `tiled=None` tiles above
        AUTO_TILE_PIXELS output pixels; `tile_size` and `tile_overlap` are in image pixels.
        """
        self._check_input(z, self.config.latent_channels, "latents", 1)
        f = self.scale_factor
        if tiled is None:
            tiled = z.shape[1] * z.shape[2] * f * f > AUTO_TILE_PIXELS
        if tiled:
            return self.decode_tiled(z, tile_size=tile_size, tile_overlap=tile_overlap)
        return self._decode(z)

    def _decode(self, z: mx.array) -> mx.array:
        z = z.astype(self.dtype)
        if "post_quant_conv" in self:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def encode(
        self,
        x: mx.array,
        *,
        tiled: bool | None = None,
        tile_size: int = 1024,
        tile_overlap: int = 128,
    ) -> mx.array:
        """(B, H, W, 3) image in [-1, 1] -> mean latent (B, H/f, W/f, latent_channels).

        Loads the encoder on first use. Tiling as in `decode`.
        """
        f = self.scale_factor
        self._check_input(x, self.config.in_channels, "image", f)
        self.load_encoder()
        if tiled is None:
            tiled = x.shape[1] * x.shape[2] > AUTO_TILE_PIXELS
        if tiled:
            return self.encode_tiled(x, tile_size=tile_size, tile_overlap=tile_overlap)
        return self._encode(x)

    def _encode(self, x: mx.array) -> mx.array:
        h = self.encoder(x.astype(self.dtype))
        if "quant_conv" in self:
            h = self.quant_conv(h)
        return h[..., : self.config.latent_channels]  # the mean; the rest is log-variance

    def decode_tiled(self, z: mx.array, *, tile_size: int = 1024, tile_overlap: int = 128):
        """Decode overlapping latent tiles, blending seams with linear ramps."""
        f = self.scale_factor
        tile, overlap = _tile_in_latents(tile_size, tile_overlap, f)
        out = _run_tiled(self._decode, z, tile, overlap, in_scale=1, out_scale=f)
        return out.astype(self.dtype)

    def encode_tiled(self, x: mx.array, *, tile_size: int = 1024, tile_overlap: int = 128):
        """Encode overlapping image tiles, blending seams with linear ramps."""
        f = self.scale_factor
        self._check_input(x, self.config.in_channels, "image", f)
        self.load_encoder()
        tile, overlap = _tile_in_latents(tile_size, tile_overlap, f)
        out = _run_tiled(self._encode, x, tile, overlap, in_scale=f, out_scale=1)
        return out.astype(self.dtype)

    @staticmethod
    def _check_input(x: mx.array, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise BonsaiError(
                f"{what} should be NHWC (B, H, W, {channels}), got shape {tuple(x.shape)}"
            )
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise BonsaiError(
                f"{what} size {x.shape[1]}x{x.shape[2]} must be a multiple of {multiple}"
            )


# ---- tiling -------------------------------------------------------------------------


def _tile_in_latents(tile_size: int, tile_overlap: int, f: int) -> tuple[int, int]:
    tile, overlap = tile_size // f, tile_overlap // f
    if tile < 1 or overlap < 0 or 2 * overlap > tile:
        raise BonsaiError(
            f"tile_size {tile_size} / tile_overlap {tile_overlap} invalid: need "
            f"tile_size >= {f} and 0 <= 2 * tile_overlap <= tile_size"
        )
    return tile, overlap


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced starts of tiles covering [0, length), neighbours overlapping >= overlap."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _blend_weights(starts: list[int], tile: int, length: int, scale: int) -> list[mx.array]:
    """Per tile, 1-D weights over its output span that sum to 1 at every output position.

    In a region shared by two tiles, each tile's outer quarter (the pixels most changed by
    the zero padding at the tile's edge) gets weight 0 and the middle half ramps linearly.
    """
    spans = [(s * scale, min(s + tile, length) * scale) for s in starts]

    def ramp(distance: mx.array, shared: int) -> mx.array:
        margin = shared // 4
        return mx.clip((distance - margin) / (shared - 2 * margin), 0.0, 1.0)

    weights = []
    for i, (a, b) in enumerate(spans):
        pos = mx.arange(a, b, dtype=mx.float32) + 0.5
        w = mx.ones((b - a,))
        if i > 0 and spans[i - 1][1] > a:
            w = mx.minimum(w, ramp(pos - a, spans[i - 1][1] - a))
        if i + 1 < len(spans) and spans[i + 1][0] < b:
            w = mx.minimum(w, ramp(b - pos, b - spans[i + 1][0]))
        weights.append(w)
    total = mx.zeros((length * scale,))
    for (a, b), w in zip(spans, weights, strict=True):
        total[a:b] = total[a:b] + w
    return [w / total[a:b] for (a, b), w in zip(spans, weights, strict=True)]


def _run_tiled(
    fn: Callable[[mx.array], mx.array],
    x: mx.array,
    tile: int,
    overlap: int,
    *,
    in_scale: int,
    out_scale: int,
) -> mx.array:
    """Apply `fn` to overlapping tiles of x (NHWC) and blend the outputs.

    Tiles are laid out on the latent grid: `tile`/`overlap` are latent pixels; x has
    `in_scale` and the output `out_scale` pixels per latent pixel.
    """
    B, H, W, _ = x.shape
    h, w = H // in_scale, W // in_scale
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    wy, wx = _blend_weights(ys, tile, h, out_scale), _blend_weights(xs, tile, w, out_scale)
    out = None
    for y0, ry in zip(ys, wy, strict=True):
        for x0, rx in zip(xs, wx, strict=True):
            patch = x[:, y0 * in_scale : (y0 + tile) * in_scale,
                      x0 * in_scale : (x0 + tile) * in_scale]
            y = fn(patch).astype(mx.float32)
            if out is None:
                out = mx.zeros((B, h * out_scale, w * out_scale, y.shape[-1]), mx.float32)
            oy, ox = y0 * out_scale, x0 * out_scale
            weight = ry[:, None, None] * rx[None, :, None]
            out[:, oy : oy + y.shape[1], ox : ox + y.shape[2]] += y * weight
            mx.eval(out)  # one tile's activations alive at a time
    return out


# ---- weight names -------------------------------------------------------------------


def dict_map(tree: dict, fn: Callable[[str, mx.array], mx.array], prefix: str = "") -> dict:
    """Apply fn(dotted_name, array) to every array in a nested parameter dict."""
    if isinstance(tree, dict):
        return {k: dict_map(v, fn, f"{prefix}{k}.") for k, v in tree.items()}
    if isinstance(tree, list):
        return [dict_map(v, fn, f"{prefix}{i}.") for i, v in enumerate(tree)]
    return fn(prefix[:-1], tree)


_BFL_PREFIXES = ("first_stage_model.", "vae.", "ae.")


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint names -> this module's names; conv weights -> MLX (O, kH, kW, I).

    Accepts diffusers names unchanged and Black Forest Labs' names (`encoder.down.0.block.1`,
    `nin_shortcut`, `mid.block_1`, `mid.attn_1.q` 1x1 convs, `decoder.up.3` = first up block,
    `norm_out`, `encoder.quant_conv`, `decoder.post_quant_conv`).
    """
    weights = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    for prefix in _BFL_PREFIXES:
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
    if any(re.match(r"(encoder\.down|decoder\.up|(en|de)coder\.mid)\.", k) for k in weights):
        weights = _bfl_to_diffusers(weights)
    return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in weights.items()}


def _bfl_to_diffusers(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    ups = [int(m.group(1)) for k in weights if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out = {}
    for k, v in weights.items():
        new = k
        if m := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)", k):
            new = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down\.(\d+)\.downsample\.(.*)", k):
            new = f"encoder.down_blocks.{m[1]}.downsamplers.0.{m[2]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)", k):
            new = f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.upsample\.(.*)", k):
            new = f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid\.block_(\d)\.(.*)", k):
            new = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)", k):
            new = f"{m[1]}.mid_block.attentions.0.{attn[m[2]]}.{m[3]}"
            if v.ndim == 4:  # 1x1 conv -> linear
                v = v[:, :, 0, 0]
        elif m := re.match(r"(encoder|decoder)\.norm_out\.(.*)", k):
            new = f"{m[1]}.conv_norm_out.{m[2]}"
        elif m := re.match(r"(?:encoder\.)?(quant_conv\..*)", k):
            new = m[1]
        elif m := re.match(r"(?:decoder\.)?(post_quant_conv\..*)", k):
            new = m[1]
        out[new.replace("nin_shortcut", "conv_shortcut")] = v
    return out


def infer_config(weights: dict[str, mx.array], source: str | Path) -> VAEConfig:
    """A config from (sanitized) tensor shapes, for checkpoints without config.json."""

    def count(pattern: str) -> int:
        return len({m[1] for k in weights if (m := re.match(pattern, k))})

    try:
        n_up = count(r"decoder\.up_blocks\.(\d+)\.")
        dec = [weights[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0]
               for i in range(n_up)][::-1]
        n_down = count(r"encoder\.down_blocks\.(\d+)\.")
        enc = [weights[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
               for i in range(n_down)]
        latent = weights["decoder.conv_in.weight"].shape[-1]
        out_ch = weights["decoder.conv_out.weight"].shape[0]
        in_ch = weights["encoder.conv_in.weight"].shape[-1] if enc else 3
        layers = count(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.") - 1
        bn = weights["bn.running_mean"].shape[0]
    except KeyError as e:
        raise BonsaiError(
            f"{source}: cannot infer the VAE config, tensor {e} is missing; "
            "is this a FLUX.2 VAE checkpoint?"
        ) from None
    if n_up == 0 or bn % latent or bn // latent != 4:
        raise BonsaiError(f"{source} does not look like a FLUX.2 VAE (32-channel, 2x2 patches)")
    return VAEConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        block_out_channels=tuple(enc or dec),
        decoder_block_out_channels=tuple(dec) if enc and dec != enc else None,
        layers_per_block=layers,
        latent_channels=latent,
        use_quant_conv="quant_conv.weight" in weights,
        use_post_quant_conv="post_quant_conv.weight" in weights,
        mid_block_add_attention="decoder.mid_block.attentions.0.to_q.weight" in weights,
    )
