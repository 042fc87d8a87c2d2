"""One transformer forward (one denoising step) at a chosen config, resolution and dtype.

    python benchmarks/transformer_step.py                      # Klein 4B shapes, random weights
    python benchmarks/transformer_step.py --tiny               # a toy config (seconds on a CPU)
    python benchmarks/transformer_step.py --model PATH --dtype float16 --size 1024
    python benchmarks/transformer_step.py --ref-images 1       # editing: + one reference image

Prints the seconds per forward (median of --repeats after --warmup), tokens/s and the peak
memory reported by MLX. Random weights have the real shapes, so the time is the real time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bonsai_mlx  # noqa: F401
from bonsai_mlx.models import Flux2Transformer, Flux2TransformerConfig

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

TINY = Flux2TransformerConfig(
    in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=256, axes_dims_rope=(8, 8, 8, 8),
)


def position_ids(h: int, w: int, n_txt: int, n_ref: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    img = np.stack([np.zeros(h * w), rows.ravel(), cols.ravel(), np.zeros(h * w)], axis=1)
    refs = [img + [10 + 10 * i, 0, 0, 0] for i in range(n_ref)]
    txt = np.stack([np.zeros(n_txt)] * 3 + [np.arange(n_txt)], axis=1)
    return np.concatenate([img, *refs]).astype(np.int32), txt.astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="diffusers transformer folder or BFL .safetensors")
    ap.add_argument("--tiny", action="store_true", help="toy config instead of Klein 4B shapes")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 16)")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--ref-images", type=int, default=0, help="reference images of the same size")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    if args.model:
        model = Flux2Transformer.from_pretrained(args.model, dtype=args.dtype)
    else:
        model = Flux2Transformer(TINY if args.tiny else Flux2TransformerConfig(), dtype=args.dtype)
        mx.eval(model.parameters())
    cfg = model.config
    side = args.size // 16
    img_ids, txt_ids = position_ids(side, side, args.text_len, args.ref_images)
    n_img, n_txt = len(img_ids), len(txt_ids)
    x = mx.random.normal((args.batch, n_img, cfg.in_channels)).astype(model.dtype)
    c = mx.random.normal((args.batch, n_txt, cfg.joint_attention_dim)).astype(model.dtype)
    t = mx.full((args.batch,), 0.75)
    rope = model.rope_tables(img_ids, txt_ids)
    mx.eval(x, c, t, *rope)

    times = []
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        mx.eval(model(x, c, t, rope=rope))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    n_params = sum(p.size for _, p in tree_flatten(model.parameters()))
    print(f"device          {mx.default_device()}  dtype {args.dtype}")
    print(f"config          {'tiny' if args.tiny else args.model or 'Klein 4B shapes'}: "
          f"{cfg.num_layers}+{cfg.num_single_layers} blocks, width {cfg.inner_dim}, "
          f"{n_params / 1e6:.1f} M params")
    print(f"tokens          {args.batch} x ({n_txt} text + {n_img} image) at {args.size}px"
          f"{f', {args.ref_images} reference image(s)' if args.ref_images else ''}")
    print(f"seconds/forward {sec:.4f}  (median of {len(times)}: "
          + ", ".join(f"{s:.4f}" for s in times) + ")")
    print(f"tokens/s        {args.batch * (n_txt + n_img) / sec:,.0f} "
          f"(image tokens/s {args.batch * n_img / sec:,.0f})")
    print(f"peak memory     {mx.get_peak_memory() / 1e9:.3f} GB "
          f"(weights + inputs resident before: {resident / 1e9:.3f} GB)")


if __name__ == "__main__":
    main()
