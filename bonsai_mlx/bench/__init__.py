"""Benchmarks: seconds per stage, memory over time, on-disk footprint, distance to the peak.

One concern per module: `machine` (the machine and its peak), `flops` (FLOP counts and the
roofline), `memory` (active memory sampling), `synthetic` (full-size models with random
weights), `runner` (`run_bench`: timed runs and their JSON records), `compare` (diffusers +
torch side by side), `report` (the table), `command` (`bonsai-mlx bench`), `profiler`
(seconds per kind of work in a step: `--profile`).
"""

from bonsai_mlx.bench.command import bench_command
from bonsai_mlx.bench.flops import roofline, text_encoder_flops, transformer_flops
from bonsai_mlx.bench.machine import backend, machine_info, peak_tflops
from bonsai_mlx.bench.memory import MemorySampler
from bonsai_mlx.bench.report import SCHEMA, format_table
from bonsai_mlx.bench.runner import BenchTarget, load_target, run_bench
from bonsai_mlx.bench.synthetic import (
    SYNTHETIC_KINDS,
    shipped_bytes,
    synthetic_pipeline,
    synthetic_transformer,
    synthetic_vae,
)

__all__ = [
    "SCHEMA", "SYNTHETIC_KINDS", "BenchTarget", "MemorySampler", "backend", "bench_command",
    "format_table", "load_target", "machine_info", "peak_tflops",
    "roofline", "run_bench", "shipped_bytes", "synthetic_pipeline", "synthetic_transformer",
    "synthetic_vae", "text_encoder_flops", "transformer_flops",
]
