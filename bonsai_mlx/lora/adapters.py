"""LoRA adapters applied to a model's linear layers, unmerged.

Each targeted layer becomes a `LoRALinear` around the original layer (dense `nn.Linear`,
`BinaryLinear`, `TernaryLinear` or MLX affine `nn.QuantizedLinear`):

    y = base(x) + sum_i scale_i * scaling_i * B_i (A_i x)

so a 1-bit or ternary transformer stays packed: an adapter costs rank x (in + out) values
per layer, kept in the model's compute dtype. A file may target part of a fused layer (a
single block's q, k, v or MLP rows of `to_qkv_mlp_proj`): that adapter adds to those rows
only. Several named adapters can be loaded at once, rescaled and removed without reloading
the model; removing the last one puts the original layer object back, bit for bit.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx import checks
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.lora.files import SINGLE_BLOCK_PARTS, LoraFile, read_lora
from bonsai_mlx.quant.layers import PACKED_LINEAR
from bonsai_mlx.quant.model import get_module, set_module

import mlx.core as mx
import mlx.nn as nn

_SERIAL = itertools.count()


class Adapter(nn.Module):
    """One low-rank branch: `scale * scaling * B (A x)`, added to rows [row_start, row_stop)
    of the layer's output (all rows when row_start is None)."""

    def __init__(self, down: mx.array, up: mx.array, scaling: float,
                 rows: tuple[int, int] | None, source: str, fmt: str):
        super().__init__()
        self.lora_A = down  # (rank, in)
        self.lora_B = up  # (out or rows, rank)
        self.scaling = scaling  # alpha / rank, from the file
        self.scale = 1.0  # the user's
        self.row_start, self.row_stop = rows if rows is not None else (None, None)
        self.source, self.format = source, fmt
        self.serial = next(_SERIAL)  # load order, for listing

    def add_to(self, y: mx.array, x: mx.array) -> mx.array:
        # as PEFT: lora_B(lora_A(x)) * scaling, then added
        delta = (x @ self.lora_A.T) @ self.lora_B.T * (self.scale * self.scaling)
        if self.row_start is None:
            return y + delta
        return y.at[..., self.row_start:self.row_stop].add(delta)

    def delta_weight(self) -> mx.array:
        """scale * scaling * B @ A in float32, (rows, in)."""
        a, b = self.lora_A.astype(mx.float32), self.lora_B.astype(mx.float32)
        return (self.scale * self.scaling) * (b @ a)


class LoRALinear(nn.Module):
    """A linear layer plus named LoRA adapters; `base` is the original layer, unchanged."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters: dict[str, list[Adapter]] = {}

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for pieces in self.adapters.values():
            for adapter in pieces:
                if adapter.scale != 0:  # scale 0 is exactly the base layer
                    y = adapter.add_to(y, x)
        return y


@dataclass
class LoraInfo:
    """A loaded adapter, as `Pipeline.loras` reports it."""

    name: str
    source: str
    format: str
    scale: float
    ranks: list[int]  # the distinct ranks of its layers
    layers: int  # layers it changes
    parameters: int
    bytes: int  # memory of its A and B arrays (shared arrays counted once)


# ---- dimensions of the layers an adapter can wrap ---------------------------------------


def linear_dims(layer: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear layer of any kind we run; None for anything else."""
    if isinstance(layer, LoRALinear):
        layer = layer.base
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[0], layer.scales.shape[1] * layer.group_size
    if isinstance(layer, tuple(PACKED_LINEAR.values())):
        return layer.output_dims, layer.input_dims
    if isinstance(layer, nn.Linear):
        return tuple(layer.weight.shape)
    return None


def _find(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_module(model, path)
    except BonsaiError:
        return None


def resolve_target(model: nn.Module, module: str) -> tuple[str, tuple[int, int] | None] | None:
    """A file's diffusers module name -> (layer path in `model`, output rows or None), or
    None when the model has no such layer. A single block's q, k, v and MLP parts are rows
    of its fused `to_qkv_mlp_proj`: [q | k | v | mlp], mlp = 2 x the attention's mlp_hidden."""
    layer = _find(model, module)
    if layer is not None:
        return (module, None) if linear_dims(layer) is not None else None
    m = re.fullmatch(r"(single_transformer_blocks\.\d+)\.(.+)", module)
    if m is None or m.group(2) not in SINGLE_BLOCK_PARTS:
        return None
    fused_path = f"{m.group(1)}.attn.to_qkv_mlp_proj"
    attn, fused = _find(model, f"{m.group(1)}.attn"), _find(model, fused_path)
    if fused is None or linear_dims(fused) is None or not hasattr(attn, "mlp_hidden"):
        return None
    mlp = 2 * attn.mlp_hidden
    dim = (linear_dims(fused)[0] - mlp) // 3
    start = SINGLE_BLOCK_PARTS.index(m.group(2)) * dim
    return fused_path, (start, start + (mlp if m.group(2) == "attn.proj_mlp" else dim))


# ---- loading, scales, unloading ---------------------------------------------------------


def load_lora(model: nn.Module, source: str | Path | LoraFile, *, scale: float = 1.0,
              name: str | None = None, weight_name: str | None = None,
              revision: str | None = None, ignore_unmatched: bool = False) -> str:
    """Add a LoRA's adapters to `model` (in place) and return the adapter's name.

    `source`: a .safetensors file, a folder, a Hugging Face repo id, or a `LoraFile`. The
    name defaults to the file's stem (numbered if taken). Layers the model lacks are an
    error listing them, or skipped with a warning when `ignore_unmatched`; text-encoder
    tensors are skipped with a warning. Nothing changes unless the whole file fits.
    """
    lora = source if isinstance(source, LoraFile) else read_lora(source, weight_name, revision)
    name = _new_name(model, name, lora.name)
    _check_scale(name, scale)
    plan = _plan(model, lora, ignore_unmatched)
    if lora.text_encoder_keys:
        warnings.warn(f"{lora.source}: {len(lora.text_encoder_keys)} text-encoder tensors "
                      f"(e.g. {lora.text_encoder_keys[0]}) are ignored; FLUX.2 LoRAs apply "
                      "to the transformer only", stacklevel=2)
    dtype = getattr(model, "dtype", mx.float32)
    cast: dict[int, mx.array] = {}  # a fused qkv's A is shared by q, k and v: cast it once

    def as_dtype(a: mx.array) -> mx.array:
        return cast.setdefault(id(a), a.astype(dtype))

    for path, rows, layer in plan:
        wrapper = get_module(model, path)
        if not isinstance(wrapper, LoRALinear):
            wrapper = LoRALinear(wrapper)
            set_module(model, path, wrapper)
        adapter = Adapter(as_dtype(layer.down), as_dtype(layer.up), layer.scaling, rows,
                          lora.source, lora.format)
        adapter.scale = float(scale)
        wrapper.adapters.setdefault(name, []).append(adapter)
    mx.eval(list(cast.values()))
    _changed(model)
    return name


def _changed(model: nn.Module) -> None:
    """Mark `model`'s layers as changed (`adapters_version`): memoised outputs of a layer
    (the transformer's text projections within one generation) are computed again."""
    model.adapters_version = getattr(model, "adapters_version", 0) + 1


def _new_name(model: nn.Module, name: str | None, default: str) -> str:
    taken = set(lora_infos(model))
    if name is not None:
        if not isinstance(name, str) or not name:
            raise BonsaiError(f"a LoRA name must be a non-empty string, not {name!r}")
        if name in taken:
            raise BonsaiError(f"a LoRA named {name!r} is already loaded; choose another name "
                              "or unload it first")
        return name
    name, i = default, 1
    while name in taken:
        i += 1
        name = f"{default}-{i}"
    return name


def _check_scale(name: str, scale) -> None:
    """A finite real number (numpy's too; not a bool)."""
    checks.number(scale, f"LoRA {name!r}: scale")


def _plan(model, lora: LoraFile, ignore_unmatched: bool):
    """[(layer path, rows, LoraLayer)] after checking every name and shape."""
    plan, unmatched, misshaped = [], list(lora.unknown_keys), []
    for layer in lora.layers:
        target = resolve_target(model, layer.module)
        if target is None:
            unmatched.append(f"{layer.key} ({layer.module})" if layer.key != layer.module
                             else layer.key)
            continue
        path, rows = target
        out, k = linear_dims(get_module(model, path))
        want_out = out if rows is None else rows[1] - rows[0]
        if layer.down.shape[1] != k or layer.up.shape[0] != want_out:
            misshaped.append(f"{layer.key}: A {tuple(layer.down.shape)}, B "
                             f"{tuple(layer.up.shape)}; {layer.module} needs A (r, {k}), "
                             f"B ({want_out}, r)")
            continue
        plan.append((path, rows, layer))
    if misshaped:
        raise BonsaiError(f"{lora.source} does not fit this model ({len(misshaped)} layers): "
                          + "; ".join(misshaped[:10]))
    if unmatched:
        unmatched = sorted(set(unmatched))
        shown = ", ".join(unmatched[:20]) + (f" ... and {len(unmatched) - 20} more"
                                             if len(unmatched) > 20 else "")
        if not ignore_unmatched:
            raise BonsaiError(f"{lora.source}: {len(unmatched)} LoRA layers match no layer of "
                              f"this model: {shown}; is it a FLUX.2 [klein] LoRA of this "
                              "size? (ignore_unmatched=True / --lora-ignore-unmatched skips "
                              "them)")
        warnings.warn(f"{lora.source}: skipped {len(unmatched)} LoRA layers that match no "
                      f"layer: {shown}", stacklevel=3)
    if not plan:
        raise BonsaiError(f"{lora.source} changes no layer of this model")
    return plan


def _wrappers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, LoRALinear)]


def _check_names(model: nn.Module, names) -> None:
    loaded = lora_infos(model)
    unknown = [n for n in names if n not in loaded]
    if unknown:
        raise BonsaiError(f"no LoRA named {unknown[0]!r} is loaded; loaded: "
                          f"{', '.join(loaded) or 'none'}")


def set_lora_scales(model: nn.Module, scales: Mapping[str, float]) -> None:
    """Change the scale of loaded adapters by name; 0 turns one off exactly."""
    if not isinstance(scales, Mapping):
        raise BonsaiError(f"LoRA scales must be a mapping {{name: scale}}, not {scales!r}")
    _check_names(model, scales)
    for name, scale in scales.items():
        _check_scale(name, scale)
    for _, wrapper in _wrappers(model):
        for name, scale in scales.items():
            for adapter in wrapper.adapters.get(name, []):
                adapter.scale = float(scale)
    _changed(model)


def unload_lora(model: nn.Module, name: str | None = None) -> None:
    """Remove one adapter by name, or all (None); a layer left with none gets its original
    layer object back."""
    if name is not None:
        _check_names(model, [name])
    for path, wrapper in _wrappers(model):
        if name is None:
            wrapper.adapters.clear()
        else:
            wrapper.adapters.pop(name, None)
        if not wrapper.adapters:
            set_module(model, path, wrapper.base)
    _changed(model)


def fuse_lora(model: nn.Module) -> list[str]:
    """Merge every loaded adapter, at its current scale, into the dense weights and drop
    the branches (permanent: reload the model to remove them). Dense `nn.Linear` layers
    only: 1-bit, ternary or quantised weights cannot hold a low-rank update, so a packed
    model refuses. Returns the merged adapters' names."""
    wrappers = _wrappers(model)
    for path, wrapper in wrappers:
        base = wrapper.base
        if not isinstance(base, nn.Linear) or isinstance(base, nn.QuantizedLinear):
            raise BonsaiError(
                f"cannot fuse LoRA adapters into {path} ({type(base).__name__}): merging a "
                "low-rank update into 1-bit, ternary or quantised weights destroys it; keep "
                "the adapters unmerged (they already are) or fuse into a dense model")
    names = list(lora_infos(model))
    for path, wrapper in wrappers:
        w = wrapper.base.weight.astype(mx.float32)
        for pieces in wrapper.adapters.values():
            for a in pieces:
                rows = slice(None) if a.row_start is None else slice(a.row_start, a.row_stop)
                w = w.at[rows].add(a.delta_weight())
        wrapper.base.weight = w.astype(wrapper.base.weight.dtype)
        mx.eval(wrapper.base.weight)
        set_module(model, path, wrapper.base)
    _changed(model)
    return names


def lora_infos(model: nn.Module) -> dict[str, LoraInfo]:
    """The loaded adapters by name, in load order: scale, ranks, layers, memory."""
    pieces: dict[str, list[Adapter]] = {}
    layers: dict[str, int] = {}
    for _, wrapper in _wrappers(model):
        for name, adapters in wrapper.adapters.items():
            pieces.setdefault(name, []).extend(adapters)
            layers[name] = layers.get(name, 0) + 1
    out = {}
    for name in sorted(pieces, key=lambda n: min(a.serial for a in pieces[n])):
        arrays = {id(x): x for a in pieces[name] for x in (a.lora_A, a.lora_B)}.values()
        first = pieces[name][0]
        out[name] = LoraInfo(
            name, first.source, first.format, first.scale,
            ranks=sorted({int(a.lora_A.shape[0]) for a in pieces[name]}), layers=layers[name],
            parameters=sum(x.size for x in arrays), bytes=sum(x.nbytes for x in arrays))
    return out
