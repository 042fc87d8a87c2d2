"""Generated images as PNG files: the name, the metadata, a write that never overwrites.

`bonsai-mlx gen` and `bonsai-mlx serve` save through here, so an image carries the same
text metadata (prompt, seed, steps, guidance, size, model, ...) and gets the same kind of
name (`<prompt-words>-<seed>.png`, then `-1`, `-2`, ... when taken) whichever made it.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bonsai_mlx import __version__
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.weights import atomic_path, normal_mode

# The text keys an image's settings are stored under (and read back by the studio).
SETTINGS_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "size", "model",
                 "strength", "images", "loras")


def image_file_name(prompt: str, seed: int) -> str:
    """`<first prompt words>-<seed>.png`, lower-case letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-")
    return f"{slug or 'image'}-{seed}.png"


def generation_metadata(
    pipe,
    *,
    prompt: str,
    seed: int,
    size: tuple[int, int],
    model: str,
    steps: int | None = None,
    guidance: float | None = None,
    negative_prompt: str | None = None,
    strength: float | None = None,
    images: Sequence[str] = (),
    loras: str | None = None,
) -> dict[str, object]:
    """The text fields of a generated image, as the pipeline ran it: the model's default
    steps when none were given (the schedule's length; image-to-image runs only its last
    part), its default guidance on distilled models (they ignore guidance), and no
    negative prompt where there was no guidance to use it (the pipeline warns)."""
    used_guidance = (pipe.default_guidance if guidance is None or pipe.is_distilled
                     else guidance)
    return {
        "prompt": prompt, "seed": seed,
        "negative_prompt": negative_prompt if used_guidance > 1.0 else None,
        "steps": steps or pipe.default_steps,
        "guidance": used_guidance,
        "size": f"{size[0]}x{size[1]}", "model": model,
        "strength": strength,
        "images": ", ".join(images) or None,
        "loras": loras or None,
        "bonsai-mlx": __version__, "Software": f"bonsai-mlx {__version__}",
    }


def png_size_bound(width: int, height: int) -> int:
    """Bytes an RGB PNG of this size takes at most: raw rows (filter byte + 3 per pixel),
    zlib's worst case and room for the chunks and metadata."""
    raw = height * (1 + 3 * width)
    return raw + raw // 1000 + 64 * 1024


def png_metadata(fields: dict[str, object]):
    """A PngInfo with one iTXt chunk per field that is not None."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        if value is not None:
            info.add_itxt(key, str(value))
    return info


def read_png_metadata(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (only the header is parsed, not the pixels)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.format != "PNG":
            raise BonsaiError(f"{path} is not a PNG file")
        return {str(k): str(v) for k, v in getattr(im, "text", {}).items()}


def write_png_exclusive(image, target: Path, info) -> Path:
    """Save `image` at `target`, or `stem-1.png`, `stem-2.png`, ... when taken. Never
    overwrites: the PNG is written to a temporary file and linked to a name that must not
    exist yet (atomic on POSIX), so concurrent runs do not clobber each other either."""
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".bonsai-", suffix=".png", dir=folder)
    except OSError as e:
        raise BonsaiError(f"cannot write to {folder} ({e.strerror}); choose another -o") from None
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        normal_mode(tmp)  # mkstemp made it private; an image is an ordinary file
        for i in range(100_000):
            path = target if i == 0 else target.with_name(f"{target.stem}-{i}{target.suffix}")
            if _claim(tmp, path):
                return path
        raise BonsaiError(f"too many numbered files beside {target}; choose another -o")
    except OSError as e:  # the disk filled up, or the folder changed under us
        raise BonsaiError(f"cannot write {target} ({e.strerror or e}); free some space or "
                          "choose another -o") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _claim(tmp: str, path: Path) -> bool:
    """Give the finished file `tmp` the name `path` if nothing has that name yet."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # file systems without hard links: reserve the name, then replace it
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        os.replace(tmp, path)
        return True


# ---- live previews: the one file bonsai-mlx overwrites ---------------------------------

PREVIEW_KEY = "bonsai-mlx-preview"  # the text chunk that marks a preview file as ours


def check_preview_target(path: Path) -> None:
    """`gen --preview FILE` overwrites FILE at every step, so FILE must be a new .png or
    a preview bonsai-mlx wrote before (marked by its PREVIEW_KEY text chunk)."""
    if path.suffix.lower() != ".png":
        raise BonsaiError(f"--preview {path}: previews are PNG files; use a name ending "
                          "in .png")
    if not path.exists() and not path.is_symlink():
        return
    try:
        ours = path.is_file() and not path.is_symlink() and PREVIEW_KEY in read_png_metadata(path)
    except (OSError, SyntaxError, ValueError, BonsaiError):
        ours = False
    if not ours:
        raise BonsaiError(f"--preview {path} exists and is not a bonsai-mlx preview; it "
                          "would be overwritten at every step: choose another file")


def write_preview(image, path: Path, step: int, total: int) -> None:
    """Replace `path` with `image` atomically (a viewer never sees half a file)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG",
                   pnginfo=png_metadata({PREVIEW_KEY: f"step {step}/{total}",
                                         "Software": f"bonsai-mlx {__version__}"}))
