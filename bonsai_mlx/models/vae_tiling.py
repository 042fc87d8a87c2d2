"""Tiled VAE decode and encode: the full-resolution layers run tile by tile, each tile with
the context its convolutions read, and every GroupNorm uses the whole image's statistics, so
the result is the untiled one up to float rounding (tests/test_vae.py) at lower peak memory.

The VAE describes its layers (`Decoder.upsampling_layers`, `Encoder.downsampling_layers`:
each layer with how it changes resolution and its convolution halo); this module runs them.
The latent-resolution part (mid-block attention included) always sees the whole image. Its
`run_layers` is also the untiled driver: one layer evaluated at a time, which frees each
layer's temporaries before the next one allocates (40% lower peak than one graph).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

from bonsai_mlx.errors import BonsaiError

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from bonsai_mlx.models.vae import VAE

# (layer, how it changes resolution: "same" | "up" | "down", conv halo in pixels): what the
# tiled decode/encode needs to know to give each tile exactly the context it reads.
TileLayer = tuple[Callable[[mx.array], mx.array], str, int]
# The GroupNorm statistics of a tiled decode/encode are first estimated on the input
# average-pooled to at most this many latent pixels a side.
ESTIMATE_SIDE = 64
TILE_STATS = ("exact", "estimate")


def run_layers(layers: Sequence[Callable[[mx.array], mx.array]], x: mx.array) -> mx.array:
    """The layers in order on the whole input, evaluated one by one."""
    for layer in layers:
        x = layer(x)
        mx.eval(x)
    return x


def callables(layers: list[TileLayer]) -> list[Callable[[mx.array], mx.array]]:
    return [layer for layer, _, _ in layers]


# ---- whole-image GroupNorm statistics --------------------------------------------------


def group_moments(g: mx.array) -> tuple[mx.array, mx.array]:
    """Mean and (biased) variance of (B, H, W, groups, C/groups) per batch and group."""
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    return mean, mx.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)


class TileNorm(nn.Module):
    """A norm whose statistics a tiled run can supply for the whole image: subclasses
    normalise with `self.moments(g)` (vae.GroupNorm)."""

    def __init__(self):
        super().__init__()
        self.shared: SharedNormStats | None = None  # set during a tiled decode/encode

    def moments(self, g: mx.array) -> tuple[mx.array, mx.array]:
        """(mean, variance) of grouped input (B, H, W, groups, C/groups)."""
        if self.shared is None:
            return group_moments(g)
        return self.shared.statistics(self, g)


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

    def statistics(self, norm: TileNorm, g: mx.array) -> tuple[mx.array, mx.array]:
        key = id(norm)
        if self.record:
            self.moments[key] = group_moments(g)
        if key in self.moments:
            return self.moments[key]
        tile = g[:, self.region[0], self.region[1]]
        n = tile.shape[1] * tile.shape[2] * tile.shape[4]
        mean, var = group_moments(tile)
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



# ---- tiles -----------------------------------------------------------------------------


def check_tiling(tile_size: int, tile_stats: str, f: int) -> int:
    """The tile side in latent pixels."""
    if tile_size < f:
        raise BonsaiError(f"tile_size {tile_size} invalid: need tile_size >= {f}")
    if tile_stats not in TILE_STATS:
        raise BonsaiError(f"tile_stats {tile_stats!r} invalid: use 'exact' or 'estimate'")
    return tile_size // f


def downscale(x: mx.array, side: int, multiple: int) -> mx.array:
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


def context_needed(layers: list[TileLayer]) -> list[int]:
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
    needs = context_needed(layers)
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



def run_with_shared_norms(
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
             if isinstance(m, TileNorm)]
    stats = SharedNormStats()
    for norm in norms:
        norm.shared = stats
    try:
        if tile_stats == "estimate":
            stats.record = True
            estimate(small)
            stats.record = False
            return _run_tiled(layers, x, tile, align, stats)
        return _run_exact(layers, x, tile, align, stats)
    finally:
        for norm in norms:
            norm.shared = None


def _run_exact(layers: list[TileLayer], x: mx.array, tile: int, align: int,
               stats: SharedNormStats) -> mx.array:
    """Unit by unit (a layer, or an upsampler with the layer after it), each norm's
    statistics summed over every tile first."""
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


# ---- decode and encode -----------------------------------------------------------------


def decode_tiled(vae: VAE, z: mx.array, *, tile_size: int = 1024,
                 tile_stats: str = "exact") -> mx.array:
    """`vae.decode` with the decoder's full-resolution part run tile by tile (see
    `VAE.decode_tiled`); z is checked by the caller."""
    tile = check_tiling(tile_size, tile_stats, vae.scale_factor)
    decoder = vae.decoder
    layers = decoder.upsampling_layers()
    z = vae.post_quant(z)
    h = run_layers(decoder.latent_layers(), z)

    def estimate(small: mx.array) -> mx.array:
        return run_layers([*decoder.latent_layers(), *callables(layers)], small)

    small = downscale(z, min(ESTIMATE_SIDE, tile), 1)
    out = run_with_shared_norms(layers, h, estimate, small, tile, 1, tile_stats)
    return out.astype(vae.dtype)


def encode_tiled(vae: VAE, x: mx.array, *, tile_size: int = 1024,
                 tile_stats: str = "exact") -> mx.array:
    """`vae.encode` with the encoder's full-resolution part run tile by tile (see
    `VAE.encode_tiled`); x is checked and the encoder loaded by the caller."""
    f = vae.scale_factor
    tile = check_tiling(tile_size, tile_stats, f) * f
    layers = vae.encoder.downsampling_layers()
    x = x.astype(vae.dtype)

    def estimate(small: mx.array) -> mx.array:
        return run_layers(callables(layers), small)

    small = downscale(x, min(ESTIMATE_SIDE * f, tile), f)
    h = run_with_shared_norms(layers, x, estimate, small, tile, f, tile_stats)
    out = vae.moments_to_mean(run_layers(vae.encoder.latent_layers(), h.astype(vae.dtype)))
    return out.astype(vae.dtype)
