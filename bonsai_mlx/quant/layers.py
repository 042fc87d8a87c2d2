"""`BinaryLinear` and `TernaryLinear`: bias-free drop-ins for `nn.Linear` on packed weights.

Parameters (the names a packed safetensors file uses): `weight` (packed) and `scales`
(float16, one per group of 128 inputs). The matmul goes through `bonsai_mlx.kernels`,
which picks the Metal kernel or the plain-MLX reference.
"""

from __future__ import annotations

from bonsai_mlx import kernels
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.quant import formats
from bonsai_mlx.quant.formats import GROUP_SIZE, Array

import mlx.core as mx
import mlx.nn as nn


class _PackedLinear(nn.Module):
    format: str

    def __init__(self, input_dims: int, output_dims: int):
        super().__init__()
        formats.check_input_dims(input_dims)
        self.input_dims = input_dims
        self.output_dims = output_dims
        self.weight = mx.zeros((output_dims, self._packed_width(input_dims)), self._packed_dtype)
        self.scales = mx.zeros((output_dims, input_dims // GROUP_SIZE), mx.float16)
        self.freeze()  # packed integers are not trainable

    def _extra_repr(self) -> str:
        return f"input_dims={self.input_dims}, output_dims={self.output_dims}"

    def _scales16(self) -> mx.array:
        # A model-wide set_dtype() also casts these; the format fixes them at float16.
        s = self.scales
        return s if s.dtype == mx.float16 else s.astype(mx.float16)

    @classmethod
    def _from_packed(cls, packed, scales):
        n = packed.shape[0]
        layer = cls(scales.shape[1] * GROUP_SIZE, n)
        layer.weight = mx.array(packed)
        layer.scales = mx.array(scales)
        if layer.weight.shape != (n, cls._packed_width(layer.input_dims)):
            raise ValueError(f"packed weight {layer.weight.shape} does not match scales")
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, lossless: bool | None = None,
                    name: str = "weight"):
        """Quantise a bias-free `nn.Linear` (see `from_weight`)."""
        if "bias" in linear:
            raise BonsaiError(f"{name}: packed layers have no bias; this Linear has one")
        return cls.from_weight(linear.weight, lossless=lossless, name=name)


class BinaryLinear(_PackedLinear):
    """y = x @ W.T with W = s * (+-1): `weight` uint32 (N, K/32), `scales` float16 (N, K/128)."""

    format = "binary"
    _packed_dtype = mx.uint32

    @staticmethod
    def _packed_width(k: int) -> int:
        return k // 32

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.binary_matmul(x, self.weight, self._scales16())

    def dequantize(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The dense (N, K) weight this layer multiplies by."""
        return kernels.dequantize_binary(self.weight, self._scales16(), dtype)

    @classmethod
    def from_weight(cls, weight: Array, *, lossless: bool | None = None,
                    name: str = "weight") -> BinaryLinear:
        """Dense (N, K) weight -> layer; exact when it is binary per group, else absmean."""
        return cls._from_packed(*formats.quantize_binary(weight, lossless=lossless, name=name))

    @classmethod
    def from_affine(cls, weight: Array, scales: Array, biases: Array, *,
                    group_size: int = GROUP_SIZE, name: str = "weight") -> BinaryLinear:
        """An MLX affine 1-bit triple (a Bonsai 1-bit layer) -> layer, exactly."""
        return cls._from_packed(*formats.binary_from_affine(
            weight, scales, biases, group_size=group_size, name=name))


class TernaryLinear(_PackedLinear):
    """y = x @ W.T with W = s * {-1, 0, +1}: `weight` uint8 (N, ceil(K/5)), `scales` float16."""

    format = "ternary"
    _packed_dtype = mx.uint8

    @staticmethod
    def _packed_width(k: int) -> int:
        return -(-k // 5)

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.ternary_matmul(x, self.weight, self._scales16())

    def dequantize(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        """The dense (N, K) weight this layer multiplies by."""
        return kernels.dequantize_ternary(self.weight, self._scales16(), self.input_dims, dtype)

    @classmethod
    def from_weight(cls, weight: Array, *, lossless: bool | None = None,
                    name: str = "weight") -> TernaryLinear:
        """Dense (N, K) weight -> layer; exact when it is ternary per group, else absmean."""
        return cls._from_packed(*formats.quantize_ternary(weight, lossless=lossless, name=name))

    @classmethod
    def from_affine(cls, weight: Array, scales: Array, biases: Array, *,
                    group_size: int = GROUP_SIZE, name: str = "weight") -> TernaryLinear:
        """An MLX affine 2-bit triple (a Bonsai ternary layer) -> layer, after checking it."""
        return cls._from_packed(*formats.ternary_from_affine(
            weight, scales, biases, group_size=group_size, name=name))


PACKED_LINEAR = {"binary": BinaryLinear, "ternary": TernaryLinear}
