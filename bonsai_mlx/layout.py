"""Model folder layouts: which subfolder holds which model, how a folder is recognised, and
its bytes on disk per component.

Two layouts are read: a diffusers `Flux2KleinPipeline` folder (also what `save_pretrained`
and `bonsai-mlx convert` write) and a Bonsai MLX pack (`transformer-packed-mflux/`,
`text_encoder-mlx-4bit/`). `tokenizer/`, `vae/` and `scheduler/` are shared.
"""

from __future__ import annotations

from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.weights import TOP_LEVEL, folder_bytes, read_json

# Only these files are downloaded from the Hub (both layouts; a repo holds one of them).
ALLOW_PATTERNS = [
    "model_index.json", "manifest.json",
    "scheduler/*.json", "tokenizer/*",
    "transformer/*.json", "transformer/*.safetensors",
    "text_encoder/*.json", "text_encoder/*.safetensors",
    "vae/*.json", "vae/*.safetensors",
    "transformer-packed-mflux/*.json", "transformer-packed-mflux/*.safetensors",
    "text_encoder-mlx-4bit/*.json", "text_encoder-mlx-4bit/*.safetensors",
]
PIPELINE_CLASSES = ("Flux2KleinPipeline",)
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
SHARED_DIRS = ("vae", "tokenizer", "scheduler")


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
