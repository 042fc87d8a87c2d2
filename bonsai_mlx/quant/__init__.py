"""Binary and ternary packed weights: formats, layers, and which layers of FLUX.2 are packed."""

from bonsai_mlx.quant.formats import (
    FORMATS,
    GROUP_SIZE,
    binary_from_affine,
    check_input_dims,
    is_binary_valued,
    is_ternary_valued,
    pack_binary,
    pack_ternary,
    quantize_binary,
    quantize_ternary,
    ternary_from_affine,
    unpack_binary,
    unpack_ternary,
)
from bonsai_mlx.quant.layers import PACKED_LINEAR, BinaryLinear, TernaryLinear
from bonsai_mlx.quant.loading import (
    load_packed_transformer_weights,
    packed_layout,
    packed_quantization_config,
    prepare_packed_transformer,
    save_packed_transformer_weights,
)
from bonsai_mlx.quant.model import (
    PACKED_LAYERS,
    model_packed_layer_paths,
    packed_layer_paths,
    quantize_dense_layers,
    quantize_model,
    use_packed_layers,
)

__all__ = [
    "FORMATS", "GROUP_SIZE", "PACKED_LAYERS", "PACKED_LINEAR",
    "BinaryLinear", "TernaryLinear",
    "binary_from_affine", "ternary_from_affine", "check_input_dims",
    "is_binary_valued", "is_ternary_valued",
    "pack_binary", "unpack_binary", "pack_ternary", "unpack_ternary",
    "quantize_binary", "quantize_ternary",
    "model_packed_layer_paths", "packed_layer_paths",
    "quantize_model", "use_packed_layers", "quantize_dense_layers",
    "load_packed_transformer_weights", "prepare_packed_transformer", "packed_layout",
    "packed_quantization_config", "save_packed_transformer_weights",
]
