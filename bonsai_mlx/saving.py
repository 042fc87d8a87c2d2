"""Writing a pipeline in bonsai-mlx's layout (`Pipeline.save_pretrained`): model_index.json,
scheduler/, tokenizer/, transformer/ (dense or packed), text_encoder/ (truncated, quantized)
and vae/ (docs/formats.md)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from bonsai_mlx.layout import DIFFUSERS_COMPONENTS, KV_PIPELINE_CLASS, PIPELINE_CLASSES
from bonsai_mlx.models.vae import save_vae_with_decoder
from bonsai_mlx.weights import load_weights, parse_dtype, read_json, save_safetensors, write_json

import mlx.core as mx

if TYPE_CHECKING:
    from bonsai_mlx.pipeline import Pipeline


def write_pipeline(pipe: Pipeline, folder: Path, text_encoder_bits: int,
                   transformer_dtype: str | mx.Dtype | None,
                   vae_dtype: str | mx.Dtype | None) -> None:
    """Write `pipe` into the empty `folder` in our layout (`Pipeline.save_pretrained` checks
    the destination and renames the folder into place)."""
    source = pipe.source  # not None: save_pretrained checked
    index_path = source / "model_index.json"
    index = read_json(index_path) if index_path.is_file() else {}
    index = {k: v for k, v in index.items() if not k.startswith("bonsai_mlx")}
    cls_name = KV_PIPELINE_CLASS if pipe.reference_kv_cache else PIPELINE_CLASSES[0]
    index.update({"_class_name": cls_name, "is_distilled": pipe.is_distilled})
    for name, entry in DIFFUSERS_COMPONENTS.items():
        index.setdefault(name, entry)
    quant = pipe.transformer.save_pretrained(folder / "transformer", dtype=transformer_dtype)
    text = pipe.prompt_encoder.save_pretrained(folder / "text_encoder",
                                               bits=text_encoder_bits)
    if pipe.vae.decoder_source not in (None, source / "vae"):  # a swapped decoder
        save_vae_with_decoder(folder / "vae", pipe.vae.decoder_source, source / "vae",
                              None if vae_dtype is None else parse_dtype(vae_dtype))
    else:
        save_vae_files(source / "vae", folder / "vae", vae_dtype)
    (folder / "tokenizer").mkdir()
    for f in sorted(Path(pipe.prompt_encoder.tokenizer_dir).iterdir()):
        if f.is_file():
            shutil.copyfile(f, folder / "tokenizer" / f.name)
    scheduler_file = source / "scheduler" / "scheduler_config.json"
    scheduler = (read_json(scheduler_file) if scheduler_file.is_file()
                 else {"_class_name": "FlowMatchEulerDiscreteScheduler",
                       **dataclasses.asdict(pipe.scheduler_config)})
    write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    index["bonsai_mlx"] = {
        "transformer": quant.get("format", "dense"),
        "text_encoder_bits": (text.get("quantization") or {}).get("bits", 16),
        "text_encoder_out_layers": list(pipe.prompt_encoder.out_layers),
    }
    write_json(folder / "model_index.json", index)


def save_vae_files(source: Path, folder: Path, dtype: str | mx.Dtype | None = None) -> None:
    """Copy a `vae/` folder's config and weights (encoder included: editing and
    image-to-image need it; text-to-image never loads it). `dtype` None copies the files
    byte for byte; otherwise float tensors are cast to it."""
    folder.mkdir(parents=True)
    dt = parse_dtype(dtype) if dtype is not None else None
    files = [f for f in sorted(source.iterdir()) if f.is_file()
             and (f.suffix == ".safetensors" or f.name.endswith(".json"))]
    for f in files:
        if f.suffix != ".safetensors" or dt is None:
            shutil.copyfile(f, folder / f.name)
            continue
        tensors = {k: v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in load_weights(f).items()}
        save_safetensors(folder / f.name, tensors, metadata={"format": "pt"})
