"""Loading and saving packed transformers: our layout and the Bonsai MLX affine packs.

Two folder layouts carry a `quantization_config.json` beside the transformer's config.json:

- ours (`"quant_method": "bonsai-mlx"`, docs/formats.md): packed `<layer>.weight` +
  `<layer>.scales` for the listed layers, everything else dense (or MLX affine 8-bit);
- Bonsai's `transformer-packed-mflux/` (`"bits": 1 | 2`, `"group_size": 128`,
  `"skip_patterns"`): every packed layer an MLX affine triple `<layer>.weight` (uint32),
  `.scales`, `.biases`. These convert exactly to BinaryLinear / TernaryLinear (checked group
  by group), or with `affine_baseline=True` load as they are into stock `nn.QuantizedLinear`.

The model is any nn.Module with diffusers' layer names whose packed layers are still dense
`nn.Linear`s (a freshly built `Flux2Transformer`); its layers are swapped in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.quant import formats
from bonsai_mlx.quant.layers import PACKED_LINEAR, BinaryLinear, TernaryLinear
from bonsai_mlx.quant.model import (
    DENSE_GROUP_SIZE,
    get_module,
    packable_layers,
    quantize_dense_layers,
    set_module,
    use_packed_layers,
)
from bonsai_mlx.weights import (
    load_into,
    load_weights,
    read_json,
    save_safetensors,
    write_json,
)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

QUANT_CONFIG = "quantization_config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
QUANT_METHOD = "bonsai-mlx"
MLX_AFFINE = "mlx-affine"
AFFINE_FORMATS = {1: "binary", 2: "ternary"}  # a Bonsai MLX pack's bits -> our format


@dataclass(frozen=True)
class QuantizationConfig:
    """A transformer folder's `quantization_config.json` (docs/formats.md), as written:
    `apply_packed_layout` checks that it can be loaded, `bonsai-mlx info` describes it.

    `method` is "bonsai-mlx" (ours: `format`, `group_size`, `packed_layers`, `dense_bits`,
    `dense_group_size`, `dense_dtype`) or "mlx-affine" (a Bonsai MLX pack: `bits`,
    `group_size`; `format` follows from the bits).
    """

    path: Path
    method: str
    format: Any = None
    group_size: Any = None
    bits: Any = None
    packed_layers: Any = None
    dense_bits: Any = 16
    dense_group_size: Any = DENSE_GROUP_SIZE
    dense_dtype: Any = None


def read_quantization_config(folder: str | Path) -> QuantizationConfig | None:
    """The folder's quantization_config.json, or None for a dense folder (no such file)."""
    path = Path(folder) / QUANT_CONFIG
    if not path.is_file():
        return None
    cfg = read_json(path)
    if cfg.get("quant_method") == QUANT_METHOD:
        return QuantizationConfig(
            path, QUANT_METHOD, cfg.get("format"), cfg.get("group_size"),
            packed_layers=cfg.get("packed_layers"), dense_bits=cfg.get("dense_bits", 16),
            dense_group_size=cfg.get("dense_group_size", DENSE_GROUP_SIZE),
            dense_dtype=cfg.get("dense_dtype"),
        )
    if "bits" in cfg:
        bits = cfg["bits"]
        return QuantizationConfig(path, MLX_AFFINE, AFFINE_FORMATS.get(bits),
                                  cfg.get("group_size"), bits)
    raise BonsaiError(f"{path} is neither a bonsai-mlx nor a Bonsai MLX quantization config "
                      "(no 'quant_method': 'bonsai-mlx' and no 'bits')")


def packed_layout(folder: str | Path) -> str | None:
    """`"bonsai-mlx"` (ours), `"mlx-affine"` (a Bonsai MLX pack), or None (dense)."""
    quant = read_quantization_config(folder)
    return None if quant is None else quant.method


def _triples(weights: Mapping[str, mx.array], source: Path) -> list[str]:
    """Layer paths that are MLX affine triples, each checked complete."""
    layers = sorted(k.removesuffix(".scales") for k in weights if k.endswith(".scales"))
    for layer in layers:
        missing = [f"{layer}.{p}" for p in ("weight", "biases") if f"{layer}.{p}" not in weights]
        if missing:
            raise BonsaiError(f"{source}: {missing[0]} is missing (an MLX affine layer needs "
                              "weight, scales and biases); the file is incomplete")
    return layers


def apply_packed_layout(model: nn.Module, quant: QuantizationConfig,
                        weights: Mapping[str, mx.array], *,
                        affine_baseline: bool = False) -> dict[str, mx.array]:
    """Swap `model`'s layers (dense, freshly built) for the packed ones `quant` describes, in
    place, and return the checkpoint `weights` as the packed model loads them: a Bonsai
    pack's affine layers converted to our format exactly (every group checked), or kept as
    stock `nn.QuantizedLinear` with `affine_baseline`."""
    if quant.method == QUANT_METHOD:
        if affine_baseline:
            raise BonsaiError(f"{quant.path.parent} is in the bonsai-mlx layout, not MLX "
                              "affine; the affine baseline needs a Bonsai MLX pack")
        return _apply_ours(model, quant, weights)
    return _apply_affine(model, quant, weights, affine_baseline)


def _apply_ours(model: nn.Module, quant: QuantizationConfig,
                weights: Mapping[str, mx.array]) -> dict[str, mx.array]:
    fmt = formats.check_format(quant.format)
    if quant.group_size != formats.GROUP_SIZE:
        raise BonsaiError(f"{quant.path}: group_size {quant.group_size}, only "
                          f"{formats.GROUP_SIZE} is supported")
    paths = quant.packed_layers
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise BonsaiError(f"{quant.path}: 'packed_layers' must be a list of names")
    use_packed_layers(model, fmt, paths=paths)
    if fmt == "ternary":
        _check_trits(weights, paths, quant.path.parent)
    if quant.dense_bits == 8:
        quantize_dense_layers(model, 8, quant.dense_group_size)
    elif quant.dense_bits != 16:
        raise BonsaiError(f"{quant.path}: dense_bits {quant.dense_bits}; use 16 or 8")
    return dict(weights)


def _check_trits(weights: Mapping[str, mx.array], paths: list[str], folder: Path) -> None:
    """A ternary byte packs 5 base-3 digits, so it is < 243 (docs/formats.md); a larger one
    is corruption, which would decode to wrong weights without any error."""
    names = [f"{p}.weight" for p in paths if f"{p}.weight" in weights]
    maxima = [weights[n].max() for n in names]
    mx.eval(maxima)
    for name, top in zip(names, maxima, strict=True):
        if top.item() >= 243:
            raise BonsaiError(f"{folder}: {name} holds the byte {top.item()}, but ternary "
                              "bytes are < 243 (5 base-3 digits): the file is corrupt; "
                              "re-download or re-convert it")


def _apply_affine(model: nn.Module, quant: QuantizationConfig, weights: Mapping[str, mx.array],
                  affine_baseline: bool) -> dict[str, mx.array]:
    bits, group_size, folder = quant.bits, quant.group_size, quant.path.parent
    if bits not in AFFINE_FORMATS:
        raise BonsaiError(f"{quant.path}: bits {bits!r}; a Bonsai pack is 1-bit "
                          "(binary) or 2-bit (ternary)")
    if group_size != formats.GROUP_SIZE:
        raise BonsaiError(f"{quant.path}: group_size {group_size!r}, expected "
                          f"{formats.GROUP_SIZE}")
    out = dict(weights)
    for layer in _triples(weights, folder):
        wq, scales, biases = (out.pop(f"{layer}.{p}") for p in ("weight", "scales", "biases"))
        n, k = _bias_free_linear(model, layer, folder).weight.shape
        if wq.shape != (n, k * bits // 32):
            raise BonsaiError(f"{folder}: {layer}.weight is {tuple(wq.shape)}, the model's "
                              f"({n}, {k}) layer needs {(n, k * bits // 32)} at {bits} bits")
        if affine_baseline:
            new = nn.QuantizedLinear(k, n, bias=False, group_size=group_size, bits=bits)
            new.update({"weight": wq, "scales": scales, "biases": biases})
        else:
            cls = BinaryLinear if bits == 1 else TernaryLinear
            new = cls.from_affine(wq, scales, biases, group_size=group_size, name=layer)
        set_module(model, layer, new)
        out.update({f"{layer}.{p}": v for p, v in new.parameters().items()})
    return out


def _bias_free_linear(model: nn.Module, layer: str, folder: Path) -> nn.Linear:
    current = get_module(model, layer)
    if not isinstance(current, nn.Linear) or "bias" in current:
        raise BonsaiError(f"{folder}: {layer} is quantised in the file but is "
                          f"{type(current).__name__} in the model, not a bias-free Linear")
    return current


def load_packed_transformer_weights(model: nn.Module, folder: str | Path, *,
                                    affine_baseline: bool = False) -> nn.Module:
    """Load a packed transformer folder (ours or a Bonsai MLX pack, tensors named as the
    model's parameters) into a freshly built dense `model`, in place: packed layers are
    swapped in (`apply_packed_layout`) and every tensor is checked and loaded
    (`weights.load_into`). Returns the model."""
    quant = read_quantization_config(folder)
    if quant is None:
        raise BonsaiError(f"{folder} has no {QUANT_CONFIG}; it is not a packed transformer")
    weights = load_weights(folder, WEIGHTS_STEM)
    weights = apply_packed_layout(model, quant, weights, affine_baseline=affine_baseline)
    load_into(model, weights, folder)
    return model


def packed_quantization_config(model: nn.Module) -> dict:
    """The `quantization_config.json` describing a model whose layers are packed."""
    packed = [(p, m) for p, m in model.named_modules() if isinstance(m, tuple(
        PACKED_LINEAR.values()))]
    if not packed:
        raise BonsaiError("the model has no packed layers; run quantize_model first")
    fmts = {m.format for _, m in packed}
    if len(fmts) != 1:
        raise BonsaiError(f"the model mixes packed formats {sorted(fmts)}")
    affine = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    dense = [v.dtype for k, v in tree_flatten(model.parameters())
             if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(".scales")]
    dense_dtype = {mx.bfloat16: "bfloat16", mx.float16: "float16"}.get(
        dense[0] if dense else mx.bfloat16, "float32")
    cfg = {
        "quant_method": QUANT_METHOD,
        "format": fmts.pop(),
        "group_size": formats.GROUP_SIZE,
        "packed_layers": _canonical_order(model, [p for p, _ in packed]),
        "dense_dtype": dense_dtype,
        "dense_bits": 8 if affine else 16,
    }
    if affine:
        if {(m.bits, m.group_size) for m in affine} != {(8, affine[0].group_size)}:
            raise BonsaiError("the dense layers must all be MLX affine 8-bit with one group size")
        cfg["dense_group_size"] = affine[0].group_size
    return cfg


def _canonical_order(model: nn.Module, paths: list[str]) -> list[str]:
    """In the model's `packable_layers()` order (block by block), any other path after it."""
    try:
        order = {p: i for i, p in enumerate(packable_layers(model))}
    except BonsaiError:
        order = {}

    def key(path: str):
        return (order.get(path, len(order)), [(0, int(p)) if p.isdigit() else (1, p)
                                              for p in path.split(".")])

    return sorted(paths, key=key)


def save_packed_transformer_weights(model: nn.Module, folder: str | Path) -> dict:
    """Write `diffusion_pytorch_model.safetensors` and `quantization_config.json` of a
    packed model into `folder` (each file atomically; the caller writes config.json and
    makes the whole folder atomic). Returns the quantization config."""
    folder = Path(folder)
    cfg = packed_quantization_config(model)
    save_safetensors(folder / f"{WEIGHTS_STEM}.safetensors",
                     dict(tree_flatten(model.parameters())),
                     metadata={"format": "mlx", "bonsai_mlx_format": cfg["format"]})
    write_json(folder / QUANT_CONFIG, cfg)
    return cfg
