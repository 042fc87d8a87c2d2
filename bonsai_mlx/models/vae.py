"""The FLUX.2 autoencoder (diffusers' `AutoencoderKLFlux2`) in MLX, NHWC throughout.

The parameter tree uses diffusers' names (`decoder.up_blocks.0.resnets.1.conv2.weight`), so a
diffusers `vae/` folder loads after one change: convolution weights go from PyTorch's
(O, I, kH, kW) to MLX's (O, kH, kW, I). Black Forest Labs' `ae.safetensors` names are mapped
onto diffusers' in `sanitize`.

Text-to-image only decodes, so the encoder is read from disk the first time `encode` runs.

Tiled decoding (`decode_tiled`) runs only the full-resolution part of the decoder tile by
tile; the latent-resolution part (mid-block attention included) sees the whole image. Each
tile is decoded with the context its convolutions read, and every GroupNorm uses the whole
image's statistics, summed over tiles, so the result is the untiled decode up to float
rounding (tests/test_vae.py), at lower peak memory.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from bonsai_mlx.checks import config_from_dict, flag, integer, number
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models import cpu_ops
from bonsai_mlx.weights import (
    check_weights,
    load_weights,
    parse_dtype,
    read_json,
    resolve_model_path,
)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

# Above this many output pixels, decode/encode tile by default (2048x2048 tiles, 1024x1024
# does not). Tiles cut the peak memory of the full-resolution layers to about two whole
# activations of one layer plus one tile's temporaries (see `decode_tiled`).
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

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                     "norm_num_groups"):
            setattr(self, name, integer(getattr(self, name), name, low=1))
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            setattr(self, name, flag(getattr(self, name), name))
        self.batch_norm_eps = number(self.batch_norm_eps, "batch_norm_eps", positive=True)
        for name in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            value = getattr(self, name)
            if value is None and name == "decoder_block_out_channels":
                continue
            if not isinstance(value, (list, tuple)) or not value:
                raise BonsaiError(f"{name} must be a non-empty list, not {value!r}")
            setattr(self, name, tuple(integer(v, name, low=1) for v in value))
        if len(self.patch_size) != 2:
            raise BonsaiError(f"patch_size must be two integers, not {list(self.patch_size)}")
        for name in ("block_out_channels", "decoder_block_out_channels"):
            odd = [c for c in getattr(self, name) or () if c % self.norm_num_groups]
            if odd:  # every GroupNorm splits its channels into norm_num_groups groups
                raise BonsaiError(f"{name} {odd[0]} does not split into norm_num_groups "
                                  f"{self.norm_num_groups}")

    @classmethod
    def from_dict(cls, d: dict, source: str | Path | None = None) -> VAEConfig:
        """From a config.json dict (unknown keys ignored); errors name `source`."""
        return config_from_dict(cls, d, source)

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for FLUX.2)."""
        return 2 ** (len(self.block_out_channels) - 1)


class GroupNorm(nn.Module):
    """PyTorch-style GroupNorm on NHWC input; statistics in float32 whatever the dtype.

    `shared` (set during tiled decode/encode) supplies one set of statistics for the whole
    image instead of the tile's own.
    """

    def __init__(self, num_groups: int, dims: int, eps: float = 1e-6):
        super().__init__()
        if dims % num_groups:
            raise BonsaiError(f"GroupNorm: {dims} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))
        self.shared: SharedNormStats | None = None

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        g = x.astype(mx.float32).reshape(B, H, W, self.num_groups, C // self.num_groups)
        if self.shared is not None:
            mean, var = self.shared.statistics(self, g)
        else:
            mean, var = _group_moments(g)
        g = ((g - mean) * mx.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return (g * self.weight + self.bias).astype(x.dtype)


def _group_moments(g: mx.array) -> tuple[mx.array, mx.array]:
    """Mean and (biased) variance of (B, H, W, groups, C/groups) per batch and group."""
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    return mean, mx.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)


class SharedNormStats:
    """GroupNorm statistics shared by all tiles of one image, per norm layer.

    `record = True`: each norm uses its input's own statistics and keeps them (the estimate
    pass on a downscaled input). Otherwise each norm uses the kept statistics; a norm with
    none yet adds its input over the tile's owned pixels (`region`) to running moments and
    stops the tile (`StatsMissing`); `finish()` turns the moments summed over all tiles
    into the norm's statistics.
    """

    def __init__(self):
        self.record = False
        self.region: tuple[slice, slice] | None = None
        self.moments: dict[int, tuple[mx.array, mx.array]] = {}
        self._partial: dict[int, tuple[int, mx.array, mx.array]] = {}

    def statistics(self, norm: GroupNorm, g: mx.array) -> tuple[mx.array, mx.array]:
        key = id(norm)
        if self.record:
            self.moments[key] = _group_moments(g)
        if key in self.moments:
            return self.moments[key]
        tile = g[:, self.region[0], self.region[1]]
        n = tile.shape[1] * tile.shape[2] * tile.shape[4]
        mean, var = _group_moments(tile)
        m2 = var * n
        if key in self._partial:  # Chan et al.'s pairwise combination, stable in float32
            n0, mean0, m20 = self._partial[key]
            delta = mean - mean0
            mean = mean0 + delta * (n / (n0 + n))
            m2 = m20 + m2 + mx.square(delta) * (n0 * n / (n0 + n))
            n += n0
        self._partial[key] = (n, mean, m2)
        raise StatsMissing

    def pending(self) -> list[mx.array]:
        """The running moments (to evaluate with each tile, so no tile's graph is kept)."""
        return [a for _, mean, m2 in self._partial.values() for a in (mean, m2)]

    def finish(self) -> None:
        for key, (n, mean, m2) in self._partial.items():
            self.moments[key] = (mean, m2 / n)
        self._partial = {}


class StatsMissing(Exception):
    """A GroupNorm in a tile has no whole-image statistics yet (see SharedNormStats)."""


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
        h = self.conv1(cpu_ops.silu(self.norm1(x)))
        h = self.conv2(cpu_ops.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a residual (the mid block's)."""

    # Query rows per attention call: bounds the (rows x pixels) score matrix that backends
    # without a fused kernel for head dim 512 materialise (2048x2048 decode: 65536 pixels).
    query_chunk = 4096
    score_elements = 2**26  # and at most this many scores per call (256 MB in float32)

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
        chunk = max(256, min(self.query_chunk, self.score_elements // n))
        if n <= chunk:
            out = cpu_ops.attention(q, k, v, scale)
        else:
            out = mx.concatenate(
                [
                    cpu_ops.attention(q[:, :, i : i + chunk], k, v, scale)
                    for i in range(0, n, chunk)
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


# (layer, how it changes resolution: "same" | "up" | "down", conv halo in pixels): what the
# tiled decode/encode needs to know to give each tile exactly the context it reads.
TileLayer = tuple[Callable[[mx.array], mx.array], str, int]


def _run_layers(layers: list[TileLayer], x: mx.array) -> mx.array:
    """The layers in order on the whole input, evaluated one by one (see UpBlock)."""
    for layer, _, _ in layers:
        x = layer(x)
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

    def downsampling_layers(self) -> list[TileLayer]:
        """conv_in and the down blocks up to the last downsampler (above latent resolution)."""
        layers = [(self.conv_in, "same", 1)]
        for block in self.down_blocks[:-1]:
            layers += [(r, "same", 2) for r in block.resnets]
            layers += [(d, "down", 2) for d in block.downsamplers]
        return layers

    def latent_stage(self, x: mx.array) -> mx.array:
        """The rest, all at latent resolution: last down block, mid block, conv_out."""
        x = self.mid_block(self.down_blocks[-1](x))
        return self.conv_out(cpu_ops.silu(self.conv_norm_out(x)))

    def __call__(self, x: mx.array) -> mx.array:
        return self.latent_stage(_run_layers(self.downsampling_layers(), x))


class OutputHead(nn.Module):
    """GroupNorm, SiLU, conv: the decoder's last layers as one tileable layer (a view: it
    holds the decoder's own modules)."""

    def __init__(self, norm: GroupNorm, conv: nn.Conv2d):
        super().__init__()
        self.norm, self.conv = norm, conv

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(cpu_ops.silu(self.norm(x)))


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

    def latent_stage(self, z: mx.array) -> mx.array:
        """conv_in, the mid block and the first up block's resnets: all at latent resolution."""
        x = self.mid_block(self.conv_in(z))
        for resnet in self.up_blocks[0].resnets:
            x = resnet(x)
            mx.eval(x)  # see UpBlock
        return x

    def upsampling_layers(self) -> list[TileLayer]:
        """The rest, from the first upsampler to conv_out (above latent resolution)."""
        layers = []
        for i, block in enumerate(self.up_blocks):
            if i > 0:
                layers += [(r, "same", 2) for r in block.resnets]
            layers += [(u, "up", 1) for u in block.upsamplers]
        return [*layers, (OutputHead(self.conv_norm_out, self.conv_out), "same", 1)]

    def __call__(self, z: mx.array) -> mx.array:
        return _run_layers(self.upsampling_layers(), self.latent_stage(z))


class LatentBatchNorm(nn.Module):
    """The frozen BatchNorm (no affine) that normalises patchified latents."""

    def __init__(self, channels: int):
        super().__init__()
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))


def _encoder_modules(cfg: VAEConfig) -> dict[str, nn.Module]:
    """What `encode` adds to a VAE, by attribute name: the encoder and its quant_conv."""
    modules = {"encoder": Encoder(cfg)}
    if cfg.use_quant_conv:
        n = 2 * cfg.latent_channels
        modules["quant_conv"] = nn.Conv2d(n, n, 1)
    return modules


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
        source = path

        def read() -> dict[str, mx.array]:
            return sanitize(load_weights(source, ("diffusion_pytorch_model", "ae")))

        weights = read()
        config_file = path / "config.json" if path.is_dir() else None
        if config_file is not None and config_file.is_file():
            config = VAEConfig.from_dict(read_json(config_file), config_file)
        else:
            config = infer_config(weights, path)

        vae = cls(config, dtype)
        own = {k: v.shape for k, v in tree_flatten(vae.parameters())}
        encoder_expected = {
            f"{name}.{k}": v.shape
            for name, module in _encoder_modules(config).items()
            for k, v in tree_flatten(module.parameters())
        }
        has_encoder = any(k in weights for k in encoder_expected)
        check_weights(weights, {**own, **encoder_expected} if has_encoder else own, source)

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
            tree_map_with_path(
                lambda k, v: v.astype(mx.float32 if k.startswith("bn.") else self.dtype),
                self.parameters(),
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
        modules = _encoder_modules(self.config)
        for name, module in modules.items():
            setattr(self, name, module)
        self.load_weights(
            [(k, v.astype(self.dtype)) for k, v in weights.items()
             if k.startswith(("encoder.", "quant_conv."))],
            strict=False,
        )
        mx.eval([module.parameters() for module in modules.values()])

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
        tile_overlap: int = 0,
        tile_stats: str = "exact",
    ) -> mx.array:
        """(B, h, w, latent_channels) un-normalised latents -> (B, h*f, w*f, 3), f = 8.

        Output is about [-1, 1] (not clamped, as diffusers). `tiled=None` tiles above
        AUTO_TILE_PIXELS output pixels; `tile_size` is in image pixels; see `decode_tiled`.
        """
        self._check_input(z, self.config.latent_channels, "latents", 1)
        f = self.scale_factor
        if tiled is None:
            tiled = z.shape[1] * z.shape[2] * f * f > AUTO_TILE_PIXELS
        if tiled:
            return self.decode_tiled(
                z, tile_size=tile_size, tile_overlap=tile_overlap, tile_stats=tile_stats
            )
        return self._decode(z)

    def _post_quant(self, z: mx.array) -> mx.array:
        z = z.astype(self.dtype)
        return self.post_quant_conv(z) if "post_quant_conv" in self else z

    def _decode(self, z: mx.array) -> mx.array:
        return self.decoder(self._post_quant(z))

    def encode(
        self,
        x: mx.array,
        *,
        tiled: bool | None = None,
        tile_size: int = 1024,
        tile_overlap: int = 0,
        tile_stats: str = "exact",
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
            return self.encode_tiled(
                x, tile_size=tile_size, tile_overlap=tile_overlap, tile_stats=tile_stats
            )
        return self._encode(x)

    def _encode(self, x: mx.array) -> mx.array:
        return self._moments_to_mean(self.encoder(x.astype(self.dtype)))

    def _moments_to_mean(self, h: mx.array) -> mx.array:
        if "quant_conv" in self:
            h = self.quant_conv(h)
        return h[..., : self.config.latent_channels]  # the mean; the rest is log-variance

    def decode_tiled(
        self,
        z: mx.array,
        *,
        tile_size: int = 1024,
        tile_overlap: int = 0,
        tile_stats: str = "exact",
    ) -> mx.array:
        """`decode` with the full-resolution part of the decoder run tile by tile.

        Everything at latent resolution (conv_in, mid-block attention over the whole image,
        the first up block's resnets) runs untiled; it is small. The up blocks and conv_out
        run on tiles of about `tile_size` image pixels that partition the image, each with
        the neighbouring context its convolutions read (so there are no seams and nothing
        to blend; `tile_overlap` is accepted for compatibility and unused). Every GroupNorm
        in the tiled part uses one set of statistics for the whole image:
        - `tile_stats="exact"` (default): the tiles advance layer by layer and each norm's
          statistics are summed over all tiles first; equal to `decode(z, tiled=False)` up
          to float rounding. Peak memory: two whole activations of one layer plus a tile's
          temporaries (an upsampled activation is never whole). About 2x the time.
        - `tile_stats="estimate"`: statistics of an untiled decode of the latent
          average-pooled to at most 64 latent pixels (or one tile) a side, then one tiled
          pass (as pkuliyi2015's Tiled VAE): lowest memory (about one tile), approximate.
        """
        f = self.scale_factor
        self._check_input(z, self.config.latent_channels, "latents", 1)
        tile = _check_tiling(tile_size, tile_overlap, tile_stats, f)
        layers = self.decoder.upsampling_layers()
        z = self._post_quant(z)
        side = min(ESTIMATE_SIDE, tile)
        h = self.decoder.latent_stage(z)
        mx.eval(h)
        out = _run_with_shared_norms(
            layers, h, self.decoder, _downscale(z, side, 1), tile, 1, tile_stats
        )
        return out.astype(self.dtype)

    def encode_tiled(
        self,
        x: mx.array,
        *,
        tile_size: int = 1024,
        tile_overlap: int = 0,
        tile_stats: str = "exact",
    ) -> mx.array:
        """`encode` with the encoder's full-resolution part run tile by tile.

        As `decode_tiled`, mirrored: conv_in and the down blocks run on tiles with their
        context and shared GroupNorm statistics (`tile_stats` as there; "estimate" pools
        the image to at most 512 pixels a side); the latent-resolution rest (last down
        block, mid block, conv_out) runs untiled.
        """
        f = self.scale_factor
        self._check_input(x, self.config.in_channels, "image", f)
        self.load_encoder()
        tile = _check_tiling(tile_size, tile_overlap, tile_stats, f) * f
        layers = self.encoder.downsampling_layers()
        x = x.astype(self.dtype)
        side = min(ESTIMATE_SIDE * f, tile)
        h = _run_with_shared_norms(layers, x, functools.partial(_run_layers, layers),
                                   _downscale(x, side, f), tile, f, tile_stats)
        out = self._moments_to_mean(self.encoder.latent_stage(h.astype(self.dtype)))
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

# The GroupNorm statistics of a tiled decode/encode are first estimated on the input
# average-pooled to at most this many latent pixels a side.
ESTIMATE_SIDE = 64


def _check_tiling(tile_size: int, tile_overlap: int, tile_stats: str, f: int) -> int:
    """The tile side in latent pixels."""
    if tile_size < f or tile_overlap < 0:
        raise BonsaiError(
            f"tile_size {tile_size} / tile_overlap {tile_overlap} invalid: need "
            f"tile_size >= {f} and tile_overlap >= 0"
        )
    if tile_stats not in ("exact", "estimate"):
        raise BonsaiError(f"tile_stats {tile_stats!r} invalid: use 'exact' or 'estimate'")
    return tile_size // f


def _downscale(x: mx.array, side: int, multiple: int) -> mx.array:
    """x average-pooled to at most about `side` pixels a side, sides a multiple of `multiple`.

    Pixels past a whole number of pooling windows are dropped (an estimate needs no more).
    """
    B, H, W, C = x.shape
    dtype = x.dtype
    ky, kx = math.ceil(H / side), math.ceil(W / side)
    if ky == kx == 1:
        return x
    h = max(H // ky // multiple, 1) * multiple
    w = max(W // kx // multiple, 1) * multiple
    ky, kx = H // h, W // w
    x = x[:, : h * ky, : w * kx].astype(mx.float32)
    return x.reshape(B, h, ky, w, kx, C).mean(axis=(2, 4)).astype(dtype)


def _context_needed(layers: list[TileLayer]) -> list[int]:
    """Per layer, the context (input pixels beyond a tile's edge) that makes the last layer's
    output over the tile exact: conv halos summed back through the resolution changes,
    rounded so that every stride-2 layer sees tiles at even offsets."""
    need, align, needs = 0, 1, []
    for _, kind, halo in reversed(layers):
        if kind == "same":
            need += halo
        elif kind == "up":  # nearest x2, then a conv at the output resolution
            need = -(-(need + halo) // 2)
        else:  # stride-2 conv: output j reads inputs 2j .. 2j + halo
            need, align = 2 * need + halo, 2 * align
        need = -(-need // align) * align
        needs.append(need)
    return needs[::-1]


def _tile_bounds(length: int, tile: int, align: int) -> list[int]:
    """Boundaries of about equal tiles of at most ~`tile` covering [0, length), on `align`."""
    n = math.ceil(length / tile)
    units = length // align
    return sorted({round(i * units / n) * align for i in range(n)} | {length})


def _crop_context(t: mx.array, ctx: list[int], need: int) -> tuple[mx.array, list[int]]:
    """Drop context beyond `need` pixels; ctx = [top, bottom, left, right]."""
    keep = [min(c, need) for c in ctx]
    top, bottom, left, right = (c - k for c, k in zip(ctx, keep, strict=True))
    return t[:, top : t.shape[1] - bottom, left : t.shape[2] - right], keep


def _run_tile(
    layers: list[TileLayer],
    needs: list[int],
    x: mx.array,
    ys: tuple[int, int],
    xs: tuple[int, int],
    stats: SharedNormStats,
) -> mx.array | None:
    """The layers' output over x[:, ys, xs], from that tile plus the context it needs;
    None if a GroupNorm's statistics were missing (that norm's input was summed instead)."""
    (a, b), (c, d) = ys, xs
    H, W = x.shape[1:3]
    n = needs[0]
    ctx = [min(a, n), min(H - b, n), min(c, n), min(W - d, n)]
    t = x[:, a - ctx[0] : b + ctx[1], c - ctx[2] : d + ctx[3]]
    core = [b - a, d - c]
    for (layer, kind, _), need in zip(layers, needs, strict=True):
        t, ctx = _crop_context(t, ctx, need)
        # the tile's own pixels: summed over tiles, each image pixel counts once
        stats.region = (slice(ctx[0], ctx[0] + core[0]), slice(ctx[2], ctx[2] + core[1]))
        try:
            t = layer(t)
        except StatsMissing:
            mx.eval(stats.pending())
            return None
        mx.eval(t)  # one layer of one tile alive at a time
        if kind == "up":
            ctx, core = [2 * v for v in ctx], [2 * v for v in core]
        elif kind == "down":
            ctx, core = [v // 2 for v in ctx], [v // 2 for v in core]
    return _crop_context(t, ctx, 0)[0]


def _run_tiled(
    layers: list[TileLayer], x: mx.array, tile: int, align: int, stats: SharedNormStats
) -> mx.array | None:
    """`layers` applied to x (NHWC) tile by tile: tiles of about `tile` pixels, on `align`,
    that partition x, each with its context; equal to the untiled result given `stats`.
    None when statistics were missing (they are complete after `stats.finish()`)."""
    needs = _context_needed(layers)
    ups = sum(kind == "up" for _, kind, _ in layers)
    downs = sum(kind == "down" for _, kind, _ in layers)

    def scale(v: int) -> int:
        return v * 2**ups // 2**downs

    B, H, W, _ = x.shape
    ys, xs = _tile_bounds(H, tile, align), _tile_bounds(W, tile, align)
    out, missing = None, False
    for a, b in pairwise(ys):
        for c, d in pairwise(xs):
            y = _run_tile(layers, needs, x, (a, b), (c, d), stats)
            if y is None:
                missing = True
                continue
            if out is None:
                out = mx.zeros((B, scale(H), scale(W), y.shape[-1]), y.dtype)
            out[:, scale(a) : scale(b), scale(c) : scale(d)] = y
            mx.eval(out)
    return None if missing else out


def _run_with_shared_norms(
    layers: list[TileLayer],
    x: mx.array,
    estimate: Callable[[mx.array], mx.array],
    small: mx.array,
    tile: int,
    align: int,
    tile_stats: str,
) -> mx.array:
    """Tiled `layers` on x, every GroupNorm in them using whole-image statistics.

    "exact": layer by layer (an upsampler together with the layer after it, so upsampled
    activations are never whole), each norm's statistics summed over all tiles before the
    tiles pass it; keeps each layer's whole input and output (at most two activations).
    "estimate": `estimate(small)` records them on a downscaled input; one tiled pass.
    """
    norms = [m for layer, _, _ in layers for _, m in layer.named_modules()
             if isinstance(m, GroupNorm)]
    stats = SharedNormStats()
    for norm in norms:
        norm.shared = stats
    try:
        if tile_stats == "estimate":
            stats.record = True
            estimate(small)
            stats.record = False
            return _run_tiled(layers, x, tile, align, stats)
        units = [[]]
        for layer in layers:
            units[-1].append(layer)
            if layer[1] != "up":
                units.append([])
        for unit in filter(None, units):
            while (y := _run_tiled(unit, x, tile, align, stats)) is None:
                stats.finish()
            x = y
            for _, kind, _ in unit:  # the same tiles, at the next unit's resolution
                if kind == "up":
                    tile *= 2
                elif kind == "down":
                    tile, align = tile // 2, max(align // 2, 1)
        return x
    finally:
        for norm in norms:
            norm.shared = None


# ---- weight names -------------------------------------------------------------------


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
    try:
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
    except BonsaiError as e:  # e.g. a small VAE whose channels do not split into 32 groups
        raise BonsaiError(f"{source} has no config.json and the config inferred from its "
                          f"weights does not fit them ({e}); add the VAE's config.json") from None
