"""Runs on every rank for tests/test_distributed.py (under `mlx.launch`, or started directly
with MLX_RANK / MLX_HOSTFILE); writes this rank's results under OUT, and the test compares
them with single-process references it computes itself.

    python distributed_worker.py OUT compare PIPELINE MODEL...  tensor-parallel transformer
        outputs of each MODEL folder, Pipeline.generate data- and tensor-parallel, and a
        tensor-parallel tiny `bench` run (its records, as rank 0 returns them)
    python distributed_worker.py OUT die-at CALL GEN-ARGS  `bonsai-mlx gen`; rank 1 exits
        inside its CALL-th transformer call
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bonsai_mlx import distributed
from bonsai_mlx.models.transformer import Flux2Transformer
from bonsai_mlx.pipeline import Pipeline

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

PROMPTS = ["a red fox in the snow", "a blue bird", "a green frog"]
SIZE = {"width": 64, "height": 48}


def transformers(out: Path, folders: list[str]) -> None:
    group = distributed.world()
    inputs = dict(np.load(out / "inputs.npz"))
    for folder in map(Path, folders):
        model = Flux2Transformer.from_pretrained(folder, dtype="float32",
                                                 affine_baseline=folder.name == "affine")
        distributed.shard_transformer(model, group)
        y = model(inputs["hidden_states"], inputs["encoder_hidden_states"],
                  inputs["timestep"], inputs["img_ids"], inputs["txt_ids"])
        np.save(out / f"{folder.name}-rank{group.rank()}.npy", np.array(y))
        nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        (out / f"{folder.name}-rank{group.rank()}.json").write_text(json.dumps(nbytes))


def pipelines(out: Path, folder: str) -> None:
    rank = distributed.world().rank()
    reference = Path(folder).parent / "reference.png"
    data = Pipeline.from_pretrained(folder, dtype="float32", data_parallel=True,
                                    keep_text_encoder=True)
    runs = {
        "data-batch": lambda: data.generate(PROMPTS, seed=5, **SIZE,
                                            output_type="np"),
        "data-small-batch": lambda: data.generate(PROMPTS[0], seed=6, **SIZE,
                                                  output_type="np"),
        "data-editing": lambda: data.generate(PROMPTS[0], num_images=2, seed=7,
                                              images=[reference],
                                              output_type="np"),
    }
    tensor = Pipeline.from_pretrained(folder, dtype="float32", tensor_parallel=True,
                                      keep_text_encoder=True)
    decodes, decode = [0], tensor.vae.decode

    def counted_decode(*args, **kwargs):
        decodes[0] += 1
        return decode(*args, **kwargs)

    tensor.vae.decode = counted_decode
    runs["tensor"] = lambda: tensor.generate(PROMPTS[0], seed=8, **SIZE, output_type="np")
    runs["tensor-random-seed"] = lambda: tensor.generate(PROMPTS[1], **SIZE, output_type="np")
    for name, run in runs.items():
        t0 = time.perf_counter()
        np.save(out / f"{name}-rank{rank}.npy", run())
        print(f"rank {rank}: {name} {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    (out / f"tensor-rank{rank}.json").write_text(json.dumps({
        "seed": tensor.last_seed, "decodes": decodes[0],
        "text_encoder_loads": tensor.prompt_encoder.loads}))


def benchmark(out: Path) -> None:
    from bonsai_mlx import bench

    records = bench.run_bench(synthetic="bf16", tiny=True, steps=2, repeats=1, warmup=0,
                              dtype="float32", tensor_parallel=True, log=lambda s: None)
    if distributed.world().rank() == 0:
        (out / "bench.json").write_text(json.dumps(records))


def die_at(call: int, gen_args: list[str]) -> None:
    """`bonsai-mlx gen`, with rank 1 exiting abruptly inside its `call`-th transformer call."""
    from bonsai_mlx import cli

    if distributed.world().rank() == 1:
        forward = Flux2Transformer.__call__
        calls = [0]

        def dying(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == call:
                os._exit(3)
            return forward(self, *args, **kwargs)

        Flux2Transformer.__call__ = dying
    cli.main(["gen", *gen_args])


def main(argv: list[str]) -> None:
    out, task, *rest = argv
    mx.random.seed(0)
    if task == "compare":
        transformers(Path(out), rest[1:])
        pipelines(Path(out), rest[0])
        benchmark(Path(out))
    elif task == "die-at":
        die_at(int(rest[0]), rest[1:])
    else:
        raise SystemExit(f"unknown task {task}")


if __name__ == "__main__":
    main(sys.argv[1:])
