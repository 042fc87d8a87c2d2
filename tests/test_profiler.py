"""bonsai_mlx/bench/profiler.py and `bench --profile`: seconds per kind of work in a step."""

import json
import time

from bonsai_mlx import bench
from bonsai_mlx.bench.profiler import KINDS, StepProfiler, format_profile

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner


@pytest.fixture(scope="module")
def tiny_binary():
    model = bench.synthetic_transformer("binary", mx.float32, tiny=True)
    cfg = model.config
    rows, cols = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    img = np.stack([np.zeros(64), rows.ravel(), cols.ravel(), np.zeros(64)], 1).astype(np.int32)
    txt = np.stack([np.zeros(32)] * 3 + [np.arange(32)], 1).astype(np.int32)
    x = mx.random.normal((1, 64, cfg.in_channels))
    c = mx.random.normal((1, 32, cfg.joint_attention_dim))
    return model, (x, c, 0.5, img, txt)


def test_profile_counts_every_layer_of_one_step_by_kind(tiny_binary):
    model, args = tiny_binary
    plain = model(*args)
    with StepProfiler() as prof:
        start = time.perf_counter()
        profiled = model(*args)
        wall = time.perf_counter() - start
    report = prof.report()
    # tiny: 1 double block (12 packed linears, 1 attention) + 1 single (2 packed, 1 attention)
    calls = report["calls"]
    assert calls["linear packed"] == 14
    assert calls["rope"] == 2 * 2  # q and k in each of the 2 attentions
    assert calls["attention"] == 2  # cpu_ops.attention inside _attention is the same one
    assert calls["step"] == 1
    # dense: x_embedder, context_embedder (no ContextMemo passed), 2 timestep MLP layers,
    # 3 modulations, norm_out, proj_out
    assert calls["linear dense"] == 9
    assert set(report["seconds"]) == set(KINDS)
    assert all(s >= 0 for s in report["seconds"].values())
    assert report["seconds"]["linear packed"] > 0 and report["seconds"]["attention"] > 0
    # exclusive times add up to at most the wall time (the report rounds to 0.1 ms)
    assert 0 < report["step"] <= wall + 5e-5
    assert mx.array_equal(plain, profiled)  # timing changes nothing


def test_profiler_restores_the_functions_it_patched(tiny_binary):
    from bonsai_mlx.models import cpu_ops
    from bonsai_mlx.quant.layers import BinaryLinear

    model, args = tiny_binary
    fused = model.norm_out.fused  # the model's own RoPE and modulated norm, patched per model
    before = (BinaryLinear.__call__, cpu_ops.attention, fused.apply_rope, fused.modulated_norm)
    with StepProfiler() as prof:
        assert BinaryLinear.__call__ is not before[0]
        model(*args)
        assert fused.apply_rope is not before[2]
    assert prof.report()["calls"]["rope"] == 4
    assert (BinaryLinear.__call__, cpu_ops.attention, fused.apply_rope,
            fused.modulated_norm) == before
    with StepProfiler() as prof:  # outside a step nothing is counted
        tiny_binary[0].x_embedder(mx.ones((1, 4, tiny_binary[0].config.in_channels)))
    assert prof.report()["step"] == 0 and not prof.report()["calls"]


def test_bench_profile_puts_seconds_per_kind_in_the_record_and_table(tmp_path):
    path = tmp_path / "out.jsonl"
    result = CliRunner().invoke(bench.bench_command, [
        "--tiny", "--synthetic", "binary", "--steps", "1", "--repeats", "1", "--warmup", "0",
        "--profile", "--json", str(path)])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    prof = record["profile"]
    assert set(prof["seconds"]) == set(KINDS) and prof["vae_decode"] > 0
    assert prof["calls"]["linear packed"] == 14 and prof["calls"]["vae decode"] == 1
    assert "--profile" in record["command"]
    assert record["seconds"]["steps"] and len(record["seconds"]["steps"]) == 1
    assert format_profile(prof).splitlines()[0] in result.output
    # --dtype defaults to auto: float32 on the CPU, bfloat16 on a GPU
    assert record["dtype"] == ("float32" if mx.default_device() == mx.cpu else "bfloat16")
