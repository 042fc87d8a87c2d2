"""Peak memory and time of a VAE decode, untiled vs tiled (full FLUX.2 VAE shapes), with the
full decoder or the FLUX.2 small decoder (`--decoder small`).

Random weights (no download needed): the numbers measure memory, speed and how far the
tiled decode is from the untiled one, not images.

    python benchmarks/vae_decode.py --size 2048 --dtype bfloat16          # Apple Silicon
    python benchmarks/vae_decode.py --size 512 --tile-size 256 --dtype float32   # small CPU run
    python benchmarks/vae_decode.py --size 512 --dtype float32 --modes untiled --decoder small

Modes: `untiled`, `exact` (tiled, whole-image GroupNorm statistics summed over tiles: the
default of `decode_tiled`), `estimate` (tiled, statistics from a downscaled decode). Prints
one JSON line per mode: seconds, peak memory above the weights and latents, and for tiled
modes the difference from the untiled output (max |diff| / max |untiled|, mean |diff| /
mean |untiled|) when `untiled` ran first.
"""

from __future__ import annotations

import argparse
import json
import time

import bonsai_mlx  # noqa: F401  (first: OpenBLAS before mlx.core on Linux)
from bonsai_mlx.models.vae import SMALL_DECODER_CHANNELS, VAE, VAEConfig
from bonsai_mlx.weights import parse_dtype

import mlx.core as mx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048, help="image side in pixels")
    ap.add_argument("--tile-size", type=int, default=1024, help="tile side in pixels")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default="untiled,exact,estimate")
    ap.add_argument("--decoder", choices=["full", "small"], default="full",
                    help="decoder channels: FLUX.2's (128..512) or the small decoder's (96..384)")
    args = ap.parse_args()

    mx.random.seed(0)
    small = SMALL_DECODER_CHANNELS if args.decoder == "small" else None
    # weights in the dtype, statistics float32
    vae = VAE(VAEConfig(decoder_block_out_channels=small), parse_dtype(args.dtype))
    mx.eval(vae.parameters())
    f = vae.scale_factor
    z = mx.random.normal((1, args.size // f, args.size // f, vae.config.latent_channels))
    mx.eval(z)

    reference = None
    for mode in args.modes.split(","):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        t0 = time.perf_counter()
        if mode == "untiled":
            out = vae.decode(z, tiled=False)
        else:
            out = vae.decode(z, tiled=True, tile_size=args.tile_size, tile_stats=mode)
        mx.eval(out)
        seconds = time.perf_counter() - t0
        peak = mx.get_peak_memory() - base
        row = {
            "mode": mode, "decoder": args.decoder, "size": args.size, "dtype": args.dtype,
            "tile_size": None if mode == "untiled" else args.tile_size,
            "seconds": round(seconds, 2), "peak_gb": round(peak / 1e9, 3),
            "device": str(mx.default_device()),
        }
        out = out.astype(mx.float32)
        if mode == "untiled":
            reference = out
        elif reference is not None:
            diff = mx.abs(out - reference)
            row["vs_untiled_max"] = float((diff.max() / mx.abs(reference).max()).item())
            row["vs_untiled_mean"] = float((diff.mean() / mx.abs(reference).mean()).item())
        print(json.dumps(row), flush=True)
        del out


if __name__ == "__main__":
    main()
