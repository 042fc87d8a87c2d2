"""Inpainting masks, as diffusers' `Flux2KleinInpaintPipeline` uses them (white = repaint).

The mask is resized (LANCZOS) from its own size straight to the generated image's size,
made grey-level, binarised at 0.5, then bilinearly downsampled to one value per 16 x 16
pixels (torch's `interpolate(mode="bilinear")`, no antialiasing), so a latent token's weight
is fractional where the mask's edge crosses it. After every denoising step the kept region
is put back: the image's latents noised to the next step's sigma, weighted by (1 - mask).
The image itself also conditions the model, as the first reference image (time 10).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import LANCZOS, MULTIPLE, load_image
from bonsai_mlx.scheduler import noise_latents

import mlx.core as mx
import numpy as np
import PIL.Image

DEFAULT_STRENGTH = 0.8  # diffusers' Flux2KleinInpaintPipeline default
# A mask: a PIL image, the path of an image file, or a (H, W) array.
MaskInput: TypeAlias = PIL.Image.Image | str | Path | np.ndarray | mx.array


def mask_image(mask: MaskInput, image_size: tuple[int, int], name: str = "mask"
               ) -> PIL.Image.Image:
    """A PIL image as is, a path read (`images.load_image`), or a (H, W) / (H, W, 1) array
    (bool; integers 0..255; floats in [0, 1]) as a grey-level PIL image; its size must be
    the input image's (width, height)."""
    if isinstance(mask, (str, Path)):
        mask = load_image(mask, name)
    elif not isinstance(mask, PIL.Image.Image):
        mask = _array_to_image(mask, name)
    mask = eight_bit(mask)
    if mask.size != tuple(image_size):
        raise BonsaiError(
            f"{name} is {mask.size[0]}x{mask.size[1]} but the image to inpaint is "
            f"{image_size[0]}x{image_size[1]}; give a mask of the image's size"
        )
    return mask


def eight_bit(mask: PIL.Image.Image) -> PIL.Image.Image:
    """A 16-bit (or 32-bit integer) grey-level mask scaled to 8 bits (65535 -> 255);
    other modes as they are. Pillow's own conversion clips, so a 16-bit mask's faint
    "keep" grey (1000 of 65535) would read as white, "repaint"."""
    if not mask.mode.startswith("I"):
        return mask
    arr = np.asarray(mask, dtype=np.float64)
    if mask.mode != "I" or arr.max() > 255:  # "I": 16-bit PNGs open so on older Pillows
        arr = arr / 257
    return PIL.Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")


def _array_to_image(mask, name: str) -> PIL.Image.Image:
    if isinstance(mask, mx.array) and mask.dtype == mx.bfloat16:  # numpy has no bfloat16
        mask = mask.astype(mx.float32)
    try:
        arr = np.asarray(mask)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.dtype == object or arr.ndim not in (2, 3) or (
            arr.ndim == 3 and arr.shape[-1] != 1):
        raise BonsaiError(f"{name} must be a PIL image, a path or a (height, width) array, "
                          f"not {type(mask).__name__}")
    if arr.size == 0:
        raise BonsaiError(f"{name} is empty ({arr.shape}); give a mask of the image's size")
    arr = arr.reshape(arr.shape[:2])
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.integer):
        if arr.min() < 0 or arr.max() > 255:
            raise BonsaiError(f"{name}: integer mask values must be 0..255")
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise BonsaiError(f"{name}: float mask values must be in [0, 1] (1 = repaint)")
        arr = np.round(arr * 255)
    else:
        raise BonsaiError(f"{name}: unsupported array dtype {arr.dtype}")
    return PIL.Image.fromarray(arr.astype(np.uint8), mode="L")


def mask_latents(mask: PIL.Image.Image, width: int, height: int, name: str = "mask"
                 ) -> np.ndarray:
    """The mask (PIL) at the generated size -> (h*w, 1) float32 weights per latent token,
    row-major (1 = repaint). All black, or white only where no token samples it, is an
    error: there would be nothing to repaint."""
    resized = mask.resize((width, height), LANCZOS).convert("L")
    binary = (np.asarray(resized, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)
    if not binary.any():
        raise BonsaiError(f"{name} is all black: nothing to repaint (white marks the area "
                          "to repaint, black the area to keep)")
    tokens = bilinear_resize(binary, height // MULTIPLE, width // MULTIPLE)
    if not tokens.any():
        raise BonsaiError(f"{name}: the white area is too thin to reach any 16 x 16 latent "
                          "pixel's centre; make it larger")
    return tokens.reshape(-1, 1)


def bilinear_resize(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False) of a 2-D array:
    source coordinate (i + 0.5) * in / out - 0.5, clamped at 0."""

    def taps(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out, dtype=np.float32) + 0.5)
                         * np.float32(n_in / n_out) - 0.5, 0)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, wy = taps(a.shape[0], out_h)
    x0, x1, wx = taps(a.shape[1], out_w)
    rows = a[y0] * (1 - wy)[:, None] + a[y1] * wy[:, None]
    return (rows[:, x0] * (1 - wx) + rows[:, x1] * wx).astype(np.float32)


@dataclass
class KnownRegion:
    """What inpainting keeps: the clean image latents (1, N, C), the noise (B, N, C) and
    the mask (N, 1), 1 = repaint."""

    latents: mx.array
    noise: mx.array
    mask: mx.array

    def blend(self, x: mx.array, sigma: float) -> mx.array:
        """x after a step to `sigma`, with the kept region replaced by the image noised to
        `sigma` (at the last step, sigma 0: the clean image)."""
        kept = noise_latents(self.latents, self.noise, sigma)
        return (1 - self.mask) * kept + self.mask * x
