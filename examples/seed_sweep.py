"""One prompt, many seeds: the prompt is encoded once and reused from the cache.

    python examples/seed_sweep.py                       # ternary Bonsai, 8 seeds, 512x512
    python examples/seed_sweep.py -m FOLDER --seeds 4 --size 256x256

The text encoder (Qwen3-4B) is the slowest part to load; `encode_prompt` runs it once and
the pipeline's prompt encoder keeps the embedding in its cache, so every `generate` below
starts straight at the denoising steps (`encode` ~0 s in the printed timings).
"""

import argparse
from pathlib import Path

from bonsai_mlx import Pipeline  # import bonsai_mlx before mlx.core (fast CPU matmuls)
from bonsai_mlx.cli import parse_size

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("-m", "--model", default="ternary", help="alias, repo id or folder")
parser.add_argument("-p", "--prompt",
                    default="a bonsai tree on a windowsill, soft morning light, 35mm photo")
parser.add_argument("--seeds", type=int, default=8)
parser.add_argument("--size", default="512x512")
parser.add_argument("--steps", type=int, default=None)
parser.add_argument("-o", "--output", default="seed_sweep")
args = parser.parse_args()

width, height = parse_size(args.size)
out = Path(args.output)
out.mkdir(parents=True, exist_ok=True)

# bfloat16 on Apple / CUDA GPUs, float32 on CPUs (where bfloat16 matmuls are slow)
pipe = Pipeline.from_pretrained(args.model, dtype="auto")  # alias, repo id or folder
pipe.encode_prompt(args.prompt)  # encode once; generate() finds it in the cache

for seed in range(args.seeds):
    image = pipe.generate(args.prompt, width=width, height=height, steps=args.steps, seed=seed)
    path = out / f"seed-{seed}.png"
    image.save(path)
    t = pipe.last_timings
    print(f"{path}: encode {t['encode']:.2f} s, {len(t['steps'])} steps "
          f"{sum(t['steps']):.2f} s, decode {t['decode']:.2f} s")
