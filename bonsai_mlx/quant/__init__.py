"""Binary and ternary packed weights: formats, layers, swapping them into a model, and
packed transformer folders (which layers of FLUX.2 are packable is the transformer's to say)."""

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
    QuantizationConfig,
    apply_packed_layout,
    load_packed_transformer_weights,
    packed_layout,
    packed_quantization_config,
    read_quantization_config,
    save_packed_transformer_weights,
)
from bonsai_mlx.quant.model import (
    packable_layers,
    packed_format,
    quantize_dense_layers,
    quantize_model,
    use_packed_layers,
)

__all__ = [
    "FORMATS", "GROUP_SIZE", "PACKED_LINEAR",
    "BinaryLinear", "TernaryLinear", "QuantizationConfig",
    "binary_from_affine", "ternary_from_affine", "check_input_dims",
    "is_binary_valued", "is_ternary_valued",
    "pack_binary", "unpack_binary", "pack_ternary", "unpack_ternary",
    "quantize_binary", "quantize_ternary",
    "packable_layers", "packed_format", "quantize_model", "use_packed_layers",
    "quantize_dense_layers",
    "apply_packed_layout", "load_packed_transformer_weights", "packed_layout",
    "packed_quantization_config", "read_quantization_config",
    "save_packed_transformer_weights",
]
