"""Swapping a model's layers for packed ones, by path.

Works on any `nn.Module`. The layers to pack are given as paths (`transformer_blocks.0.attn.to_q`,
...); by default a model's own `packable_layers()` (Flux2Transformer lists its 100 big
linears), so no model's layer names are written here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.quant import formats
from bonsai_mlx.quant.layers import PACKED_LINEAR

import mlx.nn as nn

DENSE_GROUP_SIZE = 64  # MLX affine 8-bit group for the layers that stay dense (dense_bits 8)


def packable_layers(model: nn.Module, paths: Sequence[str] | None = None) -> list[str]:
    """`paths` if given, else the layers the model lists as packable (`packable_layers()`)."""
    if paths is not None:
        return list(paths)
    listed = getattr(model, "packable_layers", None)
    if not callable(listed):
        raise BonsaiError(f"{type(model).__name__} does not list its packable layers "
                          "(packable_layers()); pass the layer paths explicitly")
    return list(listed())


def packed_format(model: nn.Module) -> str:
    """What a loaded model's linear layers are: "binary" or "ternary" (packed), else
    "mlx-affine" (stock `nn.QuantizedLinear`), else "dense" (whatever folder they came from)."""
    kinds = {type(m) for _, m in model.named_modules()}
    for name, cls in (*PACKED_LINEAR.items(), ("mlx-affine", nn.QuantizedLinear)):
        if cls in kinds:
            return name
    return "dense"


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at a dotted path (`a.b.0.c`), or BonsaiError naming the path."""
    m = model
    for part in path.split("."):
        try:
            m = m[int(part)] if isinstance(m, list) else getattr(m, part)
        except (AttributeError, IndexError, ValueError, KeyError):
            raise BonsaiError(f"the model has no layer {path!r} (no {part!r})") from None
    return m


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the sub-module at a dotted path."""
    parent_path, _, last = path.rpartition(".")
    parent = get_module(model, parent_path) if parent_path else model
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        setattr(parent, last, module)


def _linear(model: nn.Module, path: str) -> nn.Linear:
    m = get_module(model, path)
    if not isinstance(m, nn.Linear) or "bias" in m:
        raise BonsaiError(f"{path} is {type(m).__name__}"
                          f"{' with a bias' if 'bias' in m else ''}, not a bias-free nn.Linear")
    return m


def quantize_model(model: nn.Module, fmt: str, *, paths: Sequence[str] | None = None,
                   lossless: bool | None = None) -> bool:
    """Replace the packable layers' dense `nn.Linear`s (`paths`, default the model's
    `packable_layers()`) by BinaryLinear/TernaryLinear, in place.

    Each layer is packed exactly when its weight already takes the format's values per
    group (a Bonsai `*-unpacked` checkpoint), otherwise by absmean post-training
    quantisation, with a warning. `lossless=True` makes the latter an error. Returns
    whether every layer was packed exactly.
    """
    cls = PACKED_LINEAR[formats.check_format(fmt)]
    is_exact = formats.is_binary_valued if fmt == "binary" else formats.is_ternary_valued
    lossy = []
    for path in packable_layers(model, paths):
        w = _linear(model, path).weight
        formats.check_input_dims(w.shape[1], path)
        exact = is_exact(w)
        if lossless and not exact:
            raise BonsaiError(f"{path}: weights are not {fmt}-valued per group of "
                              f"{formats.GROUP_SIZE}; cannot pack them losslessly")
        if not exact:
            lossy.append(path)
        set_module(model, path, cls.from_weight(w, lossless=exact, name=path))
    if lossy:
        warnings.warn(
            f"{len(lossy)} layers are not {fmt}-valued and were quantised post-training "
            f"(absmean), e.g. {lossy[0]}; a model not trained for {fmt} weights loses "
            "quality this way", stacklevel=2)
    return not lossy


def use_packed_layers(model: nn.Module, fmt: str, *,
                      paths: Sequence[str] | None = None) -> nn.Module:
    """Replace the packed layers by empty BinaryLinear/TernaryLinear (same in/out sizes),
    ready for `model.load_weights` of a packed file. In place; returns the model."""
    cls = PACKED_LINEAR[formats.check_format(fmt)]
    for path in packable_layers(model, paths):
        n, k = _linear(model, path).weight.shape
        formats.check_input_dims(k, path)
        set_module(model, path, cls(k, n))
    return model


def quantize_dense_layers(model: nn.Module, bits: int = 8,
                          group_size: int = DENSE_GROUP_SIZE) -> nn.Module:
    """MLX affine quantisation (stock `nn.QuantizedLinear`) of every remaining nn.Linear:
    the `dense_bits: 8` option for the ~195 M parameters that are not packed."""
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda _, m: isinstance(m, nn.Linear)
                and m.weight.shape[-1] % group_size == 0)
    return model
