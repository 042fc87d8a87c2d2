"""Inpainting: repaint the white part of a mask, keep the rest of the picture.

    python examples/inpaint.py photo.png mask.png -p "a red balloon"
    python examples/inpaint.py photo.png mask.png -p "the hat from the second picture" \
        --reference hat.png --strength 1.0

The mask has the picture's size: white = repaint, black = keep (grey levels are cut at one
half). As diffusers' Flux2KleinInpaintPipeline: the picture is resized (not cropped) to
multiples of 16, noised to `strength` (default 0.8; 1.0 repaints from pure noise), and after
every step the kept part is put back; the picture itself is also shown to the model as a
reference, and --reference adds more.
"""

import argparse

from bonsai_mlx import Pipeline  # import bonsai_mlx before mlx.core (fast CPU matmuls)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("image", help="the picture to repaint (PNG, JPEG, WebP)")
parser.add_argument("mask", help="white = repaint, black = keep; the picture's size")
parser.add_argument("-p", "--prompt", required=True, help="what to paint in the white area")
parser.add_argument("-m", "--model", default="ternary", help="alias, repo id or folder")
parser.add_argument("--reference", action="append", default=[], help="more reference images")
parser.add_argument("--strength", type=float, default=0.8)
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("-o", "--output", default="inpaint.png")
args = parser.parse_args()

pipe = Pipeline.from_pretrained(args.model, dtype="auto")  # alias, repo id or folder
image = pipe.generate(args.prompt, images=[args.image, *args.reference], mask=args.mask,
                      strength=args.strength, steps=args.steps, seed=args.seed)
image.save(args.output)
print(args.output)
