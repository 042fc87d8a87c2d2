"""A full-width FLUX.2 [klein] slice through diffusers and bonsai-mlx in one process.

    PYTHONPATH=. /work/refvenv/bin/python benchmarks/cpu_slice.py   # needs torch + diffusers
    PYTHONPATH=. /work/refvenv/bin/python benchmarks/cpu_slice.py --profile --repeats 5

The slice: Klein 4B's widths (24 heads x 128, MLP 9,216, text 7,680 wide) with 1 double and
2 single blocks, at the 512x512 token counts (1,024 image + 512 text tokens), float32, random
weights (torch's default init, the same in both), one forward = one denoising
step of the slice. Sides, timed in turn in each round so that load changes hit all alike:

- `diffusers`: `Flux2Transformer2DModel` in torch (CPU, torch's own threads and BLAS);
- `dense`: our `Flux2Transformer` holding the same float32 weights;
- `binary`, `ternary`: the same model with the 14 block linears packed (absmean, as
  `quantize_model` does for a model not trained for them) and run on the CPU packed path.

Prints the median seconds per forward (after `--warmup` untimed rounds), ours / diffusers,
and how far the dense output is from diffusers'. Targets (issue #16): dense <= 1.0x,
packed <= 1.2x. `--profile` adds our seconds per kind of work (bonsai_mlx/bench/profiler.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import bonsai_mlx  # noqa: F401  (OpenBLAS before mlx.core)
from bonsai_mlx._blas import openblas_status
from bonsai_mlx.bench.profiler import StepProfiler, format_profile
from bonsai_mlx.models import Flux2Transformer
from bonsai_mlx.quant.model import quantize_model
from bonsai_mlx.weights import load_into

import mlx.core as mx
import numpy as np

CONFIG = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=1, num_single_layers=2,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
    timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
SIDES = ("diffusers", "dense", "binary", "ternary")


def slice_inputs(side: int = 32, n_txt: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """Image tokens for a side x side latent grid (512x512 pixels: 32), n_txt text tokens."""
    g = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    img_ids = np.zeros((side * side, 4), np.int64)
    img_ids[:, 1], img_ids[:, 2] = rows.ravel(), cols.ravel()
    txt_ids = np.zeros((n_txt, 4), np.int64)
    txt_ids[:, 3] = np.arange(n_txt)
    return dict(
        hidden_states=g.standard_normal((1, side * side, CONFIG["in_channels"]), np.float32),
        encoder_hidden_states=g.standard_normal((1, n_txt, CONFIG["joint_attention_dim"]),
                                                np.float32),
        timestep=np.array([0.75], np.float32), img_ids=img_ids, txt_ids=txt_ids,
    )


def torch_model(torch, seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)  # torch's default init: linears U(+-1/sqrt(fan_in)), norms 1
    return Flux2Transformer2DModel(**CONFIG).eval()


def our_model(weights: dict[str, np.ndarray], fmt: str | None) -> Flux2Transformer:
    model = Flux2Transformer(CONFIG, dtype="float32")
    load_into(model, {k: mx.array(v) for k, v in weights.items()}, "the slice")
    if fmt:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights are not binary/ternary-valued
            quantize_model(model, fmt)
        mx.eval(model.parameters())
    return model


def runners(sides, torch, inputs):
    """side -> a function running one forward and returning its output as numpy."""
    tm = torch_model(torch)
    weights = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    t_in = {k: torch.from_numpy(v) for k, v in inputs.items()}
    m_in = {k: mx.array(v) if k in ("hidden_states", "encoder_hidden_states") else v
            for k, v in inputs.items()}

    def torch_forward():
        with torch.inference_mode():
            return tm(**t_in, return_dict=False)[0].numpy()

    def ours(model):
        def forward():
            out = model(m_in["hidden_states"], m_in["encoder_hidden_states"],
                        m_in["timestep"], m_in["img_ids"], m_in["txt_ids"])
            mx.eval(out)
            return out

        return forward

    run = {"diffusers": torch_forward} if "diffusers" in sides else {}
    for side in sides:
        if side != "diffusers":
            run[side] = ours(our_model(weights, None if side == "dense" else side))
    if "diffusers" not in sides:
        del tm
    return run


def time_sides(run, warmup: int, repeats: int) -> tuple[dict[str, list[float]], dict]:
    times = {side: [] for side in run}
    outputs = {}
    for r in range(warmup + repeats):
        for side, forward in run.items():
            start = time.perf_counter()
            out = forward()
            dt = time.perf_counter() - start
            if r >= warmup:
                times[side].append(dt)
            outputs[side] = out
    return times, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of "
                    + ", ".join(SIDES))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="our seconds per kind of work")
    ap.add_argument("--json", help="append one JSON record to this file")
    args = ap.parse_args()
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    import torch

    inputs = slice_inputs()
    run = runners(sides, torch, inputs)
    load = os.getloadavg()
    times, outputs = time_sides(run, args.warmup, args.repeats)
    load_after = os.getloadavg()
    med = {side: statistics.median(t) for side, t in times.items()}
    blas = openblas_status()
    print(f"slice: 1 double + 2 single blocks, width 3072, 1024 image + 512 text tokens, "
          f"float32; torch {torch.__version__} ({torch.get_num_threads()} threads), MLX "
          f"{mx.__version__}, OpenBLAS core {blas['corename']}"
          f"{' (forced)' if blas['coretype'] else ''}; load {load[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'side':<10} {'median s':>9} {'min s':>7}  {'vs diffusers':>12}")
    base = med.get("diffusers")
    for side, s in med.items():
        ratio = f"{s / base:.2f}x" if base else "-"
        print(f"{side:<10} {s:>9.2f} {min(times[side]):>7.2f}  {ratio:>12}")
    record = {"seconds": times, "median": med, "load": [load[0], load_after[0]],
              "openblas": blas, "torch_threads": torch.get_num_threads()}
    if base and "dense" in outputs:
        ref, got = outputs["diffusers"], np.array(outputs["dense"])
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        record["dense_max_rel_diff"] = rel
        print(f"dense vs diffusers: max |diff| / max |ref| = {rel:.2e}")
    if args.profile:
        record["profile"] = {}
        for side, forward in run.items():
            if side == "diffusers":
                continue
            with StepProfiler() as prof:
                forward()
            record["profile"][side] = prof.report()
            print(f"\n{side} (one profiled forward)\n{format_profile(prof.report())}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
