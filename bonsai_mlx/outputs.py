"""Where generated images go: PNG files carrying their settings as text metadata, written
under a name that is never taken (`gen` and the server save images the same way), and
`gen --preview`'s live preview file."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx import __version__
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.weights import atomic_path, check_writable, normal_mode

import PIL.Image
from PIL.PngImagePlugin import PngInfo

# The text keys an image's settings are stored under (and read back by the studio).
SETTINGS_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "size", "model",
                 "strength", "images", "mask", "vae", "loras")
PREVIEW_KEY = "bonsai-mlx-preview"  # the text chunk that marks a preview file as ours


@dataclass
class OutputPlan:
    """Where images go: one file name (numbered for several images) or a folder."""

    folder: Path
    stem: str | None  # None: names come from the prompt and seed

    @classmethod
    def from_option(cls, output: str | None) -> OutputPlan:
        if output is None:
            return cls(Path("."), None)
        p = Path(output).expanduser()
        if p.is_dir() or output.endswith(("/", os.sep)):
            return cls(p, None)
        if p.suffix.lower() == ".png":
            return cls(p.parent, p.stem)
        if p.suffix:
            raise BonsaiError(
                f"-o {output}: only PNG is written (it carries the metadata); "
                f"use {p.with_suffix('.png')} or a folder"
            )
        return cls(p, None)  # no suffix: a folder, created

    def name(self, prompt: str, seed: int) -> str:
        return f"{self.stem}.png" if self.stem is not None else image_file_name(prompt, seed)


def image_file_name(prompt: str, seed: int) -> str:
    """`<first prompt words>-<seed>.png`, lower-case letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-")
    return f"{slug or 'image'}-{seed}.png"


def generation_metadata(pipe, request, image: PIL.Image.Image, *, prompt: str,
                        negative_prompt: str | None, model: str, images: str | None = None,
                        mask: str | None = None, vae: str | None = None) -> dict[str, object]:
    """The text fields of an image as the pipeline made it from `request` (seeded): the
    model's default steps when none were given (the schedule's length; image-to-image runs
    only its last part), the guidance used (distilled models ignore it), the negative
    prompt only where guidance used it (the pipeline warns otherwise), and the LoRAs at
    their scales as `--lora` takes them (`file.safetensors:0.8; ...`; one at scale 0 is
    exactly no LoRA and is left out)."""
    loras = "; ".join(f"{lora_label(info.source)}:{info.scale:g}"
                      for info in pipe.loras.values() if info.scale != 0)
    guidance = (pipe.default_guidance if request.guidance is None or pipe.is_distilled
                else request.guidance)
    return {
        "prompt": prompt, "seed": request.seed,
        "negative_prompt": negative_prompt if guidance > 1.0 else None,
        "steps": request.steps or pipe.default_steps,
        "guidance": guidance,
        "size": f"{image.width}x{image.height}", "model": model,
        "strength": request.strength, "images": images, "mask": mask, "vae": vae,
        "loras": loras or None,
        "bonsai-mlx": __version__, "Software": f"bonsai-mlx {__version__}",
    }


def lora_label(source: str) -> str:
    """A LoRA's file name, or `owner/name/file` for one from the Hub cache (PNG metadata
    names no local folders)."""
    parts = Path(source).parts
    if "snapshots" in parts and parts.index("snapshots") >= 1:  # <cache>/models--o--n/...
        repo = parts[parts.index("snapshots") - 1].removeprefix("models--").replace("--", "/")
        return f"{repo}/{Path(source).name}"
    return Path(source).name


def write_png_exclusive(image: PIL.Image.Image, target: Path, info: PngInfo | None) -> Path:
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


def png_size_bound(width: int, height: int) -> int:
    """Bytes an RGB PNG of this size takes at most: raw rows (filter byte + 3 per pixel),
    zlib's worst case and room for the chunks and metadata."""
    raw = height * (1 + 3 * width)
    return raw + raw // 1000 + 64 * 1024


def png_metadata(fields: dict[str, object]) -> PngInfo:
    """PNG text chunks (iTXt) of the fields that are not None."""
    info = PngInfo()
    for key, value in fields.items():
        if value is not None:
            info.add_itxt(key, str(value))
    return info


def read_png_metadata(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (only the header is parsed, not the pixels)."""
    with PIL.Image.open(path) as im:
        if im.format != "PNG":
            raise BonsaiError(f"{path} is not a PNG file")
        return {str(k): str(v) for k, v in getattr(im, "text", {}).items()}


# ---- live previews: the one file bonsai-mlx overwrites ---------------------------------


def check_preview_target(path: str | Path | None, plan: OutputPlan | None = None
                         ) -> Path | None:
    """`gen --preview FILE` overwrites FILE at every step, so FILE must be a new .png or
    a preview bonsai-mlx wrote before (marked by its PREVIEW_KEY text chunk), and not the
    file `plan` names for the image; returns it as a Path (None for None)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise BonsaiError(f"--preview {path}: previews are PNG files; use a name ending "
                          "in .png")
    if plan is not None and plan.stem is not None and (
            path.absolute() == (plan.folder / plan.name("", 0)).absolute()):
        raise BonsaiError(f"--preview {path} is the image's own file (-o); give the preview "
                          "another name")
    check_writable(path.parent, hint="choose another --preview")
    if not path.exists() and not path.is_symlink():
        return path
    try:
        ours = (path.is_file() and not path.is_symlink()
                and PREVIEW_KEY in read_png_metadata(path))
    except (OSError, SyntaxError, ValueError, BonsaiError):
        ours = False
    if not ours:
        raise BonsaiError(f"--preview {path} exists and is not a bonsai-mlx preview; it "
                          "would be overwritten at every step: choose another file")
    return path


def write_preview(image: PIL.Image.Image, path: Path, step: int, total: int) -> None:
    """Replace `path` with `image` atomically (a viewer never sees half a file)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG",
                   pnginfo=png_metadata({PREVIEW_KEY: f"step {step}/{total}",
                                         "Software": f"bonsai-mlx {__version__}"}))
