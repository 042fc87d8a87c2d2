"""Image-to-image: start from a picture, keep its composition, change its look.

    python examples/img2img.py photo.jpg -p "an oil painting, thick brush strokes"
    python examples/img2img.py photo.jpg -p "..." --strength 0.4   # closer to the photo

`strength` in (0, 1]: how much of the schedule runs. The input is encoded by the VAE,
noised to the matching noise level and denoised from there; 1.0 ignores the picture, small
values change little. Output size: the input's, resized to <= 1 megapixel and rounded to
multiples of 16 (or --size).
"""

import argparse

from bonsai_mlx import Pipeline  # import bonsai_mlx before mlx.core (fast CPU matmuls)
from bonsai_mlx.cli import parse_size

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("image", help="the starting picture (PNG, JPEG, WebP)")
parser.add_argument("-p", "--prompt", required=True)
parser.add_argument("-m", "--model", default="ternary", help="alias, repo id or folder")
parser.add_argument("--strength", type=float, default=0.6)
parser.add_argument("--size", default=None, help="WxH (default: from the input image)")
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("-o", "--output", default="img2img.png")
args = parser.parse_args()

width, height = parse_size(args.size) if args.size else (None, None)
pipe = Pipeline.from_pretrained(args.model, dtype="auto")  # alias, repo id or folder
image = pipe.generate(args.prompt, images=[args.image], strength=args.strength,
                      width=width, height=height, steps=args.steps, seed=args.seed)
image.save(args.output)
print(args.output)
