"""The FLUX.2 small decoder: the same images from a VAE decoder with 3/4 of the channels
(black-forest-labs/FLUX.2-small-decoder, ~1.4x faster decoding, less memory).

    python examples/small_decoder.py -p "a bonsai tree in the mist"
    python examples/small_decoder.py -p "..." -m klein-4b --save klein-small   # write a copy

`vae="small"` swaps only the decoder: editing and image-to-image still encode with the
model's own encoder. Prints the decode time and the peak memory while decoding for both
decoders; --save writes the model with the small decoder (`bonsai-mlx convert --vae small`).
"""

import argparse

from bonsai_mlx import Pipeline  # import bonsai_mlx before mlx.core (fast CPU matmuls)
from bonsai_mlx.convert import convert

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("-p", "--prompt", required=True)
parser.add_argument("-m", "--model", default="ternary", help="alias, repo id or folder")
parser.add_argument("--size", type=int, default=1024, help="side in pixels")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--save", default=None, help="also write the model with the small decoder")
args = parser.parse_args()

for vae in (None, "small"):
    pipe = Pipeline.from_pretrained(args.model, dtype="auto", vae=vae)
    image = pipe.generate(args.prompt, width=args.size, height=args.size, seed=args.seed)
    name = f"decoder-{vae or 'full'}.png"
    image.save(name)
    print(f"{name}: decode {pipe.last_timings['decode']:.2f} s, "
          f"{pipe.last_decode_peak_memory / 1e9:.2f} GB peak while decoding")
if args.save:
    convert(args.model, args.save, vae="small")
