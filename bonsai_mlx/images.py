"""Images: the sizes a generation may have, reading input images, the resize and crop of
Flux2KleinPipeline, conversion.

Every image a user gives (the CLI's --image, `generate(images=...)`, the server's uploads) is
read by `load_image`, so an unreadable one fails the same way everywhere.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TypeAlias

from bonsai_mlx.checks import integer
from bonsai_mlx.errors import BonsaiError

import numpy as np
import PIL.Image
import PIL.ImageOps

MULTIPLE = 16  # VAE factor 8 x 2x2 patch: one token per 16x16 pixels
MIN_SIZE, MAX_SIZE = 16, 4096  # per side, pixels
DEFAULT_SIZE = 1024  # per side, without a size or an input image


def check_size(width: int, height: int) -> tuple[int, int]:
    """Multiples of 16 within [MIN_SIZE, MAX_SIZE], as Python ints; the error suggests valid
    sizes."""
    width, height = integer(width, "width"), integer(height, "height")
    for name, v in (("width", width), ("height", height)):
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise BonsaiError(f"{name} {v} is out of range: use {MIN_SIZE} to {MAX_SIZE} pixels")
    bad = [(n, v) for n, v in (("width", width), ("height", height)) if v % MULTIPLE]
    if bad:
        def near(v: int) -> str:
            lo = max(MIN_SIZE, v // MULTIPLE * MULTIPLE)
            hi = min(MAX_SIZE, lo + MULTIPLE)
            return f"{lo} or {hi}"

        parts = ", ".join(f"{n} {v} (nearest valid: {near(v)})" for n, v in bad)
        raise BonsaiError(f"width and height must be multiples of {MULTIPLE}: {parts}")
    return width, height


def parse_size(text: str, option: str = "--size") -> tuple[int, int]:
    """`"WxH"` -> (width, height), multiples of 16 within the pipeline's bounds, else a
    BonsaiError naming `option` and the nearest valid sizes."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", text)
    if not m:
        raise BonsaiError(
            f"{option} {text[:40]!r} is not WIDTHxHEIGHT; write it like 1024x1024 or 512x768"
        )
    if max(len(m.group(1)), len(m.group(2))) > 6:  # far out of range (and slow to read)
        raise BonsaiError(f"{option} {text[:40]}{'...' if len(text) > 40 else ''}: use "
                          f"{MIN_SIZE} to {MAX_SIZE} pixels a side")
    width, height = int(m.group(1)), int(m.group(2))
    for name, v in (("width", width), ("height", height)):
        if v < MIN_SIZE:
            raise BonsaiError(f"{option} {text}: {name} {v} is too small; use at least {MIN_SIZE}")
        if v > MAX_SIZE:
            raise BonsaiError(f"{option} {text}: {name} {v} is out of range: use {MIN_SIZE} "
                              f"to {MAX_SIZE} pixels")
        if v % MULTIPLE:
            lo, hi = v // MULTIPLE * MULTIPLE, v // MULTIPLE * MULTIPLE + MULTIPLE
            options = " or ".join(str(o) for o in (lo, hi) if MIN_SIZE <= o <= MAX_SIZE)
            raise BonsaiError(
                f"{option} {text}: {name} {v} is not a multiple of {MULTIPLE}; use {options} "
                f"(e.g. {option} {_round(width)}x{_round(height)})"
            )
    check_size(width, height)
    return width, height


def _round(v: int) -> int:
    return min(MAX_SIZE, max(MIN_SIZE, (v + MULTIPLE // 2) // MULTIPLE * MULTIPLE))


MAX_REFERENCE_PIXELS = 1024 * 1024  # reference images are shrunk to at most 1 MP
# An input image: a PIL image or the path of an image file.
ImageInput: TypeAlias = PIL.Image.Image | str | Path
LANCZOS = PIL.Image.Resampling.LANCZOS


def as_image_list(images: ImageInput | list[ImageInput] | None) -> list[ImageInput]:
    """None, one image or a list of them -> a list."""
    if images is None:
        return []
    if isinstance(images, (str, Path)) or is_pil(images):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise BonsaiError(f"images must be a PIL image, a path or a list of them, not {images!r}")


def is_pil(x: object) -> bool:
    return isinstance(x, PIL.Image.Image)


def load_image(image: ImageInput, label: str = "image") -> PIL.Image.Image:
    """A PIL image as is, or a path opened and decoded; a BonsaiError naming `label` and the
    file if it is missing or not an image."""
    if is_pil(image):
        return image
    if not isinstance(image, (str, Path)):
        raise BonsaiError(f"an input image must be a PIL image or a path, not {type(image)}")
    path = Path(image).expanduser()
    if not path.exists():
        raise BonsaiError(f"{label} {path} does not exist; check the path")
    if not path.is_file():  # a FIFO or a device would block or never end when read
        raise BonsaiError(f"{label} {path} is not a regular file (a folder, FIFO or device); "
                          "give a PNG, JPEG or WebP file")
    try:
        img = PIL.Image.open(path)  # refuses a decompression bomb from its header
        img.load()
        img = upright(img)
    except PIL.Image.DecompressionBombError as e:
        raise BonsaiError(f"{label} {path}: {str(e).rstrip('.')}; use a smaller image") from None
    except (OSError, PIL.UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise BonsaiError(
            f"{label} {path} is not a readable image ({e}); give a PNG, JPEG or WebP file"
        ) from e
    return img


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """The image as a viewer shows it: a photo's EXIF orientation applied (as diffusers'
    `load_image` does), so a phone's portrait photo is not edited sideways."""
    return PIL.ImageOps.exif_transpose(image)


def prepared_size(width: int, height: int, name: object = None) -> tuple[int, int]:
    """The size an input image of `width` x `height` has once prepared (`prepare_image`)."""
    width, height = _resized(width, height, name)
    return width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE


def _resized(width: int, height: int, name: object = None) -> tuple[int, int]:
    """An input image's size, checked, once resized to at most MAX_REFERENCE_PIXELS (aspect
    kept, sides truncated; before the crop to multiples of 16)."""
    label = f"image {name}" if isinstance(name, (str, Path)) else "input image"
    if width < 64 or height < 64:
        raise BonsaiError(f"{label} is {width}x{height}; both sides must be at least 64 px")
    if max(width / height, height / width) > 8:
        raise BonsaiError(f"{label} is {width}x{height}; the aspect ratio must be at most 8:1")
    if width * height > MAX_REFERENCE_PIXELS:
        scale = math.sqrt(MAX_REFERENCE_PIXELS / (width * height))
        width, height = int(width * scale), int(height * scale)
    return width, height


def prepare_image(image: PIL.Image.Image, name: object = None) -> PIL.Image.Image:
    """Resize/crop an input image as Flux2KleinPipeline does; returns an RGB PIL image.

    Larger than 1 MP: LANCZOS-resized to about 1 MP (aspect kept, sides truncated); then
    centre-cropped to multiples of 16; then converted to RGB.
    """
    width, height = image.size
    resized = _resized(width, height, name)
    if resized != (width, height):
        image = image.resize(resized, LANCZOS)
        width, height = image.size
    w16, h16 = width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE
    left, top = (width - w16) // 2, (height - h16) // 2
    image = image.crop((left, top, left + w16, top + h16))
    return image.convert("RGB")


def prepare_inpaint_image(image: PIL.Image.Image, name: object = None,
                          width: int | None = None, height: int | None = None
                          ) -> PIL.Image.Image:
    """The image to inpaint, as Flux2KleinInpaintPipeline prepares it; an RGB PIL image.

    Larger than 1 MP: shrunk to about 1 MP as in `prepare_image`; then LANCZOS-resized (not
    cropped: the mask must stay aligned) to multiples of 16, or to `width` x `height`.
    """
    resized = _resized(*image.size, name)
    if resized != image.size:
        image = image.resize(resized, LANCZOS)
    w, h = resized
    size = (w // MULTIPLE * MULTIPLE if width is None else width,
            h // MULTIPLE * MULTIPLE if height is None else height)
    return image.resize(size, LANCZOS).convert("RGB")


def image_to_array(image: PIL.Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 (H, W, 3) in [-1, 1]."""
    return 2.0 * (np.asarray(image).astype(np.float32) / 255.0) - 1.0


def preprocess_image(image: ImageInput) -> np.ndarray:
    """PIL image or path -> float32 (H, W, 3) in [-1, 1], ready for the VAE."""
    return image_to_array(prepare_image(load_image(image), image))


def to_pil(images: np.ndarray) -> PIL.Image.Image | list[PIL.Image.Image]:
    """float32 (B, H, W, 3) in [0, 1] -> a PIL image, or a list of them for B > 1."""
    arr = (images * 255).round().astype(np.uint8)
    out = [PIL.Image.fromarray(a) for a in arr]
    return out[0] if len(out) == 1 else out
