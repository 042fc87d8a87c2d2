"""What a model folder (or a LoRA file) holds, from file sizes, safetensors headers and
configs only (no weights are loaded): `bonsai-mlx info`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.text_encoder import mlx_quantization
from bonsai_mlx.quant.loading import (
    AFFINE_FORMATS,
    QUANT_METHOD,
    QuantizationConfig,
    read_quantization_config,
)
from bonsai_mlx.weights import (
    SAFETENSORS_DTYPE_NAMES,
    TOP_LEVEL,
    folder_bytes,
    folder_files,
    human_bytes,
    read_json,
    read_safetensors_header,
    resolve_model,
)


@dataclass
class Component:
    """One top-level folder of a model folder (or its top-level files, TOP_LEVEL)."""

    name: str
    files: int = 0
    bytes: int = 0
    tensors: int = 0
    format: str = ""
    dtype_bytes: dict[str, int] = field(default_factory=dict)


def describe_folder(folder: Path) -> list[Component]:
    """Components of a model folder: files, bytes (`weights.folder_bytes`), tensor dtypes
    from safetensors headers only, and the storage format."""
    comps = {name: Component(name, bytes=n) for name, n in folder_bytes(folder).items()}
    for name, path in folder_files(folder):
        c = comps[name]
        c.files += 1
        if path.suffix == ".safetensors":
            for key, t in read_safetensors_header(path).items():
                if key == "__metadata__":
                    continue
                c.tensors += 1
                dt = SAFETENSORS_DTYPE_NAMES.get(t["dtype"], t["dtype"])
                start, stop = t["data_offsets"]
                c.dtype_bytes[dt] = c.dtype_bytes.get(dt, 0) + stop - start
    for c in comps.values():
        c.format = _format_of(folder if c.name == TOP_LEVEL else folder / c.name, c)
    return sorted(comps.values(), key=lambda c: (c.name == TOP_LEVEL, c.name))


def _format_of(folder: Path, c: Component) -> str:
    """Storage format of a component: our packed format or MLX affine bits from
    quantization_config.json / config.json (docs/formats.md), else the dense dtypes."""
    dense = [d for d in sorted(c.dtype_bytes, key=lambda d: -c.dtype_bytes[d])
             if d.startswith(("float", "bfloat"))]
    if c.name == TOP_LEVEL:
        return "index" if not c.tensors else "dense " + " + ".join(dense)
    try:
        quant = read_quantization_config(folder)
    except BonsaiError:
        return "quantized (unrecognised quantization_config.json)" + (
            f" + {dense[0]} dense layers" if dense else "")
    if quant is not None:
        return _packed_format(quant, dense)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    affine = mlx_quantization(config)
    if affine is not None and "bits" in affine:
        return f"MLX affine {affine['bits']}-bit, group {affine.get('group_size', '?')}"
    if dense:
        return "dense " + " + ".join(dense)
    if c.tensors:
        return " + ".join(sorted(c.dtype_bytes))
    return "tokenizer" if c.name == "tokenizer" else "config"


def _packed_format(quant: QuantizationConfig, dense: list[str]) -> str:
    group = f", group {quant.group_size}" if quant.group_size else ""
    if quant.method == QUANT_METHOD:  # bonsai-mlx's own packs
        n = len(quant.packed_layers or [])
        text = f"{str(quant.format).lower()} packed (bonsai-mlx){group}" + (
            f", {n} layers" if n else "")
        if quant.dense_bits == 8:
            return text + f" + MLX affine 8-bit dense layers ({quant.dense_dtype or '?'})"
        dense_dtype = quant.dense_dtype or (dense[0] if dense else None)
        return text + (f" + {dense_dtype} dense layers" if dense_dtype else "")
    meaning = f" ({AFFINE_FORMATS[quant.bits]})" if quant.bits in AFFINE_FORMATS else ""
    text = f"MLX affine {quant.bits}-bit{meaning}{group}"  # a Bonsai MLX pack (mflux layout)
    return text + (f" + {dense[0]} dense layers" if dense else "")


def pipeline_class(folder: Path) -> str | None:
    """The `_class_name` of the folder's model_index.json, if it has one."""
    index = folder / "model_index.json"
    return read_json(index).get("_class_name") if index.is_file() else None


def cached_model_folder(model: str, revision: str | None = None) -> tuple[Path, str]:
    """(folder, name) of a local folder, or of an alias / repo id's cached snapshot, without
    touching the network."""
    resolved = resolve_model(model)
    if Path(resolved).expanduser().is_dir():
        return Path(resolved).expanduser(), resolved
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(resolved, revision=revision, local_files_only=True)), \
            resolved
    except LocalEntryNotFoundError:
        raise BonsaiError(
            f"{resolved} is not in the local Hugging Face cache; run `bonsai-mlx download "
            f"{resolved}` first, or give a local folder"
        ) from None


def folder_report(folder: Path, name: str) -> dict[str, Any]:
    """`bonsai-mlx info --json`: the folder's components, formats and bytes."""
    comps = describe_folder(folder)
    if not comps:
        raise BonsaiError(f"{folder} holds no files; is this the right folder?")
    return {
        "model": name, "folder": str(folder), "pipeline": pipeline_class(folder),
        "components": [
            {"name": c.name, "format": c.format, "files": c.files, "bytes": c.bytes,
             "tensors": c.tensors, "dtype_bytes": c.dtype_bytes} for c in comps
        ],
        "total_bytes": sum(c.bytes for c in comps),
    }


def report_lines(report: dict[str, Any]) -> list[str]:
    """`folder_report` as a table: component, format, bytes."""
    name, folder, comps = report["model"], report["folder"], report["components"]
    lines = [name + (f"  ({report['pipeline']})" if report["pipeline"] else "")]
    if name != folder:
        lines.append(f"  {folder}")
    width = max(len(c["name"]) for c in [*comps, {"name": "component"}])
    fwidth = max(len(c["format"]) for c in [*comps, {"format": "format"}])
    lines.append(f"{'component':<{width}}  {'format':<{fwidth}}  {'bytes':>15}")
    lines += [f"{c['name']:<{width}}  {c['format']:<{fwidth}}  {c['bytes']:>15,}  "
              f"{human_bytes(c['bytes'])}" for c in comps]
    total = report["total_bytes"]
    lines.append(f"{'total':<{width}}  {'':<{fwidth}}  {total:>15,}  {human_bytes(total)}")
    return lines


def lora_lines(info: dict[str, Any]) -> list[str]:
    """A LoRA file's summary (`LoraFile.summary`) as lines: format, ranks, layers."""
    lines = [f"{info['file']}  (LoRA, {info['format']} format)",
             f"  layers      {len(info['layers'])} transformer layers from "
             f"{info['file_layers']} in the file, rank {'/'.join(map(str, info['ranks']))}",
             f"  parameters  {info['parameters']:,} ({', '.join(info['dtypes'])}, "
             f"{human_bytes(info['bytes'])})"]
    if info["text_encoder_tensors"]:
        lines.append(f"  ignored     {info['text_encoder_tensors']} text-encoder tensors "
                     "(FLUX.2 LoRAs apply to the transformer)")
    if info["unknown_tensors"]:
        lines.append(f"  unknown     {len(info['unknown_tensors'])} tensors of no known "
                     f"layer, e.g. {info['unknown_tensors'][0]}")
    width = max((len(layer["module"]) for layer in info["layers"]), default=5)
    lines.append(f"{'layer':<{width}}  rank  alpha/rank  in -> out")
    lines += [f"{layer['module']:<{width}}  {layer['rank']:>4}  {layer['scaling']:>10.4g}  "
              f"{layer['in']} -> {layer['out']}" for layer in info["layers"]]
    return lines
