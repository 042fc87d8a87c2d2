"""Time the packed binary / ternary matmuls at FLUX.2 [klein] 4B's layer shapes.

Per shape and number of rows M (tokens): our kernel (the small-M kernel for M <= 8, else
the fused tiled GEMM), our dequantize kernel + `mx.matmul`, stock `mx.quantized_matmul` (MLX
affine, group 128) at 1 and 2 bits, and a dense `mx.matmul` in the activation dtype, in ms,
TFLOP/s and GB/s of weight traffic (packed weights + scales, read once per call). Then, per
shape and format, the crossover M from which dequantize + matmul beats the fused kernel, and
the `DEQUANT_MIN_M` (bonsai_mlx/kernels, now 512, an estimate) those measurements suggest.

    python benchmarks/kernels.py                        # an Apple GPU: every shape and M
    python benchmarks/kernels.py --shapes attn ff_in --tokens 1 64 512 4096 --json k.json
    python benchmarks/kernels.py --backend emulator     # Linux: the kernels in the CPU
                                                        # emulator at 1/24 of the shapes

`--backend emulator` runs the Metal kernels in the CPU emulator (a smoke test of this script;
its times mean nothing), `--backend reference` times the plain-MLX path; both are the
choices without an Apple GPU, where `metal` is refused.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

# bonsai_mlx first: on Linux it preloads OpenBLAS before mlx.core is imported.
from bonsai_mlx.kernels import DEQUANT_MIN_M, metal, reference
from bonsai_mlx.models.transformer import KLEIN_4B
from bonsai_mlx.weights import atomic_path

import mlx.core as mx
import numpy as np

# W is (N, K): N outputs, K inputs. FLUX.2 [klein] 4B: width D 3072, MLP hidden F 9216.
_D, _F = KLEIN_4B.inner_dim, KLEIN_4B.mlp_hidden_dim
SHAPES = {
    "attn": (_D, _D),  # double-stream to_q/k/v, to_out, add_*_proj, to_add_out
    "qkv": (3 * _D, _D),  # a stream's q, k, v in one matmul; single-stream modulation
    "ff_in": (2 * _F, _D),  # double-stream feed-forward linear_in (SwiGLU, 2 x F)
    "single_in": (3 * _D + 2 * _F, _D),  # single-stream to_qkv_mlp_proj
    "ff_out": (_D, _F),  # double-stream feed-forward linear_out
    "single_out": (_D, _D + _F),  # single-stream to_out (D + F inputs)
}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 4096]
FORMATS = ("binary", "ternary")
BATCH_BYTES = 16 << 20  # outputs up to this size are timed in batches, larger ones one by one


def timed(fn, repeats: int) -> float:
    """Seconds per call: after a warm-up (compiles the kernel), `repeats` calls, evaluated in
    one batch when their outputs are small (no per-call synchronisation), else one by one."""
    out = fn()
    mx.eval(out)
    batch = out.nbytes * repeats <= BATCH_BYTES
    start = time.perf_counter()
    if batch:
        mx.eval([fn() for _ in range(repeats)])
    else:
        for _ in range(repeats):
            mx.eval(fn())
    return (time.perf_counter() - start) / repeats


def random_packed(fmt: str, n: int, k: int):
    rng = np.random.default_rng(0)
    scales = mx.array(rng.uniform(0.5, 1.5, size=(n, k // 128)).astype(np.float16))
    if fmt == "binary":
        return mx.array(rng.integers(0, 2**32, size=(n, k // 32), dtype=np.uint32)), scales
    return mx.array(rng.integers(0, 243, size=(n, -(-k // 5)), dtype=np.uint8)), scales


def packed_paths(fmt: str, backend: str, n: int, k: int) -> dict:
    """label -> (fn(x), weight bytes) for one packed format."""
    packed, scales = random_packed(fmt, n, k)
    wbytes = packed.nbytes + scales.nbytes
    if backend == "reference":
        ref = reference.binary_matmul if fmt == "binary" else reference.ternary_matmul
        return {f"{fmt} reference": (lambda x: ref(x, packed, scales), wbytes)}
    return {
        f"{fmt} fused": (lambda x: metal.packed_matmul(x, packed, scales, backend=backend),
                         wbytes),
        f"{fmt} dequant+matmul": (
            lambda x: x @ metal.dequantize(packed, scales, x.dtype, backend=backend).T, wbytes),
    }


def stock_paths(n: int, k: int, dtype: mx.Dtype) -> dict:
    """label -> (fn(x), weight bytes) for mx.quantized_matmul at 1 and 2 bits and dense."""
    w = mx.random.normal((n, k)).astype(dtype)
    paths = {}
    for bits in (1, 2):
        try:
            wq, s, b = mx.quantize(w, group_size=128, bits=bits)
            mx.eval(mx.quantized_matmul(mx.zeros((1, k), dtype), wq, s, b, transpose=True,
                                        group_size=128, bits=bits))
        except (ValueError, RuntimeError) as err:  # an MLX or device without these bits
            print(f"  mx.quantized_matmul {bits}-bit unavailable: {err}")
            continue
        paths[f"mx.quantized_matmul {bits}-bit"] = (
            lambda x, wq=wq, s=s, b=b, bits=bits: mx.quantized_matmul(
                x, wq, s, b, transpose=True, group_size=128, bits=bits),
            wq.nbytes + s.nbytes + b.nbytes)
    paths[f"dense {str(dtype).removeprefix('mlx.core.')} matmul"] = (lambda x: x @ w.T,
                                                                      w.nbytes)
    return paths


def bench_shape(name: str, n: int, k: int, args) -> list[dict]:
    """Every path at every M for one shape: records, also printed as a table."""
    paths = {}
    for fmt in FORMATS:
        paths.update(packed_paths(fmt, args.backend, n, k))
    if not args.skip_stock:
        paths.update(stock_paths(n, k, args.dtype))
    records = []
    for m in args.tokens:
        print(f"{name}: M={m} N={n} K={k}")
        x = mx.random.normal((m, k)).astype(args.dtype)
        _check_agreement(paths, x)
        for label, (fn, wbytes) in paths.items():
            sec = timed(lambda fn=fn, x=x: fn(x), args.repeats)
            rec = {"shape": name, "n": n, "k": k, "m": m, "path": label, "ms": sec * 1e3,
                   "tflops": 2 * m * n * k / sec / 1e12, "weight_gbs": wbytes / sec / 1e9}
            records.append(rec)
            print(f"  {label:<28} {rec['ms']:9.3f} ms {rec['tflops']:8.3f} TFLOP/s "
                  f"{rec['weight_gbs']:8.2f} GB/s")
    return records


def _check_agreement(paths: dict, x: mx.array) -> None:
    """Print a warning when the fused kernel and dequantize + matmul disagree (a broken
    kernel's speed means nothing; `bonsai-mlx doctor` runs the real self-check)."""
    for fmt in FORMATS:
        if f"{fmt} fused" not in paths:
            continue
        fused = paths[f"{fmt} fused"][0](x).astype(mx.float32)
        deq = paths[f"{fmt} dequant+matmul"][0](x).astype(mx.float32)
        scale = mx.abs(deq).max().item() or 1.0
        diff = mx.abs(fused - deq).max().item() / scale
        if not diff < 0.05:  # (NaN included)
            print(f"  WARNING: {fmt} fused kernel and dequantize + matmul differ by {diff:.3g} "
                  "of the largest output: run `bonsai-mlx doctor`")


def crossover(records: list[dict], shape: str, fmt: str) -> int | None:
    """The smallest M from which dequantize + matmul is faster than the fused kernel at this M
    and at every larger M measured (None: never)."""
    ms = {(r["m"], r["path"]): r["ms"] for r in records if r["shape"] == shape}
    tokens = sorted({m for m, _ in ms})
    faster = [ms[m, f"{fmt} dequant+matmul"] < ms[m, f"{fmt} fused"] for m in tokens]
    for i, m in enumerate(tokens):
        if all(faster[i:]):
            return m
    return None


def summarize(records: list[dict], shapes: list[str]) -> dict:
    """Crossover M per shape and format, printed, and the DEQUANT_MIN_M they suggest (the
    median crossover: one threshold serves every shape)."""
    print(f"\ncrossover M (dequantize + matmul faster from here on; DEQUANT_MIN_M is now "
          f"{DEQUANT_MIN_M}):")
    found = {}
    for shape in shapes:
        for fmt in FORMATS:
            m = crossover(records, shape, fmt)
            found[f"{shape}/{fmt}"] = m
            print(f"  {shape:<11} {fmt:<8} {'never' if m is None else m}")
    seen = [m for m in found.values() if m is not None]
    suggested = int(statistics.median_low(seen)) if seen else None
    print(f"suggested DEQUANT_MIN_M: {suggested if seen else 'none (the fused kernel won)'}")
    return {"crossover": found, "suggested_dequant_min_m": suggested}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("metal", "emulator", "reference"),
                        help="default: metal on an Apple GPU, else reference")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS, help="values of M")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16",
                                                                "float32"))
    parser.add_argument("--scale", type=int, help="divide N and K by this (default 24 in the "
                        "emulator, else 1); 3072 / 24 = 128")
    parser.add_argument("--skip-stock", action="store_true",
                        help="leave out mx.quantized_matmul and the dense matmul")
    parser.add_argument("--json", help="write the records and the summary here")
    args = parser.parse_args(argv)
    has_metal = mx.metal.is_available()
    args.backend = args.backend or ("metal" if has_metal else "reference")
    if args.backend == "metal" and not has_metal:
        parser.error("--backend metal needs an Apple GPU; use --backend emulator or reference")
    args.scale = args.scale or (24 if args.backend == "emulator" else 1)
    args.dtype = getattr(mx, args.dtype)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.backend != "metal":
        print(f"backend {args.backend}: no Apple GPU in use, so these times say nothing about "
              "the Metal kernels' speed")
    records = []
    for name in args.shapes:
        n, k = (d // args.scale for d in SHAPES[name])
        if k % 128:
            raise SystemExit(f"--scale {args.scale} leaves {name} with K = {k}, not a "
                             "multiple of 128")
        records += bench_shape(name, n, k, args)
    summary = summarize(records, args.shapes) if args.backend != "reference" else {}
    result = {"backend": args.backend, "device": _device(), "mlx": mx.__version__,
              "dtype": str(args.dtype).removeprefix("mlx.core."), "scale": args.scale,
              "repeats": args.repeats, "records": records, **summary}
    if args.json:
        with atomic_path(Path(args.json)) as tmp:
            tmp.write_text(json.dumps(result, indent=1))
    return result


def _device() -> str:
    try:
        return str(mx.device_info().get("device_name") or platform.machine())
    except Exception:  # an MLX without device_info
        return platform.machine()


if __name__ == "__main__":
    main()
