"""Time the packed binary / ternary matmuls at the FLUX.2 [klein] DiT's shapes.

On an Apple GPU: fused Metal kernel vs dequantize + mx.matmul vs mx.quantized_matmul (MLX
affine 1-bit / 2-bit) vs dense bfloat16 mx.matmul, in TFLOP/s and weight GB/s, and the
fused-vs-dequant choice per shape (compare with DEQUANT_MIN_M in bonsai_mlx/kernels).
Elsewhere: only the plain-MLX reference path runs (no Metal), and the script says so.

    python benchmarks/kernels.py [--tokens 1024 4096] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

# bonsai_mlx first: on Linux it preloads OpenBLAS before mlx.core is imported.
from bonsai_mlx.kernels import DEQUANT_MIN_M, metal, reference
from bonsai_mlx.models.transformer import KLEIN_4B, KLEIN_9B

import mlx.core as mx
import numpy as np

MODELS = {"4b": KLEIN_4B, "9b": KLEIN_9B}


def dit_shapes(config) -> list[tuple[str, int, int]]:
    """(name, N, K) of the packed DiT linears of a transformer config: W is (N, K)."""
    d, f = config.inner_dim, config.mlp_hidden_dim
    return [
        ("attn.to_q/k/v/out", d, d),
        ("ff.linear_in", 2 * f, d),
        ("ff.linear_out", d, f),
        ("single.to_qkv_mlp_proj", 3 * d + 2 * f, d),
        ("single.to_out", d, d + f),
    ]


DIT_SHAPES = dit_shapes(KLEIN_4B)


def timed(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up / compile
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - start) / repeats


def random_packed(fmt: str, n: int, k: int):
    rng = np.random.default_rng(0)
    scales = mx.array(rng.uniform(0.5, 1.5, size=(n, k // 128)).astype(np.float16))
    if fmt == "binary":
        return mx.array(rng.integers(0, 2**32, size=(n, k // 32), dtype=np.uint32)), scales
    return mx.array(rng.integers(0, 243, size=(n, -(-k // 5)), dtype=np.uint8)), scales


def report(label: str, seconds: float, m: int, n: int, k: int, weight_bytes: int) -> None:
    tflops = 2 * m * n * k / seconds / 1e12
    gbs = weight_bytes / seconds / 1e9
    print(f"  {label:<28} {seconds * 1e3:9.2f} ms {tflops:8.2f} TFLOP/s {gbs:8.1f} GB/s")


def bench_packed(fmt: str, x: mx.array, n: int, k: int, repeats: int, on_metal: bool) -> None:
    m = x.shape[0]
    packed, scales = random_packed(fmt, n, k)
    wbytes = packed.nbytes + scales.nbytes
    if not on_metal:
        ref = reference.binary_matmul if fmt == "binary" else reference.ternary_matmul
        report(f"{fmt} reference (CPU)", timed(lambda: ref(x, packed, scales), 1), m, n, k, wbytes)
        return
    fused = timed(lambda: metal.packed_matmul(x, packed, scales), repeats)
    report(f"{fmt} fused kernel", fused, m, n, k, wbytes)
    deq = timed(lambda: x @ metal.dequantize(packed, scales, x.dtype).T, repeats)
    report(f"{fmt} dequant + matmul", deq, m, n, k, wbytes)
    better = "dequant" if deq < fused else "fused"
    rule = "dequant" if m >= DEQUANT_MIN_M else "fused"
    print(f"  -> faster: {better}; DEQUANT_MIN_M={DEQUANT_MIN_M} picks {rule}")


def bench_mlx(x: mx.array, n: int, k: int, repeats: int) -> None:
    m = x.shape[0]
    w = mx.random.normal((n, k)).astype(mx.bfloat16)
    for bits in (1, 2):
        try:
            wq, s, b = mx.quantize(w, group_size=128, bits=bits)
        except ValueError as err:  # an MLX without 1-bit affine quantization
            print(f"  mx.quantized_matmul {bits}-bit: unavailable ({err})")
            continue
        sec = timed(
            lambda wq=wq, s=s, b=b, bits=bits: mx.quantized_matmul(
                x, wq, s, b, transpose=True, group_size=128, bits=bits
            ),
            repeats,
        )
        report(f"mx.quantized_matmul {bits}-bit", sec, m, n, k, wq.nbytes + s.nbytes + b.nbytes)
    report("bf16 mx.matmul", timed(lambda: x @ w.T, repeats), m, n, k, w.nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shapes", type=int, default=len(DIT_SHAPES), help="first N shapes")
    parser.add_argument("--model", choices=sorted(MODELS), default="4b",
                        help="the FLUX.2 [klein] transformer whose shapes to time")
    args = parser.parse_args()

    on_metal = mx.metal.is_available()
    if not on_metal:
        print(
            "No Apple GPU (mx.metal.is_available() is False): timing only the plain-MLX "
            "reference path on the CPU. The Metal kernels are exercised by the emulator in "
            "tests/test_kernels.py, which checks correctness, not speed."
        )
    for name, n, k in dit_shapes(MODELS[args.model])[: args.shapes]:
        for m in args.tokens:
            print(f"{name}: M={m} N={n} K={k}")
            x = mx.random.normal((m, k)).astype(mx.bfloat16)
            for fmt in ("binary", "ternary"):
                bench_packed(fmt, x, n, k, args.repeats, on_metal)
            if on_metal:
                bench_mlx(x, n, k, args.repeats)


if __name__ == "__main__":
    main()
