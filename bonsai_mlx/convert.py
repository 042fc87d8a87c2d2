"""Convert a FLUX.2 [klein] pipeline to bonsai-mlx's layout: packed transformer, trimmed text
encoder, VAE as stored.

    convert("prism-ml/bonsai-image-binary-4B-mlx-1bit", "bonsai-binary")     # lossless, 1-bit
    convert("black-forest-labs/FLUX.2-klein-4B", "klein-ternary", "ternary")  # absmean, warns

Sources (a local folder or a Hugging Face repo id):

- a Bonsai MLX pack (`transformer-packed-mflux/`, `text_encoder-mlx-4bit/`, `vae/`): the
  1-bit / 2-bit affine layers become binary / ternary exactly (every group checked), the
  4-bit text encoder keeps its tensors bit for bit;
- a diffusers `Flux2KleinPipeline` folder whose packed layers already take the binary /
  ternary values per group (Bonsai's `*-unpacked`): packed exactly, and each packed layer is
  verified to decode to the original weight;
- any other FLUX.2 [klein] checkpoint: post-training absmean quantisation, with a warning
  (a model not trained for binary / ternary weights loses quality);
- a folder saved by bonsai-mlx (re-trim, or change the dense layers to 8-bit).

The text encoder keeps only the layers up to the deepest one FLUX.2 reads (9, 18, 27 of the
36 of Qwen3-4B and Qwen3-8B), MLX affine 4-bit by default. Everything is written into a
temporary folder and renamed into place (`Pipeline.save_pretrained`). `bonsai-mlx convert`
is the CLI.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.layout import ALLOW_PATTERNS, LAYOUTS, check_destination, detect_layout, payload
from bonsai_mlx.models.transformer import Flux2Transformer
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.quant import (
    PACKED_LINEAR,
    quantize_dense_layers,
    quantize_model,
)
from bonsai_mlx.quant.model import get_module, packed_format
from bonsai_mlx.weights import (
    check_writable,
    checkpoint_float_dtype,
    human_bytes,
    resolve_model,
    resolve_model_path,
)

import click
import mlx.core as mx

COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer", "scheduler", "other")
TEXT_ENCODER_BITS = (3, 4, 8, 16)
DENSE_BITS = (16, 8)


@dataclass
class ConversionReport:
    """What `convert` did: bytes per component before and after, and how the transformer
    was packed (`method`: "lossless (verified)", "lossless (from MLX affine)", "absmean
    (post-training)" or "unchanged")."""

    source: Path
    destination: Path
    format: str
    method: str
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)

    @property
    def lossless(self) -> bool:
        return not self.method.startswith("absmean")

    def table(self) -> str:
        """Bytes per component, before and after (decimal units)."""
        rows = [f"{'component':<13} {'before':>15} {'after':>15} {'change':>8}"]
        names = [c for c in COMPONENTS if c in self.before or c in self.after]
        for name in [*names, "total"]:
            b = sum(self.before.values()) if name == "total" else self.before.get(name, 0)
            a = sum(self.after.values()) if name == "total" else self.after.get(name, 0)
            change = f"{(a - b) / b:+.1%}" if b else ""
            rows.append(f"{name:<13} {b:>15,} {a:>15,} {change:>8}   "
                        f"{human_bytes(b)} -> {human_bytes(a)}")
        return "\n".join(rows)


def pack_transformer(model: Flux2Transformer, fmt: str) -> str:
    """Pack the transformer's binary / ternary layers in place. Returns the method: exact
    (every layer then checked to decode to its original weight) or absmean, with a
    warning."""
    paths = model.packable_layers()
    originals = {p: get_module(model, p).weight for p in paths}
    exact = quantize_model(model, fmt)  # warns when a layer needs absmean
    if not exact:
        return "absmean (post-training)"
    for p in paths:  # lossless, verified: every weight decodes back exactly
        decoded = get_module(model, p).dequantize(mx.float32)
        if not mx.array_equal(decoded, originals[p].astype(mx.float32)).item():
            raise BonsaiError(f"{p}: the packed layer does not decode to the original weight; "
                              "this is a bug in bonsai-mlx, please report it")
    return "lossless (verified)"


def convert(
    src: str | Path,
    dst: str | Path,
    fmt: str | None = None,
    *,
    dense_bits: int = 16,
    text_encoder_bits: int = 4,
    overwrite: bool = False,
    revision: str | None = None,
    vae: str | Path | None = None,
    echo: Callable[[str], None] | None = print,
) -> ConversionReport:
    """Convert the pipeline `src` (folder or repo id) into bonsai-mlx's layout at `dst`.

    - `fmt`: "binary" or "ternary" packs the transformer's big linear layers (12 per double
      block, 2 per single block: 100 in the 4B, 144 in the 9B), exactly when their weights
      already take those values, else absmean with a warning; None (default) keeps the
      transformer as it is (dense or packed). A packed source must be asked for its own
      format (or None).
    - `dense_bits`: 16 keeps the other transformer layers in the checkpoint's float dtype;
      8 makes their Linear layers MLX affine 8-bit (group 64).
    - `text_encoder_bits`: 4 (default), 3 or 8 (MLX affine, group 64), or 16 (float); the
      encoder keeps only the layers the pipeline reads. A quantised source encoder (the
      Bonsai packs: 4-bit) can only be kept at its own width.
    - `vae`: write this VAE decoder instead of the source's (`"small"`: FLUX.2's small
      decoder; a repo or folder), with the source's encoder (`Pipeline.from_pretrained`).
    - `overwrite`: replace an existing `dst` (otherwise an error); only a model folder that
      is not a source, the current or the home folder (`layout.check_destination`).
    `echo` receives progress lines and the byte table (None: silent). Returns the report.
    """
    say = echo or (lambda _: None)
    _check_options(fmt, dense_bits, text_encoder_bits)
    dst = Path(dst).expanduser()
    local = Path(resolve_model(src))  # a repo id is checked once downloaded (save_pretrained)
    check_destination(dst, overwrite=overwrite, sources=[local] if local.exists() else [])
    check_writable(dst.parent, hint="choose another destination")
    root = resolve_model_path(src, revision=revision, allow_patterns=ALLOW_PATTERNS)
    layout = detect_layout(root)
    before = payload(root)
    # The checkpoint's own float dtype: fp16 / bf16 values load (and save) unchanged.
    dtype = checkpoint_float_dtype(root / LAYOUTS[layout]["transformer"])
    say(f"loading {root} ({layout}, {str(dtype).removeprefix('mlx.core.')})")
    pipe = Pipeline.from_pretrained(root, dtype=dtype, vae=vae)
    have = packed_format(pipe.transformer)
    have = have if have in PACKED_LINEAR else None
    method = _pack(pipe.transformer, src, have, fmt, dense_bits, layout, say)
    say(f"writing {dst} (text encoder {text_encoder_bits}-bit, trimmed to layer "
        f"{max(pipe.prompt_encoder.out_layers)})")
    out = pipe.save_pretrained(dst, overwrite=overwrite, text_encoder_bits=text_encoder_bits,
                               transformer_dtype=dtype)
    report = ConversionReport(root, out, have or fmt or "dense", method, before, payload(out))
    say(f"transformer: {report.format}, {report.method}")
    say(report.table())
    return report


def _check_options(fmt: str | None, dense_bits: int, text_encoder_bits: int) -> None:
    if fmt is not None and fmt not in PACKED_LINEAR:
        raise BonsaiError(f"unknown format {fmt!r}; use 'binary' or 'ternary'")
    if dense_bits not in DENSE_BITS:
        raise BonsaiError(f"dense_bits must be 16 or 8, not {dense_bits!r}")
    if text_encoder_bits not in TEXT_ENCODER_BITS:
        raise BonsaiError(f"text_encoder_bits must be 3, 4, 8 or 16, not {text_encoder_bits!r}")


def _pack(model: Flux2Transformer, src: str | Path, have: str | None, fmt: str | None,
          dense_bits: int, layout: str, say: Callable[[str], None]) -> str:
    """Pack the transformer as asked (in place); returns how (`ConversionReport.method`)."""
    if have is not None:
        if fmt is not None and fmt != have:
            raise BonsaiError(f"{src} is already {have}-packed; it cannot become {fmt} "
                              "(convert its unpacked checkpoint instead)")
        method = "lossless (from MLX affine)" if layout == "bonsai-mlx-pack" else "unchanged"
    elif fmt is not None:
        say(f"packing the transformer ({fmt})")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            method = pack_transformer(model, fmt)
        for w in caught:
            say(f"warning: {w.message}")
            warnings.warn(str(w.message), w.category, stacklevel=3)
    elif dense_bits == 8:
        raise BonsaiError("dense_bits=8 needs a packed transformer: pass a format "
                          "(--format binary or ternary)")
    else:
        method = "unchanged"
    if dense_bits == 8:
        quantize_dense_layers(model, 8)
    return method


# ---- command line -------------------------------------------------------------------------


@click.command("convert", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src")
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["binary", "ternary"]), default=None,
              help="Pack the transformer's big linear layers (4B: 100, 9B: 144). Omit "
                   "to keep it as it is.")
@click.option("--dense-bits", type=click.Choice(["16", "8"]), default="16", show_default=True,
              help="The other transformer layers: 16-bit, or MLX affine 8-bit.")
@click.option("--text-encoder-bits", type=click.Choice(["4", "3", "8", "16"]), default="4",
              show_default=True, help="MLX affine bits of the (trimmed) text encoder.")
@click.option("--vae", default=None, metavar="small|REPO|FOLDER",
              help="Write this VAE decoder instead (small: FLUX.2 small decoder); the "
                   "encoder stays SRC's.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--revision", default=None, help="Branch, tag or commit of a Hub SRC.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the byte table.")
def convert_command(src, dst, fmt, dense_bits, text_encoder_bits, vae, overwrite, revision,
                    quiet) -> None:
    """Convert SRC (a folder or Hugging Face repo id: diffusers FLUX.2 [klein], a Bonsai
    `*-unpacked` repo or a Bonsai MLX pack) into bonsai-mlx's layout at DST, and report the
    bytes per component before and after.

    \b
    bonsai-mlx convert prism-ml/bonsai-image-binary-4B-mlx-1bit bonsai-binary
    bonsai-mlx convert ./klein-ternary-unpacked out --format ternary --dense-bits 8
    bonsai-mlx convert klein-4b klein-small-decoder --vae small
    """
    report = convert(src, dst, fmt, dense_bits=int(dense_bits),
                     text_encoder_bits=int(text_encoder_bits), overwrite=overwrite,
                     revision=revision, vae=vae,
                     echo=None if quiet else lambda s: click.echo(s, err=True))
    if quiet:
        click.echo(report.table())
