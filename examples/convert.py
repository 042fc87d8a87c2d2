"""Convert a model to bonsai-mlx's layout: packed binary / ternary transformer, trimmed
text encoder (docs/formats.md). The same as `bonsai-mlx convert SRC DST [--format ...]`.

    python examples/convert.py binary bonsai-binary         # the Bonsai 1-bit pack, lossless
    python examples/convert.py ternary bonsai-ternary       # the ternary pack, lossless
    python examples/convert.py klein-4b klein-ternary --format ternary   # absmean, warns

SRC is an alias, a Hub repo id or a local folder: a Bonsai MLX pack (MLX affine 1-/2-bit,
imported exactly), a `*-unpacked` diffusers folder (packed exactly), or a dense FLUX.2
[klein] folder (post-training absmean quantisation, with a warning: quality drops). Prints
the bytes per component before and after.
"""

import argparse

from bonsai_mlx.convert import convert

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("src", help="alias, repo id or folder")
parser.add_argument("dst", help="output folder (must not exist)")
parser.add_argument("--format", choices=["binary", "ternary"], default=None,
                    help="pack the transformer (default: keep a packed source as it is)")
parser.add_argument("--dense-bits", type=int, choices=[16, 8], default=16,
                    help="8: the non-packed transformer Linear layers as MLX affine 8-bit")
args = parser.parse_args()

report = convert(args.src, args.dst, args.format, dense_bits=args.dense_bits)
print(f"{report.format} transformer ({report.method}) written to {args.dst}")
