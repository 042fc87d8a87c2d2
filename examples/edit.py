"""Editing with reference images (FLUX.2 multi-reference editing).

    python examples/edit.py photo.jpg -p "make it a snowy winter evening"
    python examples/edit.py person.jpg jacket.jpg -p "the person wears the jacket"

Each reference is shrunk to at most 1 megapixel and cropped to multiples of 16, encoded by
the VAE and attended to by every denoising step; it is never noised. The output takes the
first reference's size unless --size is given.
"""

import argparse

from bonsai_mlx import Pipeline  # import bonsai_mlx before mlx.core (fast CPU matmuls)
from bonsai_mlx.cli import parse_size

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("images", nargs="+", help="reference pictures (PNG, JPEG, WebP)")
parser.add_argument("-p", "--prompt", required=True, help="the edit to make")
parser.add_argument("-m", "--model", default="ternary", help="alias, repo id or folder")
parser.add_argument("--size", default=None, help="WxH (default: the first image's)")
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("-o", "--output", default="edit.png")
args = parser.parse_args()

width, height = parse_size(args.size) if args.size else (None, None)
pipe = Pipeline.from_pretrained(args.model, dtype="auto")  # alias, repo id or folder
image = pipe.generate(args.prompt, images=args.images, width=width, height=height,
                      steps=args.steps, seed=args.seed)
image.save(args.output)
print(args.output)
