"""Run the benchmark without installing the CLI: same code as `bonsai-mlx bench`.

    python benchmarks/bench.py --tiny
    python benchmarks/bench.py --synthetic ternary --size 512x512
    python benchmarks/bench.py ternary --size 1024x1024 --json results.jsonl

Options: `python benchmarks/bench.py --help`; what each benchmark measures: README.md here.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout, not installed

from bonsai_mlx.cli import main  # noqa: E402  (bonsai_mlx first: OpenBLAS before mlx.core)

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
