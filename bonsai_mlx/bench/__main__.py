"""`python -m bonsai_mlx.bench ...` is `bonsai-mlx bench ...`."""

import sys

from bonsai_mlx.cli import main

main(["bench", *sys.argv[1:]])
