"""Distributed generation: two ranks of `mlx.launch --backend ring` on this machine against
single-process references computed here, and the sharding arithmetic in one process."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

from bonsai_mlx import distributed
from bonsai_mlx.cli import cli
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.transformer import (
    Flux2Transformer,
    Flux2TransformerConfig,
    packed_layer_paths,
)
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.quant import quantize_model
from bonsai_mlx.quant.model import get_module
from bonsai_mlx.weights import save_safetensors, write_json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures" / "pipeline"
TINY = FIXTURES / "distilled"
WORKER = Path(__file__).with_name("distributed_worker.py")
LAUNCHER = Path(sys.executable).with_name("mlx.launch")
TIMEOUT_S = 300
# Every packed input split in whole groups of 128 over two ranks: inner dim 256 (8 heads of
# 32), MLP 768.
TP_CONFIG = Flux2TransformerConfig(
    in_channels=16, joint_attention_dim=32, attention_head_dim=32, num_attention_heads=8,
    num_layers=1, num_single_layers=1, axes_dims_rope=(8, 8, 8, 8),
    timestep_guidance_channels=32)
FORMATS = ("dense", "binary", "ternary", "affine")
SLICED = "single_transformer_blocks.0.attn.to_out"  # inputs [attention | MLP]
FUSED = "single_transformer_blocks.0.attn.to_qkv_mlp_proj"  # outputs [q | k | v | gate | up]

launched = pytest.mark.skipif(not LAUNCHER.is_file(), reason="mlx.launch not installed")


class FakeGroup:
    """The rank and size of a group, for the arithmetic that needs no communication."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


# ----------------------------------------------------------------------------------------
# Models and processes


def write_tp_models(root: Path) -> Path:
    """The same random transformer as dense, binary, ternary (our layout) and MLX affine
    2-bit (a Bonsai pack, loaded with affine_baseline) folders."""
    mx.random.seed(3)
    model = Flux2Transformer(TP_CONFIG, dtype="float32")
    model.update(tree_map(lambda v: v * 4, model.parameters()))  # livelier outputs
    mx.eval(model.parameters())
    model.save_pretrained(root / "dense")
    for fmt in ("binary", "ternary"):
        packed = Flux2Transformer.from_pretrained(root / "dense", dtype="float32")
        with pytest.warns(UserWarning, match="post-training"):
            quantize_model(packed, fmt)
        packed.save_pretrained(root / fmt)
    tensors = dict(tree_flatten(model.parameters()))
    for path in distributed_layer_paths():
        w = tensors.pop(f"{path}.weight")
        q = mx.quantize(w, group_size=128, bits=2)
        tensors.update(zip([f"{path}.{p}" for p in ("weight", "scales", "biases")], q,
                           strict=True))
    (root / "affine").mkdir()
    save_safetensors(root / "affine" / "diffusion_pytorch_model.safetensors", tensors,
                     metadata={"format": "mlx"})
    write_json(root / "affine" / "config.json", TP_CONFIG.to_dict())
    write_json(root / "affine" / "quantization_config.json", {"bits": 2, "group_size": 128})
    return root


def distributed_layer_paths() -> list[str]:
    """The sharded layers: every linear layer of the blocks (the ones binary / ternary pack)."""
    return packed_layer_paths(TP_CONFIG.num_layers, TP_CONFIG.num_single_layers)


def load_tp(root: Path, fmt: str) -> Flux2Transformer:
    return Flux2Transformer.from_pretrained(root / fmt, dtype="float32",
                                            affine_baseline=fmt == "affine")


def tp_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_img, n_txt = 12, 5
    img_ids = np.stack(np.meshgrid(np.arange(1), np.arange(3), np.arange(4), np.arange(1),
                                   indexing="ij"), -1).reshape(-1, 4)
    txt_ids = np.zeros((n_txt, 4), np.int32)
    txt_ids[:, 3] = np.arange(n_txt)
    return {
        "hidden_states": rng.standard_normal((2, n_img, 16)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((2, n_txt, 32)).astype(np.float32),
        "timestep": np.array([0.3, 0.8], np.float32),
        "img_ids": img_ids.astype(np.int32),
        "txt_ids": txt_ids,
    }


def free_ports(n: int) -> int:
    """A base port with n consecutive free ports (mlx.launch's ring uses base + rank)."""
    for _ in range(100):
        base = random.randint(20000, 60000 - n)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def run_all(commands: list[list[str]], cwd: Path, envs: list[dict] | None = None,
            timeout: float = TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Run processes side by side, each in its own process group; past the timeout every
    group is killed (so no rank outlives the test) and the test fails."""
    envs = envs or [{}] * len(commands)
    procs = [subprocess.Popen(c, cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1", **e},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for c, e in zip(commands, envs,
                                                                      strict=True)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out after {timeout} s (a rank hung): {commands}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e)
            for p, (o, e) in zip(procs, outs, strict=True)]


BIND_FAILED = "Couldn't bind socket"  # another process took a port we found free


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`mlx.launch --backend ring -n 2` on localhost; every rank must exit 0 (mlx.launch
    itself exits 0 either way and only warns)."""
    for _ in range(3):
        cmd = [str(LAUNCHER), "--backend", "ring", "-n", "2", "--starting-port",
               str(free_ports(2)), "--python", sys.executable, "--", *args]
        (result,) = run_all([cmd], cwd)
        if BIND_FAILED not in result.stderr:
            break
    assert result.returncode == 0, result.stderr
    assert "exited with code" not in result.stderr and "was killed" not in result.stderr, (
        result.stderr)
    return result


def gen_args(out: Path, *extra: str) -> list[str]:
    return ["-m", str(TINY), "--size", "64x48", "-p", "a red fox in the snow", "-o", f"{out}/",
            "-q", *extra]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tp_models(tmp_path_factory) -> Path:
    return write_tp_models(tmp_path_factory.mktemp("tp-models"))


# ----------------------------------------------------------------------------------------
# One process: shares, sharding arithmetic, errors


def test_shares_cover_every_item_once_in_rank_order():
    for size in range(1, 5):
        for n in range(10):
            shares = [distributed.share(n, FakeGroup(r, size)) for r in range(size)]
            assert [i for s in shares for i in range(n)[s]] == list(range(n))
            lengths = [s.stop - s.start for s in shares]
            assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_shards_recombine_to_the_unsharded_layers(tp_models, fmt, monkeypatch):
    """Rank r of 2 keeps part r of each segment: the fused projection's output rows
    [q | k | v | gate | up], the output projection's inputs [attention | MLP], whose partial
    products add up (all_sum) to the full one. Binary and ternary (re-packed) too."""
    monkeypatch.setattr(distributed, "all_sum", lambda x, group: x)  # one rank's part
    full = load_tp(tp_models, fmt)
    shards = [distributed.shard_transformer(load_tp(tp_models, fmt), FakeGroup(r, 2))
              for r in range(2)]
    dim, hidden = TP_CONFIG.inner_dim, TP_CONFIG.mlp_hidden_dim
    x = mx.random.normal((3, dim + hidden), key=mx.random.key(1))

    y = np.array(get_module(full, SLICED)(x))
    inputs = [mx.array(np.r_[r * 128:(r + 1) * 128, 256 + r * 384:256 + (r + 1) * 384])
              for r in range(2)]  # rank r's attention heads and MLP features
    parts = [np.array(get_module(s, SLICED)(x[:, i])) for s, i in zip(shards, inputs,
                                                                       strict=True)]
    assert relative_error(parts[0] + parts[1], y) < 1e-5

    y = np.array(get_module(full, FUSED)(x[:, :dim]))
    bounds = [0, dim, 2 * dim, 3 * dim, 3 * dim + hidden, 3 * dim + 2 * hidden]
    for r, s in enumerate(shards):
        rows = np.concatenate([np.arange(lo + r * (hi - lo) // 2, lo + (r + 1) * (hi - lo) // 2)
                               for lo, hi in zip(bounds[:-1], bounds[1:], strict=False)])
        out = np.array(get_module(s, FUSED)(x[:, :dim]))
        assert relative_error(out, y[:, rows]) < 1e-5
        assert s.single_transformer_blocks[0].attn.mlp_hidden == hidden // 2


def test_sharding_needs_whole_heads_and_whole_groups(tp_models):
    with pytest.raises(BonsaiError, match="8 attention heads .* over 3 ranks"):
        distributed.shard_transformer(load_tp(tp_models, "dense"), FakeGroup(0, 3))
    # 4 ranks: 64 inputs of an attention output projection each, half a packed group
    with pytest.raises(BonsaiError, match=r"transformer_blocks\.0\.attn\.to_out\.0: .* "
                                          "whole groups of 128"):
        distributed.shard_transformer(load_tp(tp_models, "ternary"), FakeGroup(0, 4))
    distributed.shard_transformer(load_tp(tp_models, "dense"), FakeGroup(0, 4))  # any split


def test_collectives_on_one_process_return_their_input():
    group = distributed.world()
    assert group.size() == 1
    x = mx.arange(6).reshape(2, 3)
    assert distributed.broadcast(x, group) is x
    assert distributed.gather_rows(x, group) is x
    assert distributed.broadcast_ints([3, 2**64 - 1], group) == [3, 2**64 - 1]
    assert distributed.gather_json({"a": 1}, group) == [{"a": 1}]
    made = list(distributed.map_in_rounds([1, 2, 3], lambda i: mx.array([i * 10]), group))
    assert [(i, int(v[0])) for i, v in made] == [(1, 10), (2, 20), (3, 30)]


def test_a_lost_peer_is_one_user_error_naming_the_rank():
    with pytest.raises(BonsaiError, match=r"rank 1 of 2: \[ring\] connection to a peer"):
        with distributed.peer_errors(FakeGroup(1, 2)):
            raise RuntimeError("[ring] connection to a peer was lost")
    with pytest.raises(RuntimeError, match="something else"):
        with distributed.peer_errors(FakeGroup(1, 2)):
            raise RuntimeError("something else")


def test_a_tensor_parallel_pipeline_is_not_saved(tmp_path):
    pipe = Pipeline.from_pretrained(TINY, dtype="float32")
    pipe.parallel = distributed.Parallel("tensor", FakeGroup(0, 2))
    with pytest.raises(BonsaiError, match="one rank's shard"):
        pipe.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(BonsaiError, match="not both"):
        Pipeline.from_pretrained(TINY, tensor_parallel=True, data_parallel=True)


def test_lora_and_tensor_parallel_is_one_user_error(tmp_path):
    result = CliRunner().invoke(cli, ["gen", *gen_args(tmp_path), "--lora", "ink.safetensors",
                                      "--tensor-parallel"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: --lora and --tensor-parallel do not combine yet: a LoRA is not sharded; leave "
        "out --tensor-parallel (each process then makes a share of the images with the LoRA)"]


# ----------------------------------------------------------------------------------------
# Two ranks of mlx.launch


@launched
@pytest.mark.slow
def test_data_parallel_gen_writes_the_files_one_process_writes(tmp_path):
    """`--seeds 3` over two ranks: rank 0's random seeds, rank 0 writes all three files
    (stdout lists them once), byte for byte those of a single process with those seeds."""
    result = launch(["-m", "bonsai_mlx.cli", "gen", *gen_args(tmp_path / "launched"),
                     "--seeds", "3"], tmp_path)
    written = [Path(line) for line in result.stdout.split()]
    assert len(written) == 3 and sorted(written) == sorted((tmp_path / "launched").iterdir())
    seeds = [json.loads(Image.open(p).text["seed"]) for p in written]
    assert len(set(seeds)) == 3
    single = CliRunner().invoke(cli, ["gen", *gen_args(tmp_path / "single"),
                                      *[a for s in seeds for a in ("--seed", str(s))]])
    assert single.exit_code == 0, single.output
    assert [Path(p).name for p in single.stdout.split()] == [p.name for p in written]
    for p in written:
        assert p.read_bytes() == (tmp_path / "single" / p.name).read_bytes(), p.name


@launched
@pytest.mark.slow
def test_tensor_parallel_gen_matches_one_process(tmp_path):
    result = launch(["-m", "bonsai_mlx.cli", "gen", *gen_args(tmp_path / "launched"),
                     "--seed", "1", "--seed", "2", "--tensor-parallel"], tmp_path)
    single = CliRunner().invoke(cli, ["gen", *gen_args(tmp_path / "single"),
                                      "--seed", "1", "--seed", "2"])
    assert single.exit_code == 0, single.output
    names = [Path(p).name for p in single.stdout.split()]
    assert [Path(p).name for p in result.stdout.split()] == names
    for name in names:
        ours, ref = tmp_path / "launched" / name, tmp_path / "single" / name
        assert np.abs(pixels(ours) - pixels(ref)).max() <= 1  # float32 rounding, then uint8
        assert Image.open(ours).text == Image.open(ref).text


@pytest.fixture(scope="module")
def worker_results(tp_models, tmp_path_factory) -> Path:
    """One launch of the worker: sharded transformer outputs, then Pipeline.generate
    data- and tensor-parallel."""
    if not LAUNCHER.is_file():
        pytest.skip("mlx.launch not installed")
    out = tmp_path_factory.mktemp("worker")
    np.savez(out / "inputs.npz", **tp_inputs())
    launch([str(WORKER), str(out), "compare", str(TINY),
            *[str(tp_models / f) for f in FORMATS]], out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_parallel_transformer_matches_unsharded(worker_results, tp_models, fmt):
    inputs = tp_inputs()
    model = load_tp(tp_models, fmt)
    ref = np.array(model(inputs["hidden_states"], inputs["encoder_hidden_states"],
                         inputs["timestep"], inputs["img_ids"], inputs["txt_ids"]))
    full_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    sharded_bytes = sum(v.nbytes for p in distributed_layer_paths()
                        for _, v in tree_flatten(get_module(model, p).parameters()))
    for rank in range(2):
        out = np.load(worker_results / f"{fmt}-rank{rank}.npy")
        assert relative_error(out, ref) <= 1e-5, (fmt, rank, relative_error(out, ref))
        # each rank holds half of every sharded layer (ternary rows re-packed: +- a byte)
        held = json.loads((worker_results / f"{fmt}-rank{rank}.json").read_text())
        assert held == pytest.approx(full_bytes - sharded_bytes / 2, rel=0.01)


@pytest.mark.slow
def test_data_parallel_generate_matches_one_process(worker_results):
    """Each rank denoises its rows of the batch; the gathered images equal the single
    batch's within float32 rounding (a smaller batch is a smaller matmul: ~3e-6 here)."""
    from distributed_worker import PROMPTS, SIZE

    pipe = Pipeline.from_pretrained(TINY, dtype="float32")
    refs = {
        "data-batch": pipe.generate(PROMPTS, seed=5, **SIZE, output_type="np"),
        "data-small-batch": pipe.generate(PROMPTS[0], seed=6, **SIZE, output_type="np"),
        "data-editing": pipe.generate(PROMPTS[0], num_images=2, seed=7,
                                      images=[FIXTURES / "reference.png"], output_type="np"),
    }
    for name, ref in refs.items():
        for rank in range(2):
            out = np.load(worker_results / f"{name}-rank{rank}.npy")
            assert out.shape == ref.shape, name
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_tensor_parallel_generate_matches_one_process(worker_results):
    from distributed_worker import PROMPTS, SIZE

    """Rank 0 alone encodes the prompt and decodes the image; both ranks return it."""
    stats = [json.loads((worker_results / f"tensor-rank{r}.json").read_text())
             for r in range(2)]
    assert [s["text_encoder_loads"] for s in stats] == [1, 0]
    assert [s["decodes"] for s in stats] == [2, 0]
    seeds = [s["seed"] for s in stats]
    assert seeds[0] == seeds[1] is not None  # rank 0's random seed reached rank 1
    pipe = Pipeline.from_pretrained(TINY, dtype="float32")
    refs = {
        "tensor": pipe.generate(PROMPTS[0], seed=8, **SIZE, output_type="np"),
        "tensor-random-seed": pipe.generate(PROMPTS[1], seed=seeds[0], **SIZE,
                                            output_type="np"),
    }
    for name, ref in refs.items():
        for rank in range(2):
            out = np.load(worker_results / f"{name}-rank{rank}.npy")
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_bench_reports_every_rank_under_mlx_launch(worker_results):
    from bonsai_mlx import bench

    (record,) = json.loads((worker_results / "bench.json").read_text())
    assert record["parallel"] == "tensor"
    ranks = record["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    full = bench.shipped_bytes(bench.synthetic_transformer("bf16", mx.float32, tiny=True)) * 2
    for r in ranks:
        assert r["median_step_seconds"] > 0 and r["peak_bytes"] > 0
        assert 0 < r["all_sum_seconds_per_step"] < r["median_step_seconds"]
        assert r["transformer_bytes"] < 0.75 * full  # float32: 4 bytes, shipped 2
    assert record["communication"]["all_sum_calls"] == 2 * 5  # 2 steps x (4 + 1) sums
    table = bench.format_table([record])
    assert "rank 1 (tensor-parallel)" in table and "all_sum" in table


@launched
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tensor", "data"])
def test_a_rank_that_dies_makes_the_other_exit_with_an_error(tmp_path, mode):
    """Rank 1 exits abruptly in its second transformer call; rank 0 (started directly, so
    no launcher kills it for us) must report one error line and exit 2, not hang."""
    args = gen_args(tmp_path / "out", "--seed", "1", "--seed", "2", "--seed", "3")
    if mode == "tensor":
        args.append("--tensor-parallel")
    cmd = [sys.executable, str(WORKER), str(tmp_path), "die-at", "2", *args]
    hostfile = tmp_path / "hosts.json"
    for _ in range(3):
        base = free_ports(2)
        hostfile.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
        rank0, rank1 = run_all([cmd, cmd], tmp_path, [
            {"MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(r)} for r in range(2)])
        if BIND_FAILED not in rank0.stderr + rank1.stderr:
            break
    assert rank1.returncode == 3
    assert rank0.returncode == 2, (rank0.returncode, rank0.stderr)
    error = [line for line in rank0.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "rank 0 of 2" in error[0], rank0.stderr
    assert "Traceback" not in rank0.stderr
    assert not (tmp_path / "out").exists()  # nothing half-written
