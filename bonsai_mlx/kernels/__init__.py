"""Packed binary / ternary matmuls: raw packed arrays in, arrays out.

For now every call goes to the plain-MLX reference (`reference.py`); the dispatcher to the
Metal kernels replaces this body and keeps these names.
"""

from bonsai_mlx.kernels.reference import (
    binary_matmul,
    dequantize_binary,
    dequantize_ternary,
    ternary_matmul,
)

__all__ = ["binary_matmul", "dequantize_binary", "dequantize_ternary", "ternary_matmul"]
