"""LoRA adapters for the FLUX.2 transformer, unmerged over dense, 1-bit, ternary and MLX
affine layers: `files` reads the formats people publish and maps their names; `adapters`
applies, rescales, removes and (dense only) fuses them."""

from bonsai_mlx.lora.adapters import (
    Adapter,
    LoraInfo,
    LoRALinear,
    fuse_lora,
    linear_dims,
    load_lora,
    lora_infos,
    set_lora_scales,
    unload_lora,
)
from bonsai_mlx.lora.files import LoraFile, LoraLayer, lora_path, parse_lora, read_lora

__all__ = [
    "Adapter", "LoRALinear", "LoraFile", "LoraInfo", "LoraLayer",
    "fuse_lora", "linear_dims", "load_lora", "lora_infos", "lora_path", "parse_lora",
    "read_lora", "set_lora_scales", "unload_lora",
]
