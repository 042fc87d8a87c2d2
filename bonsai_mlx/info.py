"""What a model folder holds, from file sizes, safetensors headers and configs only (no
weights are loaded): `bonsai-mlx info`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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
