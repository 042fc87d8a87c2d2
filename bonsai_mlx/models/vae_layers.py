"""The FLUX.2 autoencoder's layers (diffusers' names), NHWC, plain dataflow: the encoder and
decoder describe their layers for the layer-by-layer and tiled drivers (`vae_tiling.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models import cpu_ops
from bonsai_mlx.models.vae_tiling import TileLayer, TileNorm, callables

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from bonsai_mlx.models.vae import VAEConfig


class GroupNorm(TileNorm):
    """PyTorch-style GroupNorm on NHWC input; statistics in float32 whatever the dtype (in a
    tiled run, the whole image's: see `TileNorm`)."""

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
        g = x.astype(mx.float32).reshape(B, H, W, self.num_groups, C // self.num_groups)
        mean, var = self.moments(g)
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
        return x


class OutputHead(nn.Module):
    """GroupNorm, SiLU, conv: an encoder's or decoder's last layers as one layer (a view: it
    holds their own modules)."""

    def __init__(self, norm: GroupNorm, conv: nn.Conv2d):
        super().__init__()
        self.norm, self.conv = norm, conv

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(cpu_ops.silu(self.norm(x)))


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

    def latent_layers(self) -> list[Callable[[mx.array], mx.array]]:
        """The rest, all at latent resolution: last down block, mid block, conv_out."""
        last = self.down_blocks[-1]
        return [*last.resnets, *last.downsamplers, self.mid_block,
                OutputHead(self.conv_norm_out, self.conv_out)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in [*callables(self.downsampling_layers()), *self.latent_layers()]:
            x = layer(x)
        return x


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

    def latent_layers(self) -> list[Callable[[mx.array], mx.array]]:
        """conv_in, the mid block and the first up block's resnets: all at latent resolution."""
        return [self.conv_in, self.mid_block, *self.up_blocks[0].resnets]

    def upsampling_layers(self) -> list[TileLayer]:
        """The rest, from the first upsampler to conv_out (above latent resolution)."""
        layers = []
        for i, block in enumerate(self.up_blocks):
            if i > 0:
                layers += [(r, "same", 2) for r in block.resnets]
            layers += [(u, "up", 1) for u in block.upsamplers]
        return [*layers, (OutputHead(self.conv_norm_out, self.conv_out), "same", 1)]

    def __call__(self, z: mx.array) -> mx.array:
        for layer in [*self.latent_layers(), *callables(self.upsampling_layers())]:
            z = layer(z)
        return z


class LatentBatchNorm(nn.Module):
    """The frozen BatchNorm (no affine) that normalises patchified latents."""

    def __init__(self, channels: int):
        super().__init__()
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))
