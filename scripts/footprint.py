"""Storage and memory of a full-size FLUX.2 [klein] transformer (4B, or 9B with --model 9b)
in our packed formats.

Builds every tensor of the packed transformer at full size with synthetic contents (no
download, and no dense weights are ever materialised: only packed arrays of the right
shapes, read off the model built lazily from its config), writes it as safetensors to a
temporary folder and reports, per component, the bytes on disk and in memory. Also prints
the MLX affine sizes of the published Bonsai packs' layout (from the same shapes, by
arithmetic) for comparison.

    python scripts/footprint.py              # binary and ternary, dense layers 16-bit and 8-bit
    python scripts/footprint.py --no-write   # arithmetic only (header bytes estimated)
    python scripts/footprint.py --model 9b   # FLUX.2 [klein] 9B
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout too

from bonsai_mlx.models.transformer import (  # noqa: E402
    KLEIN_4B,
    KLEIN_9B,
    Flux2Transformer,
    Flux2TransformerConfig,
    packed_layer_paths,
)
from bonsai_mlx.quant import GROUP_SIZE  # noqa: E402
from bonsai_mlx.quant.model import DENSE_GROUP_SIZE  # noqa: E402
from bonsai_mlx.weights import save_safetensors  # noqa: E402

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

MODELS = {"4b": KLEIN_4B, "9b": KLEIN_9B}


@functools.lru_cache(maxsize=4)
def _shapes(config_key: str) -> dict[str, tuple[int, ...]]:
    config = Flux2TransformerConfig(**json.loads(config_key))
    model = Flux2Transformer(config, dtype="bfloat16")  # lazy: only shapes are read
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def shapes(config: Flux2TransformerConfig = KLEIN_4B) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, diffusers names."""
    d = {k: v for k, v in config.to_dict().items() if k != "_class_name"}
    return _shapes(json.dumps(d, sort_keys=True))


def packed_paths(config: Flux2TransformerConfig = KLEIN_4B) -> list[str]:
    return packed_layer_paths(config.num_layers, config.num_single_layers)


def packed_shape(path: str, config: Flux2TransformerConfig = KLEIN_4B) -> tuple[int, int]:
    """(out, in) of a packed layer."""
    return shapes(config)[f"{path}.weight"]


def _dense(config: Flux2TransformerConfig) -> dict[str, tuple[int, ...]]:
    """The parameters that stay dense: Linear weights (2-D) and the q/k norms (1-D)."""
    packed = {f"{p}.weight" for p in packed_paths(config)}
    return {k: s for k, s in shapes(config).items() if k not in packed}


def tensors(fmt: str, dense_bits: int, config: Flux2TransformerConfig = KLEIN_4B
            ) -> dict[str, tuple[tuple[int, ...], mx.Dtype, str]]:
    """name -> (shape, dtype, component) of our packed transformer file."""
    out = {}
    for path in packed_paths(config):
        n, k = packed_shape(path, config)
        if fmt == "binary":
            out[f"{path}.weight"] = ((n, k // 32), mx.uint32, "packed weights")
        else:
            out[f"{path}.weight"] = ((n, -(-k // 5)), mx.uint8, "packed weights")
        out[f"{path}.scales"] = ((n, k // GROUP_SIZE), mx.float16, "packed scales")
    for name, shape in _dense(config).items():
        # dense 8-bit: every Linear whose input is a whole number of groups, as
        # quant.quantize_dense_layers does
        if dense_bits == 16 or len(shape) != 2 or shape[1] % DENSE_GROUP_SIZE:
            out[name] = (shape, mx.bfloat16, "dense layers")
            continue
        n, k = shape
        layer = name.removesuffix(".weight")
        out[name] = ((n, k // 4), mx.uint32, "dense layers")
        out[f"{layer}.scales"] = ((n, k // DENSE_GROUP_SIZE), mx.bfloat16, "dense layers")
        out[f"{layer}.biases"] = ((n, k // DENSE_GROUP_SIZE), mx.bfloat16, "dense layers")
    return out


def nbytes(shape, dtype) -> int:
    n = dtype.size
    for d in shape:
        n *= d
    return n


def affine_bytes(bits: int, config: Flux2TransformerConfig = KLEIN_4B) -> dict[str, int]:
    """The published Bonsai MLX packs' layout: affine `bits`, group 128, scale + bias
    float16; the other layers 16-bit."""
    packed = scales = 0
    for path in packed_paths(config):
        n, k = packed_shape(path, config)
        packed += n * k * bits // 8
        scales += 2 * 2 * n * k // GROUP_SIZE
    dense = sum(nbytes(s, mx.bfloat16) for s in _dense(config).values())
    return {"packed weights": packed, "packed scales": scales, "dense layers": dense}


def measure(fmt: str, dense_bits: int, folder: Path | None,
            config: Flux2TransformerConfig = KLEIN_4B) -> dict:
    spec = tensors(fmt, dense_bits, config)
    by_component: dict[str, int] = {}
    for shape, dtype, comp in spec.values():
        by_component[comp] = by_component.get(comp, 0) + nbytes(shape, dtype)
    result = {"components": by_component, "params_bytes": sum(by_component.values())}
    if folder is None:
        header = {k: {"dtype": "U32", "shape": list(s), "data_offsets": [0, 10**10]}
                  for k, (s, _, _) in spec.items()}
        result["disk"] = 8 + len(json.dumps(header)) + result["params_bytes"]
        result["disk_exact"] = False
        return result
    mx.clear_cache()
    before = mx.get_active_memory()
    arrays = {k: mx.zeros(s, d) for k, (s, d, _) in spec.items()}
    mx.eval(arrays)
    result["memory"] = mx.get_active_memory() - before
    path = folder / f"{fmt}-{dense_bits}" / "diffusion_pytorch_model.safetensors"
    t = time.perf_counter()
    save_safetensors(path, arrays)
    result["write_s"] = time.perf_counter() - t
    result["disk"] = path.stat().st_size
    result["disk_exact"] = True
    del arrays
    path.unlink()
    return result


def gb(n: int) -> str:
    return f"{n / 1e9:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-write", action="store_true",
                    help="arithmetic only: do not write the files")
    ap.add_argument("--model", choices=sorted(MODELS), default="4b",
                    help="FLUX.2 [klein] 4B (default) or 9B")
    args = ap.parse_args()
    config = MODELS[args.model]
    targets = {"binary": 0.92e9, "ternary": 1.19e9} if args.model == "4b" else {}
    fp16 = sum(nbytes(s, mx.bfloat16) for s in shapes(config).values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = None if args.no_write else Path(tmp)
        for fmt in ("binary", "ternary"):
            for dense_bits in (16, 8):
                rows.append((fmt, dense_bits, measure(fmt, dense_bits, folder, config)))
    comps = ["packed weights", "packed scales", "dense layers"]
    print(f"FLUX.2 [klein] {args.model.upper()} transformer, decimal GB (1 GB = 1e9 bytes); "
          f"FP16/BF16 dense: {gb(fp16)} GB")
    head = (f"{'format':<10}{'dense':>6}" + "".join(f"{c:>16}" for c in comps)
            + f"{'on disk':>10}{'in memory':>11}{'target':>8}{'bits/w':>8}")
    print(head)
    print("-" * len(head))
    paths = packed_paths(config)
    packed_params = sum(n * k for n, k in (packed_shape(p, config) for p in paths))
    for fmt, dense_bits, r in rows:
        c = r["components"]
        bits = 8 * (c["packed weights"] + c["packed scales"]) / packed_params
        mem = gb(r["memory"]) if "memory" in r else "-"
        ok = ("ok" if r["disk"] <= targets[fmt] else "MISS") if fmt in targets else ""
        print(f"{fmt:<10}{dense_bits:>6}" + "".join(f"{gb(c[k]):>16}" for k in comps)
              + f"{gb(r['disk']):>10}{mem:>11}{ok:>8}{bits:>8.4f}")
    for bits, name in ((1, "MLX affine 1-bit"), (2, "MLX affine 2-bit")):
        c = affine_bytes(bits, config)
        print(f"{name:<16}" + "".join(f"{gb(c[k]):>16}" for k in comps)
              + f"{gb(sum(c.values())):>10}{'':>11}{'':>8}"
              f"{8 * (c['packed weights'] + c['packed scales']) / packed_params:>8.4f}")
    print(f"packed layers: {len(paths)}, {packed_params:,} weights; 'packed scales' of the "
          "MLX affine layout (the published Bonsai packs') include their biases")
    if rows and not rows[0][2]["disk_exact"]:
        print("(--no-write: on-disk bytes are payload + an estimated header)")
    else:
        times = ", ".join(f"{r['write_s']:.1f}s" for *_, r in rows)
        print("on disk: size of the written safetensors file; in memory: "
              f"mx.get_active_memory() growth holding all tensors; write times {times}")


if __name__ == "__main__":
    main()
