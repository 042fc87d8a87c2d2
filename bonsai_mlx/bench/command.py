"""`bonsai-mlx bench`: the click command and the command line each record carries."""

from __future__ import annotations

import shlex
from typing import Any

from bonsai_mlx import distributed
from bonsai_mlx.bench.report import format_table
from bonsai_mlx.bench.runner import DEFAULT_PROMPT, run_bench
from bonsai_mlx.bench.synthetic import SYNTHETIC_KINDS
from bonsai_mlx.cli import dtype_option, tile_vae_option
from bonsai_mlx.images import parse_size

import click


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("--synthetic", type=click.Choice(SYNTHETIC_KINDS, case_sensitive=False),
              help="Random weights with Klein 4B's shapes and this transformer format.")
@click.option("--size", "sizes", multiple=True, metavar="WxH",
              help="Image size, repeatable (default 512x512 and 1024x1024; --tiny: 64x64).")
@click.option("--steps", default=4, show_default=True, help="Denoising steps.")
@click.option("--repeats", "-n", default=3, show_default=True, help="Timed runs per size.")
@click.option("--warmup", default=1, show_default=True, help="Untimed runs first.")
@dtype_option
@click.option("--tiny", is_flag=True, help="Miniature synthetic model: a smoke run in seconds.")
@click.option("--skip-encode", is_flag=True,
              help="Synthetic only: zeros instead of the 4-bit text encoder, to time only "
                   "the transformer and VAE; encode seconds are then n/a.")
@click.option("--compare", is_flag=True, help="Also time diffusers + torch.")
@click.option("--vae", default=None, metavar="small|REPO|FOLDER",
              help="Swap the VAE decoder (small: FLUX.2 small decoder; --synthetic: its "
                   "shapes) to compare decode seconds and memory.")
@click.option("--profile", is_flag=True,
              help="Also seconds per kind of work (linears, attention, norms, RoPE, VAE) "
                   "in one profiled step per size.")
@tile_vae_option
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=False)
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Append the records as JSON lines to this new file, or to an existing "
                   ".json / .jsonl file of JSON lines.")
@click.option("--tensor-parallel", is_flag=True,
              help="Under mlx.launch: shard the transformer across the processes.")
def bench_command(model, synthetic, sizes, steps, repeats, warmup, dtype, tiny, skip_encode,
                  compare, vae, profile, tile_vae, prompt, json_path,
                  tensor_parallel) -> None:
    """Benchmark MODEL (alias, Hub repo or folder) or a --synthetic model: seconds per
    stage, memory, footprint and the distance to the chip's peak."""
    if tiny and synthetic is None:
        synthetic = "binary"
    records = run_bench(
        model, synthetic=synthetic, sizes=[parse_size(s) for s in sizes] or None,
        steps=steps, repeats=repeats, warmup=warmup, dtype=dtype, tiny=tiny,
        skip_encode=skip_encode, compare=compare, vae=vae, profile=profile,
        tiled_vae=tile_vae, prompt=prompt, json_path=json_path,
        command=command_line(click.get_current_context().params),
        tensor_parallel=tensor_parallel,
    )
    if distributed.world().rank() == 0:
        click.echo(format_table(records))


def command_line(params: dict[str, Any]) -> str:
    """The command that reproduces this run (options spelled out, defaults included)."""
    parts = ["bonsai-mlx", "bench"]
    if params.get("model"):
        parts.append(params["model"])
    if params.get("synthetic"):
        parts += ["--synthetic", params["synthetic"]]
    for s in params.get("sizes") or ():
        parts += ["--size", s]
    for name in ("steps", "repeats", "warmup", "dtype"):
        parts += [f"--{name}", str(params[name])]
    if params.get("vae"):
        parts += ["--vae", params["vae"]]
    parts += [f"--{flag.replace('_', '-')}" for flag in ("tiny", "skip_encode", "compare",
                                                          "profile", "tensor_parallel")
              if params.get(flag)]
    if params.get("tile_vae") is not None:
        parts.append("--tile-vae" if params["tile_vae"] else "--no-tile-vae")
    if params.get("prompt") not in (None, DEFAULT_PROMPT):
        parts += ["--prompt", params["prompt"]]
    return shlex.join(parts)
