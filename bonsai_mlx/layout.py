"""Model folder layouts: which subfolder holds which model, how a folder is recognised, and
its bytes on disk per component.

Two layouts are read: a diffusers `Flux2KleinPipeline` folder (also what `save_pretrained`
and `bonsai-mlx convert` write) and a Bonsai MLX pack (`transformer-packed-mflux/`,
`text_encoder-mlx-4bit/`). `tokenizer/`, `vae/` and `scheduler/` are shared.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.weights import TOP_LEVEL, existing_folder, folder_bytes, read_json

# Only these files are downloaded from the Hub (both layouts; a repo holds one of them).
ALLOW_PATTERNS = [
    "model_index.json", "manifest.json",
    # tokenizer data only: never a .py file a tokenizer_config.json could point at
    "scheduler/*.json", "tokenizer/*.json", "tokenizer/*.txt", "tokenizer/*.jinja",
    "tokenizer/*.model",
    "transformer/*.json", "transformer/*.safetensors",
    "text_encoder/*.json", "text_encoder/*.safetensors",
    "vae/*.json", "vae/*.safetensors",
    "transformer-packed-mflux/*.json", "transformer-packed-mflux/*.safetensors",
    "text_encoder-mlx-4bit/*.json", "text_encoder-mlx-4bit/*.safetensors",
]
# model_index.json `_class_name`s we run; the KV one turns reference_kv_cache on by default
PIPELINE_CLASSES = ("Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2KleinInpaintPipeline")
KV_PIPELINE_CLASS = "Flux2KleinKVPipeline"
DIFFUSERS_COMPONENTS = {  # model_index.json entries of a saved pipeline
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}
# Folder of each model per layout (tokenizer/, vae/ and scheduler/ are shared).
LAYOUTS = {
    "diffusers": {"transformer": "transformer", "text_encoder": "text_encoder"},
    "bonsai-mlx-pack": {"transformer": "transformer-packed-mflux",
                        "text_encoder": "text_encoder-mlx-4bit"},
}
SHARED_DIRS = ("tokenizer", "vae", "scheduler")


def detect_layout(root: str | Path) -> str:
    """'diffusers' or 'bonsai-mlx-pack'; anything else is an explained BonsaiError."""
    root = Path(root)
    if not root.is_dir():
        raise BonsaiError(f"{root} is not a folder")
    if (root / "transformer-packed-mflux").is_dir():
        _require(root, ("text_encoder-mlx-4bit", "tokenizer", "vae", "scheduler"),
                 "a Bonsai MLX pack")
        return "bonsai-mlx-pack"
    index_path = root / "model_index.json"
    if index_path.is_file():
        cls_name = read_json(index_path).get("_class_name")
        if cls_name not in PIPELINE_CLASSES:
            raise BonsaiError(
                f"{index_path} describes a {cls_name!r}; bonsai-mlx runs FLUX.2 [klein] "
                f"({', '.join(PIPELINE_CLASSES)}) only"
            )
        _require(root, ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"),
                 "a Flux2KleinPipeline folder")
        return "diffusers"
    found = sorted(p.name for p in root.iterdir())[:12]
    raise BonsaiError(
        f"{root} is not a FLUX.2 [klein] model folder: expected a diffusers pipeline "
        "(model_index.json with transformer/, text_encoder/, tokenizer/, vae/, scheduler/) or "
        f"a Bonsai MLX pack (transformer-packed-mflux/, text_encoder-mlx-4bit/, vae/); found "
        f"{found}"
    )


def _require(root: Path, dirs: tuple[str, ...], what: str) -> None:
    missing = [d for d in dirs if not (root / d).is_dir()]
    if missing:
        raise BonsaiError(
            f"{root} is {what} but lacks {', '.join(missing)}/; the download is incomplete "
            "or the folder was copied partly"
        )


def component_dirs(root: str | Path) -> dict[str, str]:
    """Component -> its subfolder name: transformer, text_encoder, vae, tokenizer, scheduler."""
    return dict(LAYOUTS[detect_layout(root)], **{d: d for d in SHARED_DIRS})


def payload(root: str | Path, *, weights_only: bool = False) -> dict[str, int]:
    """Bytes on disk per component of a pipeline folder (any layout): transformer,
    text_encoder, vae, tokenizer, scheduler, and top-level files as `other`. A Bonsai pack's
    `transformer-packed-mflux/` and `text_encoder-mlx-4bit/` count as transformer and
    text_encoder. `weights_only` counts the safetensors files alone."""
    dirs = component_dirs(root)
    sizes = folder_bytes(root, weights_only=weights_only)
    return {**{name: sizes.get(sub, 0) for name, sub in dirs.items()},
            "other": sizes.get(TOP_LEVEL, 0)}


def check_destination(dst: str | Path, *, overwrite: bool, sources: Sequence[str | Path] = ()
                      ) -> None:
    """Whether `save_pretrained` / `convert` may write `dst`; a BonsaiError, before anything
    is touched, if not.

    A new folder is always fine. An existing one needs `overwrite`, and is replaced only if
    it is a model folder (one bonsai-mlx wrote, or a layout `detect_layout` knows) and not
    a filesystem root or mount point, the current folder or one holding it, the home folder
    or one holding it, nor a source folder, one inside a source or one holding a source.
    """
    dst = Path(dst).expanduser().absolute()
    if not existing_folder(dst, overwrite=overwrite):
        return
    reason = _unreplaceable(dst.resolve(), [Path(s).expanduser().resolve() for s in sources])
    if reason:
        raise BonsaiError(f"refusing to replace {dst}: it is {reason}. --overwrite replaces "
                          "only a model folder (one bonsai-mlx wrote); choose a new folder")


def _unreplaceable(real: Path, sources: list[Path]) -> str | None:
    """Why the existing folder `real` (resolved) must not be replaced, or None."""

    def within(inner: Path, outer: Path) -> bool:
        return inner == outer or outer in inner.parents

    if real == Path(real.anchor) or os.path.ismount(real):
        return "a filesystem root or mount point"
    if within(Path.cwd().resolve(), real):
        return "the current folder or a folder holding it"
    if within(Path.home().expanduser().resolve(), real):
        return "the home folder or a folder holding it"
    for source in sources:
        if real == source:
            return "the folder the model is loaded from (its weights are read lazily)"
        if within(source, real):
            return f"a folder holding the source {source}"
        if within(real, source):
            return f"inside the source {source}"
    index = real / "model_index.json"
    if index.is_file() and "bonsai_mlx" in read_json(index):
        return None
    try:
        detect_layout(real)
    except BonsaiError:
        return "not a model folder (no FLUX.2 [klein] model_index.json or Bonsai MLX pack)"
    return None
