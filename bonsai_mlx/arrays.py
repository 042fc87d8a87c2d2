"""numpy <-> MLX, one way each. numpy has no bfloat16, so bfloat16 travels as float32."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np


def to_numpy(a: Any) -> np.ndarray:
    """An mx.array as numpy (bfloat16 as float32, exactly); anything else `np.asarray`."""
    if isinstance(a, mx.array):
        return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)
    return np.asarray(a)


def to_mx(a: Any, dtype: mx.Dtype) -> mx.array:
    """An mx.array, numpy array, list or scalar as an mx.array of `dtype` (numpy input goes
    through float32)."""
    if not isinstance(a, mx.array):
        a = mx.array(np.ascontiguousarray(a, dtype=np.float32))
    return a.astype(dtype)
