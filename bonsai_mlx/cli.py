"""The `bonsai-mlx` command line: gen, download, info, convert, bench.

A thin layer over the Python API. Errors a user can cause (BonsaiError, bad options) print
one line, `error: ...`, and exit with status 2; `--verbose` shows the traceback as well.
Written files go to stdout, one path a line; progress bars and the summary go to stderr.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import secrets
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx import __version__
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import parse_size
from bonsai_mlx.scheduler import MAX_STEPS
from bonsai_mlx.weights import MODEL_ALIASES as ALIASES
from bonsai_mlx.weights import (
    TOP_LEVEL,
    check_writable,
    default_dtype,
    human_bytes,
    resolve_model,
    resolve_model_path,
)

import click

__all__ = ["ALIASES", "cli", "default_dtype", "main", "parse_size", "resolve_model"]
DEFAULT_MODEL = "ternary"
# What errors call the generation's settings: the options that set them.
CLI_NAMES = {"prompt": "--prompt", "negative_prompt": "--negative-prompt",
             "strength": "--strength", "image": "--image", "mask": "--mask",
             "untiled_vae": "--no-tile-vae", "vae_tile_size": "--vae-tile-size"}

_EXIT_USER_ERROR = 2
MAX_SEEDS = 10_000  # --seeds N: random seeds, one image each (the list is built up front)
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
    "doctor": "Check this machine: Metal kernels, BLAS, compilers, cached models",
    "serve": "Serve the studio (web page) and an OpenAI-compatible Images API",
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
        except OSError as e:  # a path the system refuses: too long, no permission, disk full
            where = f"{e.filename}: " if e.filename else ""
            _report(f"{where}{e.strerror or e}; check the path, its permissions and the free "
                    "space", e)
            sys.exit(_EXIT_USER_ERROR)
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
dtype_option = click.option(
    "--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
    show_default=True, help="Compute dtype; auto is bfloat16 on a GPU, float32 on the CPU.",
)
tile_vae_option = click.option(
    "--tile-vae/--no-tile-vae", default=None,
    help="Decode (and encode) images in tiles: less memory, the same image "
         "[default: untiled when that fits in the memory available].",
)


@click.group("bonsai-mlx", cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bonsai-mlx")
@verbose_option
def cli() -> None:
    """FLUX.2 [klein] (4B, 9B) and its 1-bit / ternary Bonsai compressions on MLX.

    \b
    First image:  bonsai-mlx gen -p "a bonsai tree in a misty forest, morning light"
    Models:       ternary (default), binary, klein-4b, klein-base-4b, klein-9b,
                  klein-base-9b, klein-9b-kv, any Hugging Face repo id or a local folder
    """


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (`bonsai-mlx`)."""
    cli.main(args=argv, prog_name="bonsai-mlx")


# ----------------------------------------------------------------------------------------
# Models: aliases, repo ids, local folders


def _is_local(model: str) -> bool:
    return Path(model).expanduser().is_dir()


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


@dataclass
class _Progress:
    """tqdm bars on stderr for one image: encoding, each denoising step, decoding; and the
    step's preview written to `preview_file` when given."""

    enabled: bool
    label: str = ""
    preview_file: Path | None = None
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

    def callback(self, step: int, total: int, latents=None, preview=None) -> None:
        if preview is not None and self.preview_file is not None:
            from bonsai_mlx.outputs import write_preview

            try:
                write_preview(preview, self.preview_file, step, total)
            except OSError as e:  # the images matter more than their previews: go on
                warnings.warn(f"--preview {self.preview_file}: {e.strerror or e}; no more "
                              "previews this run", stacklevel=1)
                self.preview_file = None
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
        parts.append(f"peak memory {human_bytes(peak_memory)}")
    return ", ".join(parts)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def parse_lora_spec(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); a suffix that is not a number belongs to the path
    (`c:1.safetensors`), unless the part before it is a file and the whole is not."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            if Path(path).expanduser().exists() and not Path(text).expanduser().exists():
                raise BonsaiError(f"--lora {text}: the scale {tail[:20]!r} is not a number; "
                                  f"write PATH:SCALE, e.g. {path}:0.8") from None
    return text, 1.0


def read_lora_options(specs: tuple[str, ...]) -> list:
    """(LoraFile, scale) of each --lora PATH[:SCALE], read and checked."""
    from bonsai_mlx.lora import read_lora

    return [(read_lora(path), scale) for path, scale in map(parse_lora_spec, specs)]


def apply_loras(pipe, lora_files, ignore_unmatched: bool, quiet: bool) -> None:
    """Load the LoRAs read from --lora; say what each costs on stderr."""
    for lora_file, scale in lora_files:
        pipe.load_lora(lora_file, scale=scale, ignore_unmatched=ignore_unmatched)
    for info in [] if quiet else pipe.loras.values():
        click.echo(f"LoRA {info.name} ({info.format}): scale {info.scale:g}, rank "
                   f"{'/'.join(map(str, info.ranks))}, {info.layers} layers, "
                   f"{human_bytes(info.bytes)}", err=True)


@cli.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-p", "--prompt", required=True, help="What to draw (or, with --image, the edit).")
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help=f"Alias ({', '.join(ALIASES)}), Hugging Face repo id or local folder.")
@click.option("--size", default=None,
              help="WIDTHxHEIGHT in pixels, multiples of 16 [default: 1024x1024, or the "
                   "first --image's size].")
@click.option("--seed", "seeds", type=click.IntRange(0, 2**64 - 1), multiple=True,
              help="Random seed; repeat for several images.")
@click.option("--seeds", "n_random", type=click.IntRange(1, MAX_SEEDS), default=None,
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
              help="Image-to-image from one --image (or inpainting with --mask): "
                   "0 < strength <= 1 (1 = ignore the image).")
@click.option("--mask", metavar="PATH", default=None,
              help="Inpaint the first --image: white = repaint, black = keep (same size as "
                   "the image; --strength default 0.8).")
@click.option("--vae", default=None, metavar="small|REPO|FOLDER",
              help="Swap the VAE decoder, e.g. small (FLUX.2 small decoder); images are "
                   "still encoded with the model's own encoder.")
@click.option("--reference-kv-cache/--no-reference-kv-cache", default=None,
              help="Compute the --image references once and reuse their attention keys and "
                   "values [default: on for klein-9b-kv, off otherwise (an approximation)].")
@dtype_option
@click.option("--no-offload", is_flag=True,
              help="Keep the text encoder loaded after encoding (more memory, faster reruns).")
@tile_vae_option
@click.option("--vae-tile-size", type=int, default=None, metavar="PIXELS",
              help="Tile side for tiled VAE decoding (implies --tile-vae): a multiple of 8, "
                   "at least 32 [default: the largest that fits in the memory available].")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="LoRA .safetensors file, folder or Hub repo id (owner/name[/file]), scale "
                   "1 by default; repeat for several.")
@click.option("--lora-ignore-unmatched", is_flag=True,
              help="Skip LoRA layers this model lacks (default: an error listing them).")
@click.option("--tensor-parallel", is_flag=True,
              help="Under mlx.launch: split the transformer across the processes, each image "
                   "faster [default there: each process makes a share of the images].")
@click.option("--preview", "preview_file", default=None, metavar="FILE.png",
              help="Write a small preview of every step to FILE.png, replacing it each time "
                   "(the one file bonsai-mlx overwrites, and only its own previews).")
@quiet_option
@verbose_option
def gen(prompt, model, size, seeds, n_random, steps, guidance, negative_prompt, output,
        images, strength, mask, vae, reference_kv_cache, dtype, no_offload, tile_vae, revision,
        loras, lora_ignore_unmatched, tensor_parallel, preview_file, quiet, vae_tile_size) -> None:
    """Generate images from a prompt (text-to-image, editing, image-to-image, inpainting).

    \b
    bonsai-mlx gen -p "a red fox in the snow"
    bonsai-mlx gen -m binary -p "a red fox" --size 768x512 --seed 1 --seed 2 -o fox.png
    bonsai-mlx gen -p "make it night" --image photo.png
    bonsai-mlx gen -p "an oil painting" --image photo.png --strength 0.6
    bonsai-mlx gen -p "a red balloon" --image photo.png --mask mask.png
    bonsai-mlx gen -p "a red fox" --vae small
    bonsai-mlx gen -m binary -p "a fox, ink style" --lora ink.safetensors:0.8
    mlx.launch --backend ring -n 2 -- bonsai-mlx gen -p "a red fox" --seeds 4

    Under mlx.launch (docs/distributed.md) rank 0 writes every file, exactly as one
    process would.
    """
    # Every check that needs no model comes first, so mistakes fail in milliseconds.
    from bonsai_mlx import distributed
    from bonsai_mlx.outputs import OutputPlan, check_preview_target, png_size_bound
    from bonsai_mlx.request import GenerationRequest

    width, height = parse_size(size) if size is not None else (None, None)
    model_id = resolve_model(model)
    request = GenerationRequest.create(
        prompt, width=width, height=height, steps=steps, guidance=guidance,
        negative_prompt=negative_prompt, images=list(images) or None, strength=strength,
        tiled_vae=tile_vae, vae_tile_size=vae_tile_size, mask=mask,
        reference_kv_cache=reference_kv_cache, names=CLI_NAMES,
    )
    _check_combinations(loras, tensor_parallel)
    plan = OutputPlan.from_option(output)
    preview_file = check_preview_target(preview_file, plan)
    seed_list = list(seeds) + [secrets.randbelow(2**32) for _ in range(n_random or 0)]
    seed_list = seed_list or [secrets.randbelow(2**32)]
    show = _show_progress(quiet)
    with _hub_progress(show):  # LoRA files are read (and checked) before the model loads
        lora_files = read_lora_options(loras)
    group = distributed.world()  # the processes mlx.launch started; one otherwise
    if group.rank() == 0:  # the only rank that writes
        check_writable(plan.folder, len(seed_list) * png_size_bound(request.width,
                                                                    request.height),
                       hint="choose another -o")
    with warnings.catch_warnings(), distributed.peer_errors(group):
        warnings.showwarning = _print_warning
        _warn_no_effect(request, tensor_parallel and group.size() == 1)
        seed_list = distributed.broadcast_ints(seed_list, group)  # rank 0's random seeds
        t0 = time.perf_counter()
        pipe = _load_pipeline(model_id, revision, dtype, request, no_offload, show,
                              tensor_parallel, vae)
        apply_loras(pipe, lora_files, lora_ignore_unmatched, quiet)
        fields = {"prompt": prompt, "negative_prompt": negative_prompt, "model": model_id,
                  "images": ", ".join(Path(p).name for p in images) or None,
                  "mask": Path(mask).name if mask else None, "vae": vae}
        _generate_all(pipe, request, seed_list, plan, fields, group,
                      group.size() > 1 and not tensor_parallel, show,
                      None if quiet else time.perf_counter() - t0, preview_file)


def _check_combinations(loras: tuple[str, ...], tensor_parallel: bool) -> None:
    if loras and tensor_parallel:
        raise BonsaiError("--lora and --tensor-parallel do not combine yet: a LoRA is not "
                          "sharded; leave out --tensor-parallel (each process then makes a "
                          "share of the images with the LoRA)")


def _warn_no_effect(request, lone_tensor_parallel: bool) -> None:
    """Options that would do nothing here, said once instead of silently ignored."""
    if request.reference_kv_cache and not request.reference_sizes:
        warnings.warn("--reference-kv-cache has no effect without reference images (--image "
                      "for editing); generating without it", stacklevel=2)
    if lone_tensor_parallel:
        warnings.warn("--tensor-parallel has no effect in a single process; start several "
                      "with mlx.launch (docs/distributed.md)", stacklevel=2)


def _generate_all(pipe, request, seed_list: list[int], plan, fields: dict[str, object], group,
                  data_parallel: bool, show: bool, load_seconds: float | None,
                  preview_file: Path | None = None) -> None:
    """One image per seed, written by rank 0, each followed by the summary line of the
    process that made it (none with `load_seconds` None: --quiet); rank 0 writes the step
    previews of the images it makes to `preview_file`."""
    pending_load = [load_seconds]  # on this process's first summary
    summaries: dict[int, str] = {}  # of this process's images, shown once written

    def make(job: tuple[int, int]):
        i, seed = job
        label = f"[{i + 1}/{len(seed_list)}] " if len(seed_list) > 1 else ""
        progress = _Progress(show, label, preview_file if group.rank() == 0 else None)
        image = _generate(pipe, request.with_seed(seed), progress)
        if load_seconds is not None and (data_parallel or group.rank() == 0):
            summary = format_summary(pipe.last_timings, pipe.last_peak_memory,
                                     pending_load.pop() if pending_load else None)
            where = f"rank {group.rank()}: " if data_parallel else ""
            summaries[i] = f"{where}{label}seed {seed}: {summary}"
        return image

    for (i, seed), image in _made(list(enumerate(seed_list)), make, group, data_parallel):
        if group.rank() == 0:  # rank 0 writes every file
            click.echo(str(_write_png(pipe, request.with_seed(seed), image, plan, fields)))
        if i in summaries:
            click.echo(summaries.pop(i), err=True)


def _made(jobs: list, make, group, data_parallel: bool) -> Iterator[tuple[object, object]]:
    """(job, image) in job order on every rank. Data-parallel: each rank makes a share and
    the uint8 pixels are gathered (no shared file system needed); otherwise every rank runs
    every job (together, when the transformer is sharded)."""
    if not data_parallel:
        yield from ((job, make(job)) for job in jobs)
        return
    from bonsai_mlx import distributed

    import mlx.core as mx
    import numpy as np
    from PIL import Image

    def pixels(job) -> mx.array:
        return mx.array(np.asarray(make(job)))  # (H, W, 3) uint8

    for job, px in distributed.map_in_rounds(jobs, pixels, group):
        yield job, Image.fromarray(np.array(px))


def _load_pipeline(model_id: str, revision: str | None, dtype: str, request, no_offload: bool,
                   show: bool, tensor_parallel: bool = False, vae: str | None = None):
    """Download (or find) the model, check that the request fits in memory, load it (with
    `vae`'s decoder)."""
    from bonsai_mlx.layout import ALLOW_PATTERNS
    from bonsai_mlx.memory import check_memory
    from bonsai_mlx.pipeline import Pipeline

    with _hub_progress(show):
        root = resolve_model_path(model_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    check_memory(root, request.width, request.height, dtype=dtype, tiled_vae=request.tiled_vae,
                 vae_tile_size=request.vae_tile_size,
                 reference_sizes=request.reference_sizes, keep_text_encoder=no_offload)
    return Pipeline.from_pretrained(root, dtype=dtype, keep_text_encoder=no_offload,
                                    tensor_parallel=tensor_parallel, vae=vae)


def _generate(pipe, request, progress: _Progress):
    """One image, with progress bars (and previews)."""
    progress.start()
    try:
        return pipe.run(request, callback=progress.callback,
                        preview=progress.preview_file is not None).output("pil")
    finally:
        progress.close()


def _write_png(pipe, request, image, plan, fields: dict[str, object]) -> Path:
    """The image written as a PNG carrying its settings."""
    from bonsai_mlx.outputs import generation_metadata, png_metadata, write_png_exclusive

    meta = generation_metadata(pipe, request, image, **fields)
    return write_png_exclusive(image, plan.folder / plan.name(fields["prompt"], request.seed),
                               png_metadata(meta))


# ----------------------------------------------------------------------------------------
# download


def _by_component(files: dict[str, int]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, size in sorted(files.items()):
        top = name.split("/", 1)[0] if "/" in name else TOP_LEVEL
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
    from bonsai_mlx.layout import ALLOW_PATTERNS as patterns  # only the files it reads

    if not quiet:
        remote = _remote_sizes(repo_id, revision, patterns)
        if remote:
            for comp, size in _by_component(remote).items():
                click.echo(f"  {comp:<32} {human_bytes(size):>10}", err=True)
            click.echo(f"  {'total':<32} {human_bytes(sum(remote.values())):>10}  "
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
    from bonsai_mlx import info as folder_info

    if model.endswith(".safetensors") and Path(model).expanduser().is_file():
        from bonsai_mlx.lora import read_lora

        summary = read_lora(model).summary()
        click.echo(json.dumps(summary, indent=2) if as_json
                   else "\n".join(folder_info.lora_lines(summary)))
        return
    folder, name = folder_info.cached_model_folder(model, revision)
    report = folder_info.folder_report(folder, name)
    click.echo(json.dumps(report, indent=2) if as_json
               else "\n".join(folder_info.report_lines(report)))


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
