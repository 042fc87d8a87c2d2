"""Text-to-image: one prompt, a few seeds, timings per stage.

    python examples/generate.py -p "a red fox in the snow, golden hour" --seeds 0 1 2
    python examples/generate.py -p "..." -m black-forest-labs/FLUX.2-klein-4B --size 768x512

Distilled models (FLUX.2 [klein] 4B and its Bonsai packs) default to 4 steps without
guidance; base models to 50 steps with classifier-free guidance 4.0.
"""

import argparse

from bonsai_mlx import Pipeline  # import bonsai_mlx before mlx.core (fast CPU matmuls)
from bonsai_mlx.cli import parse_size

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("-p", "--prompt", required=True)
parser.add_argument("-m", "--model", default="ternary", help="alias, repo id or folder")
parser.add_argument("--size", default="1024x1024", help="WxH, multiples of 16")
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("--seeds", type=int, nargs="+", default=[0])
args = parser.parse_args()

width, height = parse_size(args.size)
pipe = Pipeline.from_pretrained(args.model, dtype="auto")  # alias, repo id or folder
for seed in args.seeds:
    image = pipe.generate(args.prompt, width=width, height=height, steps=args.steps, seed=seed)
    path = f"generate-{seed}.png"
    image.save(path)
    t = pipe.last_timings
    print(f"{path}: encode {t['encode']:.2f} s, {len(t['steps'])} steps "
          f"{sum(t['steps']):.2f} s, decode {t['decode']:.2f} s, "
          f"peak memory {pipe.last_peak_memory / 1e9:.2f} GB")
