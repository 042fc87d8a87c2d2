"""Editing speed-up of reference KV caching (FLUX.2 [klein] 9B KV) with 1 and 2 references.

Times the transformer part of an edit both ways, with random weights (no download):
- plain: every step runs text + noise + reference tokens;
- cached: one reference pass (reference tokens alone), then every step runs text + noise
  tokens, attending to the cached reference keys and values.
The encoder and decoder are the same either way and are left out. The model keeps the 9B's
head size, its text hidden = width rule and its 1:3 double:single block ratio; `--heads`
and `--double` scale it down so a CPU can run it (time per block is the same for every
block, so the ratio holds for 8 + 24 blocks). Alongside, the FLOPs of both ways for the
full-size 9B (32 heads, 8 + 24 blocks) at the same token counts.

    python benchmarks/reference_kv.py                                  # CPU: 8 heads, 1+3 blocks
    python benchmarks/reference_kv.py --heads 32 --double 8 --dtype bfloat16   # the 9B, GPU

Prints one JSON line per number of references.
"""

from __future__ import annotations

import argparse
import json
import time

import bonsai_mlx  # noqa: F401  (first: OpenBLAS before mlx.core on Linux)
from bonsai_mlx.models.transformer import KLEIN_9B, Flux2Transformer, Flux2TransformerConfig
from bonsai_mlx.pipeline import REFERENCE_TIME_STEP, latent_ids, text_ids

import mlx.core as mx
import numpy as np

TEXT_TOKENS = 512


def model_config(heads: int, double: int) -> Flux2TransformerConfig:
    width = heads * KLEIN_9B.attention_head_dim
    return Flux2TransformerConfig(num_layers=double, num_single_layers=3 * double,
                                  num_attention_heads=heads, joint_attention_dim=3 * width)


def flops(config: Flux2TransformerConfig, rows: int, keys: int) -> int:
    """One pass of the blocks: linear 2*M*K*N over `rows` tokens (a text token costs what an
    image token does: its stream has weights of the same shapes), attention 4*rows*keys*D
    (embeddings and modulation left out: well under 1%)."""
    d, f = config.inner_dim, config.mlp_hidden_dim
    double = 2 * rows * (4 * d * d + 3 * d * f)  # q, k, v, out + SwiGLU in (2f) and out
    single = 2 * rows * (d * (3 * d + 2 * f) + (d + f) * d)
    attention = 4 * rows * keys * d
    blocks = config.num_layers + config.num_single_layers
    return config.num_layers * double + config.num_single_layers * single + blocks * attention


def flop_counts(config, n: int, refs: int, steps: int) -> dict[str, float]:
    t = TEXT_TOKENS
    plain = steps * flops(config, t + n + refs * n, t + n + refs * n)
    cached = flops(config, refs * n, refs * n) + steps * flops(config, t + n, t + n + refs * n)
    return {"plain_tflop": plain / 1e12, "cached_tflop": cached / 1e12,
            "flop_ratio": plain / cached}


def timed_edit(model, x, refs, ctx, ids, steps: int, cached: bool) -> dict[str, float]:
    img_ids, ref_ids, txt_ids = ids
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    mx.synchronize()
    t0 = time.perf_counter()
    kv, ref_s = None, 0.0
    if cached:
        kv = model.reference_kv(refs, ref_ids)
        ref_s = time.perf_counter() - t0
        rope = model.rope_tables(img_ids, txt_ids)
    else:
        rope = model.rope_tables(np.concatenate([img_ids, ref_ids]), txt_ids)
    step_s = []
    for sigma in sigmas:
        t1 = time.perf_counter()
        inputs = x if cached else mx.concatenate([x, refs], axis=1)
        v = model(inputs, ctx, float(sigma), rope=rope, reference_kv=kv)[:, : x.shape[1]]
        mx.eval(v)
        step_s.append(time.perf_counter() - t1)
    return {"seconds": time.perf_counter() - t0, "reference_pass_s": ref_s,
            "step_s": step_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image and reference side, pixels")
    ap.add_argument("--refs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8, help="heads of 128 (the 9B: 32)")
    ap.add_argument("--double", type=int, default=1, help="double blocks (x3 single; 9B: 8)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    config = model_config(args.heads, args.double)
    mx.random.seed(0)
    model = Flux2Transformer(config, dtype=args.dtype)
    mx.eval(model.parameters())
    side = args.size // 16
    n = side * side
    key = mx.random.key(1)
    x = mx.random.normal((1, n, config.in_channels), key=key)
    ctx = mx.random.normal((1, TEXT_TOKENS, config.joint_attention_dim), key=mx.random.key(2))
    for r in args.refs:
        refs = mx.random.normal((1, r * n, config.in_channels), key=mx.random.key(3 + r))
        ref_ids = np.concatenate([latent_ids(side, side, t=REFERENCE_TIME_STEP * (i + 1))
                                  for i in range(r)])
        ids = (latent_ids(side, side), ref_ids, text_ids(TEXT_TOKENS))
        mx.eval(x, ctx, refs)
        timed_edit(model, x, refs, ctx, ids, 1, cached=True)  # warm-up, untimed
        plain = timed_edit(model, x, refs, ctx, ids, args.steps, cached=False)
        cached = timed_edit(model, x, refs, ctx, ids, args.steps, cached=True)
        row = {
            "references": r, "size": args.size, "steps": args.steps, "dtype": args.dtype,
            "heads": args.heads, "blocks": [config.num_layers, config.num_single_layers],
            "tokens": {"text": TEXT_TOKENS, "image": n, "references": r * n},
            "plain_s": round(plain["seconds"], 2),
            "plain_step_s": [round(s, 2) for s in plain["step_s"]],
            "cached_s": round(cached["seconds"], 2),
            "cached_reference_pass_s": round(cached["reference_pass_s"], 2),
            "cached_step_s": [round(s, 2) for s in cached["step_s"]],
            "speedup": round(plain["seconds"] / cached["seconds"], 2),
            "this_model": {k: round(v, 3) for k, v in
                           flop_counts(config, n, r, args.steps).items()},
            "klein_9b": {k: round(v, 3) for k, v in
                         flop_counts(KLEIN_9B, n, r, args.steps).items()},
            "device": str(mx.default_device()),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
