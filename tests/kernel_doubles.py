"""Test doubles for `mx.fast.metal_kernel`, built on the CPU emulator: a Metal device where
every kernel works (`emulated`), or where one kernel fails to compile, returns garbage or NaN,
or aborts the process the way a GPU fault does. Installed with
`bonsai_mlx.kernels.device.use(Device(...))`; a child process (isolated self-checks) imports
them by name, e.g. "kernel_doubles:gemm_compile_error"."""

from __future__ import annotations

import os

from bonsai_mlx.kernels import emulator

import mlx.core as mx

CALLS: dict[str, int] = {}  # kernel name -> launches through a double, this process


class _Double:
    def __init__(self, inner, mode: str | None):
        self.inner, self.mode = inner, mode

    def __call__(self, **kwargs):
        CALLS[self.inner.name] = CALLS.get(self.inner.name, 0) + 1
        if self.mode is None:
            return self.inner(**kwargs)
        if self.mode == "compile":  # what MLX raises when the Metal compiler rejects a source
            raise RuntimeError(
                "[metal::Device] Unable to build metal library from source\n"
                "program_source:87:13: error: no matching function for call to 'gemv_unit'")
        if self.mode == "abort":
            os.abort()  # as an uncaught exception in a Metal completion handler does
        outputs = self.inner(**kwargs)
        if self.mode == "garbage":
            return [mx.full(o.shape, 3.0, o.dtype) for o in outputs]
        nan = mx.array(float("nan"), dtype=outputs[0].dtype)
        return [mx.where(mx.arange(o.size).reshape(o.shape) % 2 == 0, o, nan) for o in outputs]


def _with_broken(attribute: str, kernel_name: str, mode: str):
    def factory(name, input_names, output_names, source, header="", **kwargs):
        inner = emulator.metal_kernel(name, input_names, output_names, source, header, **kwargs)
        return _Double(inner, mode if name == kernel_name else None)

    factory.__qualname__ = attribute  # so that "kernel_doubles:<attribute>" names it
    return factory


emulated = emulator.metal_kernel
gemm_compile_error = _with_broken("gemm_compile_error", "bonsai_packed_gemm", "compile")
gemm_garbage = _with_broken("gemm_garbage", "bonsai_packed_gemm", "garbage")
gemm_nan = _with_broken("gemm_nan", "bonsai_packed_gemm", "nan")
dequantize_compile_error = _with_broken("dequantize_compile_error", "bonsai_dequantize",
                                        "compile")
gemv_aborts = _with_broken("gemv_aborts", "bonsai_packed_gemv", "abort")
