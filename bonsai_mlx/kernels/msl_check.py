"""MSL front-end check: our kernels as `mx.fast.metal_kernel` builds them, through clang.

The source is exactly the one MLX compiles (header, generated signature with its `device` /
`constant` parameters, body, template instantiation; `emulator.MetalKernelEmulator` writes it
as MLX does, see ../shared/spec/metal-kernel-abi.md), with `msl_stub.h` standing in for
`<metal_stdlib>` and MLX's utils header. clang checks it in syntax-only mode with Metal's
address spaces as real address spaces, so the mistakes the emulator cannot see (it erases
address spaces) fail here: a `constant` buffer passed where `device` is expected, a threadgroup
array passed as `device`, a `simdgroup_matrix<float>` loaded from a `threadgroup half*`.

Two rewrites make MSL valid C++ without changing what is checked: `threadgroup` variables
declared in a kernel body become `static` (C++ has no address-space-qualified locals; Metal
gives them threadgroup storage), and the `[[host_name]] [[kernel]]` attributes of the explicit
instantiation are dropped (C++ does not allow attributes there).

This is a front-end check only: not Apple's compiler, no code generation, and only what the
stub declares. docs/kernels.md says what it does and does not catch.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from bonsai_mlx.kernels import emulator, metal

import mlx.core as mx

STUB_HEADER = Path(__file__).with_name("msl_stub.h")
CLANG_FLAGS = [
    "-x", "c++", "-std=c++17", "--target=aarch64-linux-gnu", "-march=armv8.6-a+bf16",
    "-fsyntax-only", "-Wno-unknown-attributes", "-ferror-limit=20", "-fno-color-diagnostics",
]
_INSTANTIATION_ATTRIBUTES = re.compile(r"^template\s+\[\[host_name\([^)]*\)\]\]\s+\[\[kernel\]\]",
                                       re.MULTILINE)


class MSLCheckError(RuntimeError):
    """clang's front end rejected a kernel source (its diagnostics are the message)."""


def clang() -> str | None:
    """The clang used for the check ($BONSAI_CLANG, else clang++ / clang), or None."""
    for name in (os.environ.get("BONSAI_CLANG"), "clang++", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def generated_source(launch: metal.Launch, spec: dict | None = None) -> str:
    """The source `mx.fast.metal_kernel` compiles for `launch` (MLX's utils header aside).
    `spec` (name, input_names, output_names, source, header) defaults to the kernel's own."""
    spec = spec or metal.kernel_spec(launch.kernel)
    kernel = emulator.MetalKernelEmulator(**spec)
    arrays = [emulator._to_numpy(x) for x in launch.inputs]
    in_dtypes = [x.dtype for x in launch.inputs]
    template = list(launch.template)
    name = kernel.kernel_name(arrays, in_dtypes, list(launch.output_dtypes), template)
    return kernel.generate_source(name, arrays, in_dtypes, list(launch.output_dtypes), template)


def for_clang(source: str) -> str:
    """`source` as a C++ translation unit against the stub (the two rewrites above)."""
    source = emulator.THREADGROUP_DECLARATION.sub(lambda m: "static " + m[0], source)
    source = _INSTANTIATION_ATTRIBUTES.sub("template", source)
    return f'#include "{STUB_HEADER.name}"\n{source}'


def check_source(source: str, name: str = "kernel") -> None:
    """Raise MSLCheckError with clang's diagnostics if `source` does not pass the front end."""
    cc = clang()
    if cc is None:
        raise MSLCheckError("the MSL check needs clang: install it (apt-get install clang)")
    proc = subprocess.run([cc, *CLANG_FLAGS, f"-I{STUB_HEADER.parent}", "-"],
                          input=for_clang(source), capture_output=True, text=True)
    if proc.returncode != 0:
        raise MSLCheckError(f"{name}: clang rejects the generated Metal source:\n"
                            f"{proc.stderr.strip()[-6000:]}")


def kernel_launches(dtype: mx.Dtype) -> dict[str, list[metal.Launch]]:
    """Every instantiation of every kernel x format at `dtype`, with arrays shaped as in real
    use, grouped per kernel and format ("gemv/binary": M = 1 .. 8; "gemm/...": BM = 64 and
    the narrow 32; "dequantize/...")."""
    n, k = 64, 256
    launches = {}
    for fmt, packed in (("binary", mx.zeros((n, k // 32), mx.uint32)),
                        ("ternary", mx.zeros((n, -(-k // 5)), mx.uint8))):
        scales = mx.zeros((n, k // 128), mx.float16)
        launches[f"gemv/{fmt}"] = [metal.matmul_launch(mx.zeros((m, k), dtype), packed, scales,
                                                       "gemv")
                                   for m in range(1, metal.GEMV_MAX_M + 1)]
        launches[f"gemm/{fmt}"] = [metal.matmul_launch(mx.zeros((m, k), dtype), packed, scales,
                                                       "gemm")
                                   for m in (metal.GEMM_BM, metal.GEMM_BM_NARROW)]
        launches[f"dequantize/{fmt}"] = [metal.dequantize_launch(packed, scales, dtype, k)]
    return launches


def unit_source(launches: list[metal.Launch], spec: dict | None = None) -> str:
    """One translation unit with every launch's kernel (instantiations of one kernel: the
    shared header once, then each generated kernel, whose names differ by template values)."""
    spec = spec or metal.kernel_spec(launches[0].kernel)
    sources = [generated_source(launch, spec) for launch in launches]
    return sources[0] + "".join(s.removeprefix(spec["header"]) for s in sources[1:])
