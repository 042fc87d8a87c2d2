"""Convert a model to bonsai-mlx's packed binary or ternary transformer (docs/formats.md).

    python examples/convert.py binary bonsai-binary            # the Bonsai 1-bit MLX pack
    python examples/convert.py ternary bonsai-ternary --format ternary
    python examples/convert.py FOLDER_OR_REPO OUT --format ternary --dense-bits 8

SRC is an alias, a Hub repo id or a local folder: a Bonsai MLX pack (MLX affine 1-/2-bit,
imported exactly), a `*-unpacked` diffusers folder, or a dense FLUX.2 [klein] folder
(quantised with absmean scales). The same as `bonsai-mlx convert SRC DST --format ...`.
"""

import argparse
import sys
from pathlib import Path

from bonsai_mlx.cli import describe_folder, resolve_model

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("src", help="alias, repo id or folder")
parser.add_argument("dst", help="output folder (a complete pipeline folder)")
parser.add_argument("--format", choices=["binary", "ternary"], default="binary")
parser.add_argument("--dense-bits", type=int, choices=[16, 8], default=16,
                    help="8: also store the non-packed linear layers as MLX 8-bit")
args = parser.parse_args()

try:
    from bonsai_mlx.convert import convert
except ModuleNotFoundError:
    sys.exit("bonsai_mlx.convert is not in this version of bonsai-mlx yet; update it")

convert(resolve_model(args.src), args.dst, format=args.format, dense_bits=args.dense_bits)

# What was written, component by component (reads only headers and file sizes)
for c in describe_folder(Path(args.dst)):
    print(f"{c.name:<28} {c.format:<60} {c.bytes / 1e6:10.1f} MB")
