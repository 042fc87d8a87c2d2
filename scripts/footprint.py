"""Storage and memory of the full-size FLUX.2 [klein] 4B transformer in our packed formats.

Builds every tensor of the packed transformer at full size with synthetic contents (no
download, and no dense 4B weights are ever materialised: only packed arrays of the right
shapes), writes it as safetensors to a temporary folder and reports, per component, the
bytes on disk and in memory. Also prints the MLX affine sizes of the published Bonsai packs
(from the same shapes, by arithmetic) for comparison.

    python scripts/footprint.py              # binary and ternary, dense layers 16-bit and 8-bit
    python scripts/footprint.py --no-write   # arithmetic only (header bytes estimated)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout too

from bonsai_mlx.models.transformer import packed_layer_paths  # noqa: E402
from bonsai_mlx.quant import GROUP_SIZE  # noqa: E402
from bonsai_mlx.quant.model import DENSE_GROUP_SIZE  # noqa: E402
from bonsai_mlx.weights import save_safetensors  # noqa: E402

import mlx.core as mx  # noqa: E402

D, MLP, JOINT, T_EMB = 3072, 9216, 7680, 256
NUM_LAYERS, NUM_SINGLE = 5, 20
HEAD_DIM = 128

# Layers that stay dense (16-bit, or MLX affine 8-bit with --dense-bits 8): (out, in).
DENSE_LINEARS = {
    "x_embedder": (D, 128),
    "context_embedder": (D, JOINT),
    "time_guidance_embed.timestep_embedder.linear_1": (D, T_EMB),
    "time_guidance_embed.timestep_embedder.linear_2": (D, D),
    "double_stream_modulation_img.linear": (6 * D, D),
    "double_stream_modulation_txt.linear": (6 * D, D),
    "single_stream_modulation.linear": (3 * D, D),
    "norm_out.linear": (2 * D, D),
    "proj_out": (128, D),
}
NORMS = [f"transformer_blocks.{i}.attn.{n}.weight" for i in range(NUM_LAYERS)
         for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")] + [
    f"single_transformer_blocks.{i}.attn.{n}.weight" for i in range(NUM_SINGLE)
    for n in ("norm_q", "norm_k")]

PACKED_SHAPES = {  # (out, in) by the layer name's ending
    "attn.to_q": (D, D), "attn.to_k": (D, D), "attn.to_v": (D, D),
    "attn.add_q_proj": (D, D), "attn.add_k_proj": (D, D), "attn.add_v_proj": (D, D),
    "attn.to_out.0": (D, D), "attn.to_add_out": (D, D),
    "ff.linear_in": (2 * MLP, D), "ff.linear_out": (D, MLP),
    "ff_context.linear_in": (2 * MLP, D), "ff_context.linear_out": (D, MLP),
    "attn.to_qkv_mlp_proj": (3 * D + 2 * MLP, D), "attn.to_out": (D, D + MLP),
}


def packed_shape(path: str) -> tuple[int, int]:
    return PACKED_SHAPES[path.split(".", 2)[2]]


def tensors(fmt: str, dense_bits: int) -> dict[str, tuple[tuple[int, ...], mx.Dtype, str]]:
    """name -> (shape, dtype, component) of our packed transformer file."""
    out = {}
    for path in packed_layer_paths(NUM_LAYERS, NUM_SINGLE):
        n, k = packed_shape(path)
        if fmt == "binary":
            out[f"{path}.weight"] = ((n, k // 32), mx.uint32, "packed weights")
        else:
            out[f"{path}.weight"] = ((n, -(-k // 5)), mx.uint8, "packed weights")
        out[f"{path}.scales"] = ((n, k // GROUP_SIZE), mx.float16, "packed scales")
    for name, (n, k) in DENSE_LINEARS.items():
        if dense_bits == 16:
            out[f"{name}.weight"] = ((n, k), mx.bfloat16, "dense layers")
        else:
            out[f"{name}.weight"] = ((n, k // 4), mx.uint32, "dense layers")
            out[f"{name}.scales"] = ((n, k // DENSE_GROUP_SIZE), mx.bfloat16, "dense layers")
            out[f"{name}.biases"] = ((n, k // DENSE_GROUP_SIZE), mx.bfloat16, "dense layers")
    for name in NORMS:
        out[name] = ((HEAD_DIM,), mx.bfloat16, "dense layers")
    return out


def nbytes(shape, dtype) -> int:
    n = dtype.size
    for d in shape:
        n *= d
    return n


def affine_bytes(bits: int) -> dict[str, int]:
    """The published Bonsai MLX packs: affine `bits`, group 128, scale + bias float16."""
    packed = scales = 0
    for path in packed_layer_paths(NUM_LAYERS, NUM_SINGLE):
        n, k = packed_shape(path)
        packed += n * k * bits // 8
        scales += 2 * 2 * n * k // GROUP_SIZE
    dense = sum(2 * n * k for n, k in DENSE_LINEARS.values()) + 2 * HEAD_DIM * len(NORMS)
    return {"packed weights": packed, "packed scales": scales, "dense layers": dense}


def measure(fmt: str, dense_bits: int, folder: Path | None) -> dict:
    spec = tensors(fmt, dense_bits)
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
    args = ap.parse_args()
    targets = {"binary": 0.92e9, "ternary": 1.19e9}
    fp16 = 2 * (sum(n * k for n, k in DENSE_LINEARS.values()) + HEAD_DIM * len(NORMS) + sum(
        n * k for n, k in map(packed_shape, packed_layer_paths(NUM_LAYERS, NUM_SINGLE))))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = None if args.no_write else Path(tmp)
        for fmt in ("binary", "ternary"):
            for dense_bits in (16, 8):
                rows.append((fmt, dense_bits, measure(fmt, dense_bits, folder)))
    comps = ["packed weights", "packed scales", "dense layers"]
    print("FLUX.2 [klein] 4B transformer, decimal GB (1 GB = 1e9 bytes); "
          f"FP16/BF16 dense: {gb(fp16)} GB")
    head = (f"{'format':<10}{'dense':>6}" + "".join(f"{c:>16}" for c in comps)
            + f"{'on disk':>10}{'in memory':>11}{'target':>8}{'bits/w':>8}")
    print(head)
    print("-" * len(head))
    packed_params = sum(n * k for n, k in map(packed_shape,
                                              packed_layer_paths(NUM_LAYERS, NUM_SINGLE)))
    for fmt, dense_bits, r in rows:
        c = r["components"]
        bits = 8 * (c["packed weights"] + c["packed scales"]) / packed_params
        mem = gb(r["memory"]) if "memory" in r else "-"
        ok = "ok" if r["disk"] <= targets[fmt] else "MISS"
        print(f"{fmt:<10}{dense_bits:>6}" + "".join(f"{gb(c[k]):>16}" for k in comps)
              + f"{gb(r['disk']):>10}{mem:>11}{ok:>8}{bits:>8.4f}")
    for bits, name in ((1, "Bonsai MLX 1-bit"), (2, "Bonsai MLX 2-bit")):
        c = affine_bytes(bits)
        print(f"{name:<16}" + "".join(f"{gb(c[k]):>16}" for k in comps)
              + f"{gb(sum(c.values())):>10}{'':>11}{'':>8}"
              f"{8 * (c['packed weights'] + c['packed scales']) / packed_params:>8.4f}")
    print(f"packed layers: 100, {packed_params:,} weights; "
          "'packed scales' of the Bonsai packs include their biases")
    if rows and not rows[0][2]["disk_exact"]:
        print("(--no-write: on-disk bytes are payload + an estimated header)")
    else:
        times = ", ".join(f"{r['write_s']:.1f}s" for *_, r in rows)
        print("on disk: size of the written safetensors file; in memory: "
              f"mx.get_active_memory() growth holding all tensors; write times {times}")


if __name__ == "__main__":
    main()
