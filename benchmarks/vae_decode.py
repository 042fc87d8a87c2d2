"""Peak memory and time of a VAE decode, untiled vs tiled (full FLUX.2 VAE shapes).

Random weights (no download needed): the numbers measure memory and speed, not images.

    python benchmarks/vae_decode.py --size 2048 --dtype bfloat16          # Apple Silicon
    python benchmarks/vae_decode.py --size 512 --tile-size 256 --tile-overlap 64 \
        --dtype float32                                                   # small CPU run

Prints one JSON line per mode, then the tiled-vs-untiled difference (relative to
max|untiled|; random weights make it larger than for the trained VAE).
"""

from __future__ import annotations  # noqa: I001  (bonsai_mlx must be imported before mlx)

import argparse
import json
import time

import bonsai_mlx  # noqa: F401  (first: OpenBLAS before mlx.core on Linux)
import mlx.core as mx

from bonsai_mlx.models.vae import VAE, VAEConfig
from bonsai_mlx.weights import parse_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels")
    ap.add_argument("--tile-size", type=int, default=1024, help="tile side in pixels")
    ap.add_argument("--tile-overlap", type=int, default=128, help="tile overlap in pixels")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default="untiled,tiled")
    args = ap.parse_args()

    mx.random.seed(0)
    vae = VAE(VAEConfig(), parse_dtype(args.dtype))
    vae._cast_weights()
    mx.eval(vae.parameters())
    f = vae.scale_factor
    z = mx.random.normal((1, args.size // f, args.size // f, vae.config.latent_channels))
    mx.eval(z)

    outputs = {}
    for mode in args.modes.split(","):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        t0 = time.perf_counter()
        out = vae.decode(
            z, tiled=mode == "tiled", tile_size=args.tile_size, tile_overlap=args.tile_overlap
        )
        mx.eval(out)
        seconds = time.perf_counter() - t0
        peak = mx.get_peak_memory() - base
        outputs[mode] = out
        print(json.dumps({
            "mode": mode, "size": args.size, "dtype": args.dtype,
            "tile_size": args.tile_size if mode == "tiled" else None,
            "tile_overlap": args.tile_overlap if mode == "tiled" else None,
            "seconds": round(seconds, 2), "peak_gb": round(peak / 1e9, 3),
            "device": str(mx.default_device()),
        }), flush=True)

    if len(outputs) == 2:
        a, b = (outputs[k].astype(mx.float32) for k in ("untiled", "tiled"))
        scale = mx.abs(a).max()
        print(json.dumps({
            "tiled_vs_untiled_max": round((mx.abs(a - b).max() / scale).item(), 4),
            "tiled_vs_untiled_mean": round((mx.abs(a - b).mean() / mx.abs(a).mean()).item(), 4),
        }))


if __name__ == "__main__":
    main()
