"""The binary and ternary packed formats: packing, quantisation, and import from MLX affine.

Both formats are scale-only: w = s * q with one float16 scale s per group of 128
consecutive weights along the input dimension K (docs/formats.md has the bytes).

- binary:  q in {-1, +1}, 32 per uint32 word, LSB first, bit 1 -> +1.   (N, K/32) uint32
- ternary: q in {-1, 0, +1}, 5 per byte as base-3 digits q + 1, least
  significant first; digits past K are 1 (zero).                         (N, ceil(K/5)) uint8

Conversion runs in numpy (one-off, exact integer work); the pack/unpack functions also
accept `mx.array`s and then stay in MLX (runtime use). Every check failure is a
BonsaiError naming the layer (`name`) and, where it applies, the group.
"""

from __future__ import annotations

from typing import TypeAlias

from bonsai_mlx.arrays import to_numpy
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.kernels import reference
from bonsai_mlx.kernels.reference import GROUP_SIZE

import mlx.core as mx
import numpy as np

FORMATS = ("binary", "ternary")
Array: TypeAlias = np.ndarray | mx.array  # pack / unpack: numpy in, numpy out; MLX, MLX

_POW3 = 3 ** np.arange(5, dtype=np.uint16)  # (5,)
# byte of 2-bit codes -> its 4 codes as the 4 bytes of one little-endian word (a fast lookup)
_CODES_2BIT = (np.arange(256)[:, None] >> 2 * np.arange(4) & 3).astype(np.uint8).view("<u4")
_TRITS = (np.arange(243)[:, None] // 3 ** np.arange(5) % 3 - 1).astype(np.int8)  # (243, 5)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise BonsaiError(f"unknown packed format {fmt!r}; use 'binary' or 'ternary'")
    return fmt


def check_input_dims(k: int, name: str = "weight") -> None:
    """K must be a multiple of the group size (no padding: the formats never pad K)."""
    if k % GROUP_SIZE:
        raise BonsaiError(
            f"{name}: input dimension {k} is not a multiple of the group size {GROUP_SIZE}; "
            "binary/ternary packing needs whole groups, so keep this layer dense"
        )


# ---------------------------------------------------------------- pack / unpack


def pack_binary(q: Array) -> Array:
    """q (N, K) with K % 32 == 0, +1 where q > 0 else -1 -> uint32 (N, K/32).

    numpy in -> numpy out; mx.array in -> mx.array out.
    """
    if q.shape[-1] % 32:
        raise BonsaiError(f"binary packing needs K % 32 == 0, got K={q.shape[-1]}")
    if isinstance(q, mx.array):
        bits = (q > 0).astype(mx.uint32).reshape(*q.shape[:-1], -1, 32)
        return (bits << mx.arange(32, dtype=mx.uint32)).sum(axis=-1).astype(mx.uint32)
    bits = np.asarray(q) > 0
    packed = np.packbits(bits.reshape(*bits.shape[:-1], -1, 32), axis=-1, bitorder="little")
    return packed.view("<u4").reshape(*bits.shape[:-1], -1)  # (N, K/32, 4) bytes -> words


def unpack_binary(packed: Array) -> Array:
    """uint32 (N, K/32) -> int8 (N, K) in {-1, +1}. numpy or mx in, the same out."""
    if isinstance(packed, mx.array):
        return reference.unpack_binary(packed)
    packed = np.ascontiguousarray(packed, dtype="<u4")
    bits = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little")
    return bits.astype(np.int8) * 2 - 1


def pack_ternary(q: Array) -> Array:
    """q (N, K) in {-1, 0, +1} -> uint8 (N, ceil(K/5)). numpy or mx in, the same out."""
    k = q.shape[-1]
    pad = -k % 5
    if isinstance(q, mx.array):
        t = (q.astype(mx.int32) + 1).astype(mx.uint16)
        if pad:
            t = mx.concatenate([t, mx.ones((*t.shape[:-1], pad), mx.uint16)], axis=-1)
        t = t.reshape(*t.shape[:-1], -1, 5)
        return (t * mx.array(_POW3)).sum(axis=-1).astype(mx.uint8)
    return _pack_digits((np.asarray(q) + 1).astype(np.uint8))


def _pack_digits(t: np.ndarray) -> np.ndarray:
    """Base-3 digits t = q + 1, uint8 (N, K) -> bytes (N, ceil(K/5)), all in uint8 (<= 242)."""
    pad = -t.shape[-1] % 5
    if pad:
        t = np.concatenate([t, np.ones((*t.shape[:-1], pad), np.uint8)], axis=-1)
    t = t.reshape(*t.shape[:-1], -1, 5)
    return t[..., 0] + 3 * t[..., 1] + 9 * t[..., 2] + 27 * t[..., 3] + 81 * t[..., 4]


def unpack_ternary(packed: Array, k: int) -> Array:
    """uint8 (N, ceil(K/5)) -> int8 (N, K) in {-1, 0, +1}. numpy or mx in, the same out."""
    if packed.shape[-1] != -(-k // 5):
        raise BonsaiError(f"ternary packing of K={k} needs {-(-k // 5)} bytes per row, "
                          f"got {packed.shape[-1]}")
    if isinstance(packed, mx.array):
        return reference.unpack_ternary(packed, k)
    packed = np.asarray(packed)
    if np.any(packed >= 243):
        raise BonsaiError("ternary bytes must be < 243 (5 base-3 digits); the file is corrupt")
    return _TRITS[packed].reshape(*packed.shape[:-1], -1)[..., :k]


# ---------------------------------------------------------------- dense -> packed


def _groups(w: np.ndarray, name: str) -> np.ndarray:
    if w.ndim != 2:
        raise BonsaiError(f"{name}: expected a 2-D weight (out, in), got shape {w.shape}")
    check_input_dims(w.shape[1], name)
    return w.astype(np.float32).reshape(w.shape[0], -1, GROUP_SIZE)  # (N, G, 128)


def is_binary_valued(w) -> bool:
    """Whether every group of 128 takes only the values {-s, +s} for one s (per group)."""
    a = np.abs(_groups(to_numpy(w), "weight"))
    return bool(np.all(a == a[..., :1]))


def is_ternary_valued(w) -> bool:
    """Whether every group of 128 takes only the values {-s, 0, +s} for one s (per group)."""
    a = np.abs(_groups(to_numpy(w), "weight"))
    m = a.max(axis=-1, keepdims=True)
    return bool(np.all((a == 0) | (a == m)))


def _scales_f16(s: np.ndarray, name: str, exact: bool) -> np.ndarray:
    s16 = s.astype(np.float16)
    if exact:
        bad = np.argwhere(s16.astype(np.float32) != s)
        if len(bad):
            n, g = bad[0]
            raise BonsaiError(
                f"{name}: group {g} of row {n} has scale {s[n, g]!r}, which float16 cannot "
                "hold exactly; this weight cannot be packed losslessly"
            )
    if not np.all(np.isfinite(s16)):
        raise BonsaiError(f"{name}: a group scale overflows float16 (weights too large)")
    return s16


def quantize_binary(w: Array, *, lossless: bool | None = None,
                    name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Dense (N, K) -> (packed uint32 (N, K/32), scales float16 (N, K/128)), numpy out.

    lossless=None: exact if the weight is already binary per group, else absmean
    (s = mean|w| per group, q = sign(w)). True: require exactness. False: always absmean.
    """
    g = _groups(to_numpy(w), name)
    a = np.abs(g)
    exact = bool(np.all(a == a[..., :1])) if lossless is not False else False
    if lossless and not exact:
        raise BonsaiError(f"{name}: not binary-valued per group of {GROUP_SIZE}; "
                          "cannot pack it losslessly")
    s = a[..., 0] if exact else a.mean(axis=-1)
    return pack_binary(g.reshape(w.shape[0], -1) >= 0), _scales_f16(s, name, exact)


def quantize_ternary(w: Array, *, lossless: bool | None = None,
                     name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """Dense (N, K) -> (packed uint8 (N, ceil(K/5)), scales float16 (N, K/128)), numpy out.

    lossless=None: exact if the weight is already ternary per group, else absmean
    (s = mean|w|, q = round(clip(w/s, -1, 1))). True: require exactness. False: absmean.
    """
    g = _groups(to_numpy(w), name)
    a = np.abs(g)
    m = a.max(axis=-1)
    exact = bool(np.all((a == 0) | (a == m[..., None]))) if lossless is not False else False
    if lossless and not exact:
        raise BonsaiError(f"{name}: not ternary-valued per group of {GROUP_SIZE}; "
                          "cannot pack it losslessly")
    s16 = _scales_f16(m if exact else a.mean(axis=-1), name, exact)
    if exact:
        q = np.sign(g)
    else:
        s = s16.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s > 0, np.round(np.clip(g / s, -1, 1)), 0)
    return pack_ternary(q.astype(np.int8).reshape(w.shape[0], -1)), s16


# ---------------------------------------------------------------- MLX affine -> packed


def _affine_values(scales, biases, bits: int, name: str):
    """Per group, the value of each code: (N, G, 2**bits) float32."""
    s, b = to_numpy(scales).astype(np.float32), to_numpy(biases).astype(np.float32)
    if s.shape != b.shape or s.ndim != 2:
        raise BonsaiError(f"{name}: scales {s.shape} and biases {b.shape} do not match")
    return s[..., None] * np.arange(2**bits, dtype=np.float32) + b[..., None]


def _codes_2bit(wq: np.ndarray) -> np.ndarray:
    """MLX affine 2-bit uint32 words (N, K/16) -> codes uint8 (N, K), LSB first."""
    b = np.ascontiguousarray(wq, dtype="<u4").view(np.uint8)  # 4 codes per byte
    return _CODES_2BIT[b, 0].view(np.uint8).reshape(wq.shape[0], -1)


def _check_affine_shapes(wq, scales, bits: int, group_size: int, name: str) -> int:
    if group_size != GROUP_SIZE:
        raise BonsaiError(f"{name}: group size {group_size}, only {GROUP_SIZE} can be packed")
    if wq.dtype != np.uint32 or wq.ndim != 2:
        raise BonsaiError(f"{name}: expected uint32 (N, K*{bits}/32) words, got "
                          f"{wq.dtype} {wq.shape}")
    k = wq.shape[1] * 32 // bits
    if scales.shape != (wq.shape[0], k // GROUP_SIZE):
        raise BonsaiError(f"{name}: scales {scales.shape} do not fit weight {wq.shape} "
                          f"({bits}-bit, group {GROUP_SIZE})")
    check_input_dims(k, name)
    return k


def binary_from_affine(wq: Array, scales: Array, biases: Array, *,
                       group_size: int = GROUP_SIZE,
                       name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """MLX affine 1-bit (w = scale * bit + bias) -> binary (packed, scales), numpy out.

    Exact. A group must decode to {-s, +s}: bias == -scale/2, s = scale/2 (where only one
    code occurs in a group, its value v alone decides: s = |v|). The words are reused as
    they are; only a group with a negative scale has its bits inverted.
    """
    wq = to_numpy(wq)
    _check_affine_shapes(wq, to_numpy(scales), 1, group_size, name)
    v = _affine_values(scales, biases, 1, name)  # (N, G, 2): values of bit 0, bit 1
    words = wq.reshape(wq.shape[0], -1, GROUP_SIZE // 32)  # (N, G, 4)
    used1 = np.any(words != 0, axis=-1)
    used0 = np.any(words != np.uint32(0xFFFFFFFF), axis=-1)
    both = used0 & used1
    bad = np.argwhere(both & (v[..., 0] != -v[..., 1]))
    if len(bad):
        n, g = bad[0]
        raise BonsaiError(
            f"{name}: group {g} of row {n} is not binary: bias {v[n, g, 0]!r} != "
            f"-scale/2 (scale {v[n, g, 1] - v[n, g, 0]!r}); {len(bad)} such groups. "
            "This is not a Bonsai 1-bit pack"
        )
    s = np.where(used1, np.abs(v[..., 1]), np.abs(v[..., 0]))
    # Bit 1 must mean +s: invert groups where it means -s (negative scale), and write the
    # one-code groups out explicitly.
    plus = np.where(both, v[..., 1] > v[..., 0],
                    np.where(used1, v[..., 1] >= 0, v[..., 0] >= 0))[..., None]  # (N, G, 1)
    ones = np.uint32(0xFFFFFFFF)
    fill = np.where(both[..., None], np.where(plus, words, ~words), np.where(plus, ones, 0))
    packed = fill.reshape(wq.shape).astype(np.uint32)
    return packed, _scales_f16(s, name, exact=True)


def ternary_from_affine(wq: Array, scales: Array, biases: Array, *,
                        group_size: int = GROUP_SIZE,
                        name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """MLX affine 2-bit -> ternary (packed, scales), numpy out, after checking exactness.

    Every group's codes must decode to values in {-s, 0, +s} for one s >= 0 (Bonsai uses
    codes 0, 1, 2 with scale = s, bias = -s); otherwise BonsaiError naming the group.
    """
    wq = to_numpy(wq)
    _check_affine_shapes(wq, to_numpy(scales), 2, group_size, name)
    v = _affine_values(scales, biases, 2, name)  # (N, G, 4)
    codes = _codes_2bit(wq)  # (N, K)
    if np.all(v[..., 0] == -v[..., 2]) and np.all(v[..., 1] == 0) and np.all(v[..., 2] >= 0) \
            and codes.max() <= 2:
        # Bonsai's convention (scale = s, bias = -s): code c means (c - 1) * s, so the codes
        # are the base-3 digits already.
        return _pack_digits(codes), _scales_f16(v[..., 2], name, exact=True)
    n, k = codes.shape
    cg = codes.reshape(n, -1, GROUP_SIZE)
    used = np.stack([np.any(cg == c, axis=-1) for c in range(4)], axis=-1)  # (N, G, 4)
    s = np.where(used, np.abs(v), 0).max(axis=-1)  # (N, G)
    ok = ~used | (v == 0) | (np.abs(v) == s[..., None])
    bad = np.argwhere(~ok.all(axis=-1))
    if len(bad):
        r, g = bad[0]
        vals = sorted({float(v[r, g, c]) for c in range(4) if used[r, g, c]})
        raise BonsaiError(
            f"{name}: group {g} of row {r} is not ternary: its codes decode to {vals}, "
            f"not a subset of {{-s, 0, +s}}; {len(bad)} such groups. "
            "This is not a Bonsai ternary pack"
        )
    trit = np.sign(v).astype(np.int8)  # (N, G, 4): the ternary value of each code
    q = np.take_along_axis(trit, cg.astype(np.intp), axis=-1).reshape(n, k)
    return pack_ternary(q), _scales_f16(s, name, exact=True)
