"""The `bonsai-mlx` command line: gen, download, info, convert, bench.

A thin layer over the Python API. Errors a user can cause (BonsaiError, bad options) print
one line, `error: ...`, and exit with status 2; `--verbose` shows the traceback as well.
Written files go to stdout, one path a line; progress bars and the summary go to stderr.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import secrets
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bonsai_mlx import __version__
from bonsai_mlx.checks import text
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.scheduler import MAX_STEPS
from bonsai_mlx.weights import MODEL_ALIASES as ALIASES
from bonsai_mlx.weights import (
    SAFETENSORS_DTYPE_NAMES,
    check_writable,
    default_dtype,
    read_json,
    read_safetensors_header,
    resolve_model,
    resolve_model_path,
)

import click

__all__ = ["ALIASES", "cli", "default_dtype", "main", "parse_size", "resolve_model"]
DEFAULT_MODEL = "ternary"

_EXIT_USER_ERROR = 2
_EXIT_INTERRUPTED = 130
# click >= 8.2 raises this for a bare `bonsai-mlx`; older versions print the help themselves
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


# ----------------------------------------------------------------------------------------
# Errors: one line and exit 2 for anything the user can fix


_verbose = False


def _set_verbose(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _verbose
    _verbose = _verbose or value


def _report(message: str, exc: BaseException | None = None) -> None:
    if _verbose and exc is not None:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    click.echo(f"error: {message}", err=True)


def _usage_message(e: click.ClickException) -> str:
    message = e.format_message()
    message = message[:1].lower() + message[1:]
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        message = f"{message.rstrip('.')}; see `{ctx.command_path} --help`"
    return message


_LAZY_COMMANDS = {
    "bench": "Benchmark seconds per stage, memory and footprint (`bench --help`)",
    "convert": "Convert a model to packed binary / ternary weights (`convert --help`)",
}


class _Cli(click.Group):
    """A group whose errors are one line on stderr (exit 2), not click's usage block, and
    whose heavier subcommands (bench, convert) are imported only when run."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _LAZY_COMMANDS and name not in self.commands:
            return _lazy_command(name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.commands[name].get_short_help_str(60) if name in self.commands
                 else _LAZY_COMMANDS[name]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        global _verbose
        _verbose = False
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except BonsaiError as e:
            _report(str(e), e)
            sys.exit(_EXIT_USER_ERROR)
        except _NO_ARGS_IS_HELP as e:
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            _report(_usage_message(e), e)
            sys.exit(_EXIT_USER_ERROR)
        except click.Abort as e:
            _report("interrupted", e)
            sys.exit(_EXIT_INTERRUPTED)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


verbose_option = click.option(
    "-v", "--verbose", is_flag=True, expose_value=False, is_eager=True, callback=_set_verbose,
    help="Show the full traceback of errors.",
)
quiet_option = click.option(
    "-q", "--quiet", is_flag=True, help="No progress bars and no summary on stderr."
)


@click.group("bonsai-mlx", cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bonsai-mlx")
@verbose_option
def cli() -> None:
    """FLUX.2 [klein] 4B and its 1-bit / ternary Bonsai compressions on MLX.

    \b
    First image:  bonsai-mlx gen -p "a bonsai tree in a misty forest, morning light"
    Models:       ternary (default), binary, klein-4b, klein-base-4b,
                  any Hugging Face repo id or a local folder
    """


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (`bonsai-mlx`)."""
    cli.main(args=argv, prog_name="bonsai-mlx")


# ----------------------------------------------------------------------------------------
# Models: aliases, repo ids, local folders


def _is_local(model: str) -> bool:
    return Path(model).expanduser().is_dir()


def _cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of a cached repo, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        raise BonsaiError(
            f"{repo_id} is not in the local Hugging Face cache; run `bonsai-mlx download "
            f"{repo_id}` first, or give a local folder"
        ) from None


@contextlib.contextmanager
def _hub_progress(enabled: bool) -> Iterator[None]:
    """huggingface_hub's download bars on or off for the duration."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    (enable_progress_bars if enabled else disable_progress_bars)()
    try:
        yield
    finally:
        (disable_progress_bars if was_disabled else enable_progress_bars)()


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


# ----------------------------------------------------------------------------------------
# gen


def parse_size(text: str) -> tuple[int, int]:
    """`"WxH"` -> (width, height), multiples of 16 within the pipeline's bounds, else
    BonsaiError."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", text)
    if not m:
        raise BonsaiError(
            f"--size {text!r} is not WIDTHxHEIGHT; write it like 1024x1024 or 512x768"
        )
    width, height = int(m.group(1)), int(m.group(2))
    for name, v in (("width", width), ("height", height)):
        if v < 16:
            raise BonsaiError(f"--size {text}: {name} {v} is too small; use at least 16")
        if v % 16:
            lo, hi = v // 16 * 16, v // 16 * 16 + 16
            options = f"{lo} or {hi}" if lo >= 16 else f"{hi}"
            raise BonsaiError(
                f"--size {text}: {name} {v} is not a multiple of 16; use {options} "
                f"(e.g. --size {_round16(width)}x{_round16(height)})"
            )
    from bonsai_mlx.pipeline import check_size

    check_size(width, height)  # the pipeline's bounds, before any model is loaded
    return width, height


def _round16(v: int) -> int:
    return max(16, int(round(v / 16)) * 16)


def _check_image(path: str) -> tuple[int, int]:
    """Checks that --image PATH is a readable image; returns its size once prepared."""
    from bonsai_mlx.pipeline import check_image_file, prepared_size

    from PIL import Image, UnidentifiedImageError

    check_image_file(Path(path), f"--image {path}")
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
    except Image.DecompressionBombError as e:
        raise BonsaiError(f"--image {path}: {str(e).rstrip('.')}; give a smaller image"
                          ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BonsaiError(
            f"--image {path} is not a readable image ({e}); give a PNG, JPEG or WebP file"
        ) from None
    return prepared_size(*size, path)


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
        if self.stem is not None:
            return f"{self.stem}.png"
        slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].rstrip("-")
        return f"{slug or 'image'}-{seed}.png"


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


def png_metadata(fields: dict[str, object]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        if value is not None:
            info.add_itxt(key, str(value))
    return info


@dataclass
class _Progress:
    """tqdm bars on stderr for one image: encoding, each denoising step, decoding."""

    enabled: bool
    label: str = ""
    _bar: object = None
    _stage: str = ""

    def _open(self, stage: str, total: int, unit: str) -> None:
        from tqdm.auto import tqdm

        self.close()
        self._stage = stage
        self._bar = tqdm(total=total, desc=f"{self.label}{stage}", unit=unit, file=sys.stderr,
                         leave=False, disable=not self.enabled, dynamic_ncols=True)

    def start(self) -> None:
        self._open("encoding", 1, "prompt")

    def callback(self, step: int, total: int, latents=None) -> None:
        if self._stage != "denoising":
            self._open("denoising", total, "step")
        done = min(int(step), total)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._open("decoding", 1, "image")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._bar.total - self._bar.n)
            self._bar.close()
            self._bar = None
            self._stage = ""


def _seconds(v) -> str:
    return f"{v:.2f} s"


def format_summary(timings, peak_memory, load_seconds: float | None = None) -> str:
    """One line: seconds per stage and peak memory, from the pipeline's last_timings."""
    parts = []
    if load_seconds is not None:
        parts.append(f"load {_seconds(load_seconds)}")
    if isinstance(timings, dict):
        for stage, value in timings.items():
            if isinstance(value, (list, tuple)) and value:
                total, n = sum(value), len(value)
                parts.append(f"{stage} {_seconds(total)} ({n} x {total / n:.2f} s)")
            elif isinstance(value, (int, float)):
                parts.append(f"{stage} {_seconds(value)}")
    if peak_memory:
        parts.append(f"peak memory {_human(peak_memory)}")
    return ", ".join(parts)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); a suffix that is not a number belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _apply_loras(pipe, lora_files, ignore_unmatched: bool, quiet: bool) -> None:
    """Load the LoRAs read from --lora; say what each costs on stderr."""
    for lora_file, scale in lora_files:
        pipe.load_lora(lora_file, scale=scale, ignore_unmatched=ignore_unmatched)
    for info in [] if quiet else pipe.loras.values():
        click.echo(f"LoRA {info.name} ({info.format}): scale {info.scale:g}, rank "
                   f"{'/'.join(map(str, info.ranks))}, {info.layers} layers, "
                   f"{_human(info.bytes)}", err=True)


def _lora_label(source: str) -> str:
    """A LoRA's file name, or `owner/name/file` for one from the Hub cache (PNG metadata
    names no local folders)."""
    parts = Path(source).parts
    if "snapshots" in parts and parts.index("snapshots") >= 1:  # <cache>/models--o--n/...
        repo = parts[parts.index("snapshots") - 1].removeprefix("models--").replace("--", "/")
        return f"{repo}/{Path(source).name}"
    return Path(source).name


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-p", "--prompt", required=True, help="What to draw (or, with --image, the edit).")
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help=f"Alias ({', '.join(ALIASES)}), Hugging Face repo id or local folder.")
@click.option("--size", default=None,
              help="WIDTHxHEIGHT in pixels, multiples of 16 [default: 1024x1024, or the "
                   "first --image's size].")
@click.option("--seed", "seeds", type=click.IntRange(0, 2**64 - 1), multiple=True,
              help="Random seed; repeat for several images.")
@click.option("--seeds", "n_random", type=click.IntRange(min=1), default=None,
              help="Make N images with random seeds.")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=None,
              help="Denoising steps [model default: 4 distilled, 50 base].")
@click.option("--guidance", type=float, default=None,
              help="Guidance scale (base models) [model default].")
@click.option("--negative-prompt", default=None, help="What to avoid (base models, CFG).")
@click.option("-o", "--output", default=None,
              help="PNG file or folder [default: current folder]. Never overwrites.")
@click.option("--image", "images", multiple=True, metavar="PATH",
              help="Reference image for editing; repeat for several.")
@click.option("--strength", type=float, default=None,
              help="Image-to-image from one --image: 0 < strength <= 1 (1 = ignore the image).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              default="auto", show_default=True,
              help="Compute dtype; auto is bfloat16 on a GPU, float32 on the CPU.")
@click.option("--no-offload", is_flag=True,
              help="Keep the text encoder loaded after encoding (more memory, faster reruns).")
@click.option("--tile-vae/--no-tile-vae", default=None,
              help="Decode in tiles (less memory) [default: automatic by size].")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="LoRA .safetensors file, folder or Hub repo id (owner/name[/file]), scale "
                   "1 by default; repeat for several.")
@click.option("--lora-ignore-unmatched", is_flag=True,
              help="Skip LoRA layers this model lacks (default: an error listing them).")
@quiet_option
@verbose_option
def gen(prompt, model, size, seeds, n_random, steps, guidance, negative_prompt, output,
        images, strength, dtype, no_offload, tile_vae, revision, loras, lora_ignore_unmatched,
        quiet) -> None:
    """Generate images from a prompt (text-to-image, editing, image-to-image).

    \b
    bonsai-mlx gen -p "a red fox in the snow"
    bonsai-mlx gen -m binary -p "a red fox" --size 768x512 --seed 1 --seed 2 -o fox.png
    bonsai-mlx gen -p "make it night" --image photo.png
    bonsai-mlx gen -p "an oil painting" --image photo.png --strength 0.6
    bonsai-mlx gen -m binary -p "a fox, ink style" --lora ink.safetensors:0.8
    """
    # Every check that needs no model comes first, so mistakes fail in milliseconds.
    width, height = parse_size(size) if size else (None, None)
    model_id = resolve_model(model)
    if strength is not None:
        if not 0.0 < strength <= 1.0:
            raise BonsaiError(f"--strength {strength} is out of range; use 0 < strength <= 1 "
                              "(lower keeps more of the input image)")
        if len(images) != 1:
            raise BonsaiError("--strength (image-to-image) needs exactly one --image; "
                              f"got {len(images)}")
    text(prompt, "--prompt")
    if negative_prompt is not None:
        text(negative_prompt, "--negative-prompt")
    image_sizes = [_check_image(path) for path in images]
    plan = OutputPlan.from_option(output)
    seed_list = list(seeds) + [secrets.randbelow(2**32) for _ in range(n_random or 0)]
    if not seed_list:
        seed_list = [secrets.randbelow(2**32)]
    show = _show_progress(quiet)
    from bonsai_mlx.lora import read_lora

    with _hub_progress(show):  # LoRA files are read (and checked) before the model loads
        lora_files = [(read_lora(path), scale) for path, scale in map(parse_lora_spec, loras)]

    from bonsai_mlx.memory import check_memory
    from bonsai_mlx.pipeline import ALLOW_PATTERNS, DEFAULT_SIZE, Pipeline

    # the pipeline's own size rule: --size, else the first image's, else the default
    first = image_sizes[0] if image_sizes else (DEFAULT_SIZE, DEFAULT_SIZE)
    out_width, out_height = width or first[0], height or first[1]
    check_writable(plan.folder, len(seed_list) * png_size_bound(out_width, out_height),
                   hint="choose another -o")
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        t0 = time.perf_counter()
        with _hub_progress(show):
            root = resolve_model_path(model_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
        check_memory(root, out_width, out_height, dtype=dtype, tiled_vae=tile_vae,
                     reference_sizes=tuple(image_sizes) if strength is None else ())
        pipe = Pipeline.from_pretrained(root, dtype=dtype, keep_text_encoder=no_offload)
        _apply_loras(pipe, lora_files, lora_ignore_unmatched, quiet)
        load_seconds = time.perf_counter() - t0

        for i, seed in enumerate(seed_list):
            label = f"[{i + 1}/{len(seed_list)}] " if len(seed_list) > 1 else ""
            progress = _Progress(show, label)
            progress.start()
            try:
                image = pipe.generate(
                    prompt, width=width, height=height, steps=steps, guidance=guidance,
                    seed=seed, negative_prompt=negative_prompt, images=list(images) or None,
                    strength=strength, tiled_vae=tile_vae, callback=progress.callback,
                )
            finally:
                progress.close()
            meta = {
                "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
                # the schedule's length (image-to-image runs only its last part)
                "steps": steps or pipe.default_steps,
                # distilled models ignore --guidance (the pipeline warns)
                "guidance": pipe.default_guidance if guidance is None or pipe.is_distilled
                else guidance,
                "size": f"{image.width}x{image.height}", "model": model_id,
                "strength": strength,
                "images": ", ".join(Path(p).name for p in images) or None,
                "loras": "; ".join(f"{_lora_label(i.source)}:{i.scale:g}"
                                   for i in pipe.loras.values()) or None,  # as --lora takes
                "bonsai-mlx": __version__, "Software": f"bonsai-mlx {__version__}",
            }
            path = write_png_exclusive(image, plan.folder / plan.name(prompt, seed),
                                       png_metadata(meta))
            click.echo(str(path))
            if not quiet:
                summary = format_summary(pipe.last_timings, pipe.last_peak_memory,
                                         load_seconds if i == 0 else None)
                click.echo(f"{label}seed {seed}: {summary}", err=True)


# ----------------------------------------------------------------------------------------
# download


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def _by_component(files: dict[str, int]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, size in sorted(files.items()):
        top = name.split("/", 1)[0] if "/" in name else "(top level)"
        sizes[top] = sizes.get(top, 0) + size
    return sizes


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--revision", default=None, help="Branch, tag or commit.")
@quiet_option
@verbose_option
def download(model, revision, quiet) -> None:
    """Download MODEL (alias or repo id) into the Hugging Face cache.

    Fetches only the files the pipeline reads; an interrupted download resumes. Prints the
    local folder on stdout.
    """
    repo_id = resolve_model(model)
    if _is_local(repo_id):
        raise BonsaiError(f"{model} is a local folder; there is nothing to download")
    from bonsai_mlx.pipeline import ALLOW_PATTERNS as patterns  # only the files it reads

    if not quiet:
        remote = _remote_sizes(repo_id, revision, patterns)
        if remote:
            for comp, size in _by_component(remote).items():
                click.echo(f"  {comp:<32} {_human(size):>10}", err=True)
            click.echo(f"  {'total':<32} {_human(sum(remote.values())):>10}  "
                       f"({len(remote)} files, {repo_id})", err=True)
    with _hub_progress(not quiet):
        path = resolve_model_path(repo_id, revision=revision, allow_patterns=patterns)
    click.echo(str(path))


def _remote_sizes(repo_id: str, revision: str | None, patterns: list[str]) -> dict[str, int]:
    """File sizes on the Hub for the files `download` fetches; {} when offline."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception:  # offline, gated, not found: the download itself says what is wrong
        return {}
    return {
        s.rfilename: s.size or 0
        for s in info.siblings or []
        if any(fnmatch.fnmatch(s.rfilename, p) for p in patterns)
    }


# ----------------------------------------------------------------------------------------
# info

@dataclass
class Component:
    name: str
    files: int = 0
    bytes: int = 0
    tensors: int = 0
    format: str = ""
    dtype_bytes: dict[str, int] = field(default_factory=dict)


def _files(folder: Path) -> Iterator[Path]:
    """Every file below `folder`, hidden ones (.cache, .git) left out."""
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            yield p


def describe_folder(folder: Path) -> list[Component]:
    """Components of a model folder: files, bytes (sum of file sizes), tensor dtypes from
    safetensors headers only, and the storage format."""
    comps: dict[str, Component] = {}
    for path in _files(folder):
        rel = path.relative_to(folder)
        name = rel.parts[0] if len(rel.parts) > 1 else "(top level)"
        c = comps.setdefault(name, Component(name))
        c.files += 1
        c.bytes += path.stat().st_size
        if path.suffix == ".safetensors":
            for key, t in read_safetensors_header(path).items():
                if key == "__metadata__":
                    continue
                c.tensors += 1
                dt = SAFETENSORS_DTYPE_NAMES.get(t["dtype"], t["dtype"])
                start, stop = t["data_offsets"]
                c.dtype_bytes[dt] = c.dtype_bytes.get(dt, 0) + stop - start
    for c in comps.values():
        base = folder if c.name == "(top level)" else folder / c.name
        c.format = _format_of(base, c)
    order = sorted(comps.values(), key=lambda c: (c.name == "(top level)", c.name))
    return order


def _format_of(folder: Path, c: Component) -> str:
    """Storage format of a component: our packed format or MLX affine bits from
    quantization_config.json / config.json (docs/formats.md), else the dense dtypes."""
    dense = [d for d in sorted(c.dtype_bytes, key=lambda d: -c.dtype_bytes[d])
             if d.startswith(("float", "bfloat"))]
    if c.name == "(top level)":
        return "index" if not c.tensors else "dense " + " + ".join(dense)
    qpath = folder / "quantization_config.json"
    if qpath.is_file():
        q = read_json(qpath)
        group = q.get("group_size")
        group_text = f", group {group}" if group else ""
        kind = str(q.get("format", "")).lower()
        if kind in ("binary", "ternary"):  # bonsai-mlx's own packs
            n = len(q.get("packed_layers") or [])
            text = f"{kind} packed (bonsai-mlx){group_text}" + (f", {n} layers" if n else "")
            if q.get("dense_bits") == 8:
                return text + f" + MLX affine 8-bit dense layers ({q.get('dense_dtype', '?')})"
            dense_dtype = q.get("dense_dtype") or (dense[0] if dense else None)
            return text + (f" + {dense_dtype} dense layers" if dense_dtype else "")
        if "bits" in q:  # the Bonsai MLX packs (mflux layout)
            bits = q["bits"]
            meaning = {1: " (binary)", 2: " (ternary)"}.get(bits, "")
            text = f"MLX affine {bits}-bit{meaning}{group_text}"
        else:
            text = "quantized (unrecognised quantization_config.json)"
        return text + (f" + {dense[0]} dense layers" if dense else "")
    cpath = folder / "config.json"
    if cpath.is_file():
        config = read_json(cpath)
        quant = config.get("quantization") or config.get("quantization_config")
        if isinstance(quant, dict) and "bits" in quant:
            return f"MLX affine {quant['bits']}-bit, group {quant.get('group_size', '?')}"
    if dense:
        return "dense " + " + ".join(dense)
    if c.tensors:
        return " + ".join(sorted(c.dtype_bytes))
    return "tokenizer" if c.name == "tokenizer" else "config"


def _model_folder(model: str, revision: str | None) -> tuple[Path, str]:
    resolved = resolve_model(model)
    if _is_local(resolved):
        return Path(resolved).expanduser(), resolved
    return _cached_snapshot(resolved, revision), resolved


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--revision", default=None, help="Branch, tag or commit (cached repos).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@verbose_option
def info(model, revision, as_json) -> None:
    """Components, storage formats and sizes of MODEL (a folder, or a cached alias / repo),
    or the format, ranks and layers of a LoRA file (MODEL ending in .safetensors).

    Reads only safetensors headers and file sizes (a LoRA file is read whole): nothing is
    downloaded.
    """
    if model.endswith(".safetensors") and Path(model).expanduser().is_file():
        from bonsai_mlx.lora import read_lora

        _lora_info(read_lora(model), as_json)
        return
    folder, name = _model_folder(model, revision)
    comps = describe_folder(folder)
    if not comps:
        raise BonsaiError(f"{folder} holds no files; is this the right folder?")
    total = sum(c.bytes for c in comps)
    pipeline_class = None
    if (folder / "model_index.json").is_file():
        pipeline_class = read_json(folder / "model_index.json").get("_class_name")
    if as_json:
        click.echo(json.dumps({
            "model": name, "folder": str(folder), "pipeline": pipeline_class,
            "components": [
                {"name": c.name, "format": c.format, "files": c.files, "bytes": c.bytes,
                 "tensors": c.tensors, "dtype_bytes": c.dtype_bytes} for c in comps
            ],
            "total_bytes": total,
        }, indent=2))
        return
    click.echo(f"{name}" + (f"  ({pipeline_class})" if pipeline_class else ""))
    if name != str(folder):
        click.echo(f"  {folder}")
    width = max(len(c.name) for c in comps + [Component("component")])
    fwidth = max(len(c.format) for c in comps + [Component("", format="format")])
    click.echo(f"{'component':<{width}}  {'format':<{fwidth}}  {'bytes':>15}")
    for c in comps:
        click.echo(f"{c.name:<{width}}  {c.format:<{fwidth}}  {c.bytes:>15,}  {_human(c.bytes)}")
    click.echo(f"{'total':<{width}}  {'':<{fwidth}}  {total:>15,}  {_human(total)}")


def _lora_info(lora_file, as_json: bool) -> None:
    info = lora_file.summary()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['file']}  (LoRA, {info['format']} format)")
    click.echo(f"  layers      {len(info['layers'])} transformer layers from "
               f"{info['file_layers']} in the file, rank {'/'.join(map(str, info['ranks']))}")
    click.echo(f"  parameters  {info['parameters']:,} ({', '.join(info['dtypes'])}, "
               f"{_human(info['bytes'])})")
    if info["text_encoder_tensors"]:
        click.echo(f"  ignored     {info['text_encoder_tensors']} text-encoder tensors "
                   "(FLUX.2 LoRAs apply to the transformer)")
    if info["unknown_tensors"]:
        click.echo(f"  unknown     {len(info['unknown_tensors'])} tensors of no known layer, "
                   f"e.g. {info['unknown_tensors'][0]}")
    width = max((len(layer["module"]) for layer in info["layers"]), default=5)
    click.echo(f"{'layer':<{width}}  rank  alpha/rank  in -> out")
    for layer in info["layers"]:
        click.echo(f"{layer['module']:<{width}}  {layer['rank']:>4}  {layer['scaling']:>10.4g}  "
                   f"{layer['in']} -> {layer['out']}")


# ----------------------------------------------------------------------------------------
# convert and bench: their modules own their click commands; loaded only when used


def _lazy_command(name: str) -> click.Command:
    """The click command `bonsai_mlx.<name>` defines, or one that says it is missing."""
    import importlib

    what = _LAZY_COMMANDS[name]
    try:
        module = importlib.import_module(f"bonsai_mlx.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"bonsai_mlx.{name}":
            raise
        module = None
    commands = [c for c in vars(module).values()
                if isinstance(c, click.Command) and c.name == name] if module else []
    if commands:
        return commands[0]
    reason = ("is not available yet in this version" if module is None
              else "has no command-line entry yet in this version")

    @click.command(name, help=f"{what} (not available yet).", add_help_option=False,
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def missing(args) -> None:
        raise BonsaiError(f"`bonsai-mlx {name}` {reason} of bonsai-mlx ({__version__}); "
                          "update bonsai-mlx")

    return missing


if __name__ == "__main__":
    main()
