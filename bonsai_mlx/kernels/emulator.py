"""Run `mx.fast.metal_kernel` sources on the CPU, for machines without an Apple GPU.

`metal_kernel(...)` takes exactly the arguments of `mx.fast.metal_kernel` and returns a
callable with the same call arguments. It writes the kernel source the way MLX does
(signature, `<name>_shape/_strides/_ndim` parameters, thread attributes, template
instantiation), compiles it as C++20 with g++ against `metal_shim.h`, and runs every
threadgroup as fibers, one per Metal thread, switching at `threadgroup_barrier` and at
SIMD-group operations so that barriers and `simd_*` / `simdgroup_matrix` functions behave as
on the GPU. Threadgroup memory is poisoned with NaN bytes for every threadgroup and outputs
without `init_value` start as NaN bytes, so reads of unwritten memory show up in results.

The supported MSL subset is listed in docs/emulator.md.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bonsai_mlx.kernels import device, guarded

import mlx.core as mx
import numpy as np

SHIM_HEADER = Path(__file__).with_name("metal_shim.h")
CXX_FLAGS = ["-O2", "-std=c++20", "-shared", "-fPIC", "-Wno-attributes", "-fno-strict-aliasing"]
PATTERN_INIT = "-ftrivial-auto-var-init=pattern"
MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes inputs with fewer elements in `constant` memory
MAX_THREADS_PER_THREADGROUP = 1024

# As MLX's get_type_string spells them.
TYPE_STRINGS = {
    mx.bool_: "bool",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
}
NUMPY_STORAGE = {
    mx.bool_: np.bool_,
    mx.uint8: np.uint8,
    mx.uint16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
    mx.int8: np.int8,
    mx.int16: np.int16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # raw bits
    mx.float32: np.float32,
}
FROM_NUMPY = {np.dtype(v): k for k, v in NUMPY_STORAGE.items() if k != mx.bfloat16}

# (attribute, type) in the order MLX adds them to the signature.
METAL_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

# `threadgroup T name[..]..;` declarations in a kernel body. They become references into the
# per-threadgroup arena, so all fibers of a threadgroup share them.
THREADGROUP_DECLARATION = re.compile(
    r"\bthreadgroup\s+(?P<type>[A-Za-z_][\w:]*(?:\s*<[^;{}]*?>)?)\s+(?P<name>[A-Za-z_]\w*)"
    r"\s*(?P<dims>(?:\[[^\]]*\]\s*)*);"
)
_METAL_INCLUDE = re.compile(r"^\s*#\s*include\s*<metal_\w+>.*$", re.MULTILINE)

_LOCK = threading.Lock()
_LIBRARIES: dict[str, ctypes.CDLL] = {}


class EmulatorError(RuntimeError):
    """The emulator could not compile or run a kernel (compiler error, deadlock, ...)."""


def compiler() -> str | None:
    """The C++ compiler the emulator uses (env CXX, else g++), or None if there is none."""
    cxx = os.environ.get("CXX", "g++")
    return shutil.which(cxx)


SCHEDULES = {"simdgroups": 0, "reverse": 1, "round-robin": 2}


def schedule() -> int:
    """Fiber schedule from BONSAI_EMULATOR_SCHEDULE: simdgroups (default), reverse, round-robin.

    Every order is a legal GPU execution; a correct kernel gives the same result under each.
    """
    name = os.environ.get("BONSAI_EMULATOR_SCHEDULE", "simdgroups")
    if name not in SCHEDULES:
        raise ValueError(f"BONSAI_EMULATOR_SCHEDULE={name!r} is not one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def cache_dir() -> Path:
    """Compiled kernels: $BONSAI_EMULATOR_CACHE, else ~/.cache/bonsai-mlx/emulator."""
    return device.cache_folder("emulator", "BONSAI_EMULATOR_CACHE")


@functools.cache
def cxx_flags(cxx: str) -> tuple[str, ...]:
    """CXX_FLAGS, plus `-ftrivial-auto-var-init=pattern` where the compiler has it (g++ >= 12,
    clang >= 8): uninitialised locals then hold a non-zero pattern (g++: 0xFE bytes, clang:
    0xFF / 0xAA), so a kernel reading one gives a wrong result instead of an accidental 0."""
    probe = subprocess.run([cxx, PATTERN_INIT, "-x", "c++", "-fsyntax-only", "-"], input="",
                           capture_output=True, text=True)
    return (*CXX_FLAGS, PATTERN_INIT) if probe.returncode == 0 else tuple(CXX_FLAGS)


def _dtype_of(x: Any) -> mx.Dtype:
    if isinstance(x, mx.array):
        return x.dtype
    return FROM_NUMPY[np.asarray(x).dtype]


def _to_numpy(x: Any) -> np.ndarray:
    """Row-contiguous numpy storage of an input (bfloat16 as its uint16 bits)."""
    if isinstance(x, mx.array) and x.dtype == mx.bfloat16:
        x = x.view(mx.uint16)
    return np.require(np.asarray(x), requirements="C")


def _template_value(v: Any, *, cxx: bool) -> str:
    if isinstance(v, bool):
        return ("true" if v else "false") if cxx else str(int(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, mx.Dtype):
        return TYPE_STRINGS[v]
    raise TypeError(f"template argument {v!r} must be an int, a bool or an mx.Dtype")


def _shape_buffers(arr: np.ndarray, infos: tuple[bool, bool, bool]):
    """(suffix, array) for the `_shape`, `_strides`, `_ndim` buffers the body mentions."""
    if arr.ndim == 0:
        return []
    sh, st, nd = infos
    extra = []
    if sh:
        extra.append(("_shape", np.array(arr.shape, dtype=np.int32)))
    if st:
        extra.append(("_strides", np.array(arr.strides, dtype=np.int64) // arr.itemsize))
    if nd:
        extra.append(("_ndim", np.array(arr.ndim, dtype=np.int32)))
    return extra


def _from_storage(out: np.ndarray, dt: mx.Dtype) -> mx.array:
    a = mx.array(out)  # a copy: the guarded memory is unmapped after the launch
    return a.view(mx.bfloat16) if dt == mx.bfloat16 else a


class _LaunchMemory:
    """Every buffer of one launch in guarded memory (guarded.py), freed on exit."""

    def __init__(self):
        self.buffers: list[guarded.GuardedBuffer] = []
        self._arrays: list[np.ndarray] = []

    def __enter__(self) -> _LaunchMemory:
        return self

    def __exit__(self, *exc) -> None:
        self._arrays.clear()
        for b in self.buffers:
            b.close()

    def _place(self, name: str, kind: str, dtype, shape) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        buf = guarded.GuardedBuffer(name, kind, nbytes)
        self.buffers.append(buf)
        arr = buf.array(np.dtype(dtype), tuple(shape))
        self._arrays.append(arr)
        return arr

    def input(self, name: str, arr: np.ndarray) -> int:
        placed = self._place(name, "input", arr.dtype, arr.shape)
        placed[...] = arr
        return self.address(placed)

    def output(self, name: str, shape, dt: mx.Dtype, init_value) -> np.ndarray:
        out = self._place(name, "output", NUMPY_STORAGE[dt], shape)
        if init_value is None:
            out.view(np.uint8).fill(0xFF)  # NaN bytes: unwritten outputs show
        elif dt == mx.bfloat16:
            out[...] = np.array(mx.array(init_value, dtype=mx.bfloat16).view(mx.uint16))
        else:
            out[...] = init_value
        return out

    @staticmethod
    def address(arr: np.ndarray) -> int:
        return arr.__array_interface__["data"][0]

    def canary_damage(self) -> str | None:
        for b in self.buffers:
            n = b.canary_damage()
            if n is not None:
                return f"up to {n} byte(s) before the start of {b.kind} '{b.name}'"
        return None


def _template_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    return "typename"


def _threadgroup_declaration(m: re.Match) -> str:
    dims = re.sub(r"\s+", "", m["dims"])
    return f"auto& {m['name']} = ::bonsai_emu::tg_alloc<{m['type']}{dims}>();"


class MetalKernelEmulator:
    """Same constructor and call as the object `mx.fast.metal_kernel` returns."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str = "",
        ensure_row_contiguous: bool = True,
        atomic_outputs: bool = False,
        compile_options: object | None = None,
    ):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        # Which of <name>_shape / _strides / _ndim the body mentions (substring, as MLX does).
        self.shape_infos = [
            (f"{n}_shape" in source, f"{n}_strides" in source, f"{n}_ndim" in source)
            for n in self.input_names
        ]
        self.attributes = [(a, t) for a, t in METAL_ATTRIBUTES if a in source]

    # -- source generation (mirrors mlx/backend/metal/custom_kernel + fast.cpp) ------------
    def kernel_name(self, inputs: list[np.ndarray], in_dtypes, out_dtypes, template) -> str:
        name = "custom_kernel_" + self.name
        if template:
            tdef = "<" + ", ".join(_template_value(v, cxx=False) for _, v in template) + ">"
            name += "_" + re.sub(r"<|>|(, )", "_", tdef)[:-1]
        for arr, dt in zip(inputs, in_dtypes, strict=True):
            name += "_" + TYPE_STRINGS[dt]
            if arr.ndim == 0:
                name += "s"
            elif arr.size < MAX_CONSTANT_ARRAY_SIZE:
                name += "c"
        for dt in out_dtypes:
            name += "_" + TYPE_STRINGS[dt]
        return name

    def generate_source(self, func_name, inputs, in_dtypes, out_dtypes, template) -> str:
        """The kernel source MLX would compile (without MLX's utils header)."""
        src = self.header
        if template:
            src += "template <" + ", ".join(f"{_template_kind(v)} {n}" for n, v in template)
            src += ">\n"
        src += f"[[kernel]] void {func_name}(\n"
        params = []
        index = 0
        for name, arr, dt, (sh, st, nd) in zip(
            self.input_names, inputs, in_dtypes, self.shape_infos, strict=True
        ):
            location = "constant" if arr.size < MAX_CONSTANT_ARRAY_SIZE else "device"
            ref = "&" if arr.ndim == 0 else "*"
            params.append(f"  const {location} {TYPE_STRINGS[dt]}{ref} {name} [[buffer({index})]]")
            index += 1
            if arr.ndim > 0:
                if sh:
                    params.append(f"  const constant int* {name}_shape [[buffer({index})]]")
                    index += 1
                if st:
                    params.append(f"  const constant int64_t* {name}_strides [[buffer({index})]]")
                    index += 1
                if nd:
                    params.append(f"  const constant int& {name}_ndim [[buffer({index})]]")
                    index += 1
        for name, dt in zip(self.output_names, out_dtypes, strict=True):
            t = TYPE_STRINGS[dt]
            t = f"atomic<{t}>" if self.atomic_outputs else t
            params.append(f"  device {t}* {name} [[buffer({index})]]")
            index += 1
        params += [f"  {t} {a} [[{a}]]" for a, t in self.attributes]
        src += ",\n".join(params) + ") {\n" + self.source + "\n}\n"
        if template:
            tdef = func_name + "<" + ", ".join(_template_value(v, cxx=False) for _, v in template)
            tdef += ">"
            src += (
                f'\ntemplate [[host_name("{func_name}")]] [[kernel]] decltype({tdef}) {tdef};\n'
            )
        return src

    def _cxx_source(self, func_name, inputs, in_dtypes, out_dtypes, template) -> str:
        body = THREADGROUP_DECLARATION.sub(_threadgroup_declaration, self.source)
        emu = MetalKernelEmulator(
            self.name,
            self.input_names,
            self.output_names,
            body,
            _METAL_INCLUDE.sub("// (metal include dropped by the emulator)", self.header),
            self.ensure_row_contiguous,
            self.atomic_outputs,
        )
        emu.shape_infos, emu.attributes = self.shape_infos, self.attributes
        src = '#include "metal_shim.h"\n' + emu.generate_source(
            func_name, inputs, in_dtypes, out_dtypes, template
        )
        # Launcher: unpack the argument array into the kernel's parameters.
        args = []
        k = 0
        for arr, dt, (sh, st, nd) in zip(inputs, in_dtypes, self.shape_infos, strict=True):
            t = TYPE_STRINGS[dt]
            args.append(f"*(const {t}*)a[{k}]" if arr.ndim == 0 else f"(const {t}*)a[{k}]")
            k += 1
            if arr.ndim > 0:
                casts = ((sh, "(const int*)"), (st, "(const int64_t*)"), (nd, "*(const int*)"))
                for flag, expr in casts:
                    if flag:
                        args.append(f"{expr}a[{k}]")
                        k += 1
        for dt in out_dtypes:
            t = TYPE_STRINGS[dt]
            t = f"metal::atomic<{t}>" if self.atomic_outputs else t
            args.append(f"({t}*)a[{k}]")
            k += 1
        args += [f"f->{a}" for a, _ in self.attributes]
        targs = ""
        if template:
            targs = "<" + ", ".join(_template_value(v, cxx=True) for _, v in template) + ">"
        src += (
            "\nstatic void* const* bonsai_args;\n"
            "static void bonsai_run_thread(bonsai_emu::Fiber* f) {\n"
            "  void* const* a = bonsai_args;\n"
            f"  {func_name}{targs}({', '.join(args)});\n"
            "}\n"
            'extern "C" int bonsai_launch(void* const* args, const long* grid, const long* tg,'
            " int schedule, char* err, int errlen, long* fault) {\n"
            "  bonsai_args = args;\n"
            "  return bonsai_emu::launch(grid, tg, schedule, &bonsai_run_thread, err, errlen,"
            " fault);\n"
            "}\n"
        )
        return src

    # -- compile + run ---------------------------------------------------------------------
    def _library(self, cxx_source: str) -> ctypes.CDLL:
        cxx = compiler()
        if cxx is None:
            raise EmulatorError("the Metal emulator needs a C++ compiler: install g++ (or set CXX)")
        shim = SHIM_HEADER.read_text()
        flags = cxx_flags(cxx)
        key = hashlib.sha256("\0".join([shim, cxx_source, cxx, *flags]).encode()).hexdigest()
        key = key[:24]
        with _LOCK:
            if key in _LIBRARIES:
                return _LIBRARIES[key]
            folder = cache_dir()
            folder.mkdir(parents=True, exist_ok=True)
            so = folder / f"{self.name}-{key}.so"
            if not so.exists():
                cpp = folder / f"{self.name}-{key}.cpp"
                cpp.write_text(cxx_source)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
                os.close(fd)
                cmd = [cxx, *flags, f"-I{SHIM_HEADER.parent}", str(cpp), "-o", tmp]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    os.unlink(tmp)
                    raise EmulatorError(
                        f"kernel {self.name!r} does not compile in the emulator "
                        f"(source: {cpp}):\n{proc.stderr[-6000:]}"
                    )
                os.replace(tmp, so)
            lib = ctypes.CDLL(str(so))
            lib.bonsai_launch.restype = ctypes.c_int
            lib.bonsai_launch.argtypes = [
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.POINTER(ctypes.c_long),
                ctypes.POINTER(ctypes.c_long),
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_long),
            ]
            _LIBRARIES[key] = lib
            return lib

    def __call__(
        self,
        *,
        inputs: Sequence[Any],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        template: Sequence[tuple[str, Any]] | None = None,
        init_value: float | None = None,
        verbose: bool = False,
        stream: Any = None,
    ) -> list[mx.array]:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} "
                f"but got size {len(inputs)}."
            )
        if len(output_shapes) != len(self.output_names):
            raise ValueError("[metal_kernel] Expected one output shape per output name.")
        if len(output_dtypes) != len(self.output_names):
            raise ValueError("[metal_kernel] Expected one output dtype per output name.")
        template = list(template or [])
        grid = tuple(int(g) for g in grid)
        threadgroup = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(threadgroup) != 3:
            raise ValueError("[metal_kernel] grid and threadgroup must have 3 entries")
        if int(np.prod(threadgroup)) > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(
                f"Thread group size ({int(np.prod(threadgroup))}) is greater than the maximum "
                f"allowed threads per threadgroup ({MAX_THREADS_PER_THREADGROUP})."
            )
        in_dtypes = [_dtype_of(x) for x in inputs]
        arrays = [_to_numpy(x) for x in inputs]
        out_dtypes = list(output_dtypes)

        func_name = self.kernel_name(arrays, in_dtypes, out_dtypes, template)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```")
            print(self.generate_source(func_name, arrays, in_dtypes, out_dtypes, template))
            print("```")
        lib = self._library(self._cxx_source(func_name, arrays, in_dtypes, out_dtypes, template))

        with _LaunchMemory() as memory:
            pointers = []
            for name, arr, infos in zip(self.input_names, arrays, self.shape_infos, strict=True):
                pointers.append(memory.input(name, arr))
                for suffix, extra in _shape_buffers(arr, infos):
                    pointers.append(memory.input(name + suffix, extra))
            outputs = [memory.output(name, tuple(shape), dt, init_value)
                       for name, shape, dt in zip(self.output_names, output_shapes, out_dtypes,
                                                  strict=True)]
            pointers += [memory.address(o) for o in outputs]
            if min(grid) > 0:
                self._launch(lib, pointers, grid, threadgroup, memory)
            results = [_from_storage(o, dt) for o, dt in zip(outputs, out_dtypes, strict=True)]
            del outputs  # views of the guarded memory, which is unmapped on exit
        return results

    def _launch(self, lib, pointers, grid, threadgroup, memory: _LaunchMemory) -> None:
        argv = (ctypes.c_void_p * max(1, len(pointers)))(*pointers)
        g = (ctypes.c_long * 3)(*grid)
        t = (ctypes.c_long * 3)(*threadgroup)
        err = ctypes.create_string_buffer(1024)
        fault = (ctypes.c_long * 2)(0, -1)
        with _LOCK:
            rc = lib.bonsai_launch(argv, g, t, schedule(), err, len(err), fault)
        message = err.value.decode()
        if rc == 2 and "stack overflow" not in message:  # name the buffer next to the fault
            threadgroup_name = message.split(": ", 1)[0]
            where = guarded.describe_fault(memory.buffers, fault[0] % 2**64, fault[1])
            message = f"{threadgroup_name}: {where}"
        if rc != 0:
            raise EmulatorError(f"kernel {self.name!r}: {message}")
        damage = memory.canary_damage()
        if damage:
            raise EmulatorError(f"kernel {self.name!r}: out-of-bounds write {damage}")


def metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    compile_options: object | None = None,
) -> MetalKernelEmulator:
    """Drop-in for `mx.fast.metal_kernel` that runs the kernel in the CPU emulator."""
    return MetalKernelEmulator(
        name,
        input_names,
        output_names,
        source,
        header,
        ensure_row_contiguous,
        atomic_outputs,
        compile_options,
    )
