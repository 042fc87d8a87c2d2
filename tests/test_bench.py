"""`bonsai-mlx bench --tiny`: the smoke run CI does. Checks the records, never the speed."""

import json
import math

from bonsai_mlx import bench
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import parse_size
from bonsai_mlx.models.text_encoder import QWEN3_4B
from bonsai_mlx.quant import packed_format

import pytest
from click.testing import CliRunner

RUN_FIELDS = {
    "schema", "kind", "timestamp", "command", "model", "precision", "dtype", "tiny",
    "text_encoder_ran", "width",
    "height", "steps", "run", "warmup_runs", "seconds", "memory", "footprint_bytes",
    "footprint_source", "roofline", "packed_kernels", "machine",
}
MACHINE_FIELDS = {
    "chip", "cpu", "cpu_count", "memory_bytes", "os", "arch", "python", "mlx_version",
    "backend", "bonsai_mlx_version", "git_revision",
}
ROOFLINE_FIELDS = {
    "flops_per_step", "linear_flops_per_step", "attention_flops_per_step", "image_tokens",
    "text_tokens", "median_step_seconds", "achieved_tflops", "peak_tflops", "peak_source",
    "fraction_of_peak", "encode_flops", "encode_achieved_tflops",
}


def tiny_transformer_flops_64x64() -> int:
    """One step of the tiny transformer at 64x64 with 32 text tokens, by hand.

    D = 4 heads x 32 = 128, MLP hidden 384, joint_attention_dim 192, timestep channels 256;
    image tokens 4 x 4 = 16, text 32, joint 48; one double and one single block.
    """
    img, txt, joint = 16, 32, 48
    embed = (2 * img * 128 * 128          # x_embedder
             + 2 * txt * 192 * 128        # context_embedder
             + 2 * 256 * 128 + 2 * 128 * 128  # timestep embedder (M = 1)
             + 2 * (2 * 128 * 768)        # double-stream modulations, 6 x 128 each
             + 2 * 128 * 384)             # single-stream modulation
    double = 2 * joint * (4 * 128 * 128 + 128 * 768 + 384 * 128)  # q,k,v,out + SwiGLU in/out
    single = 2 * joint * (128 * 1152 + 512 * 128)  # to_qkv_mlp_proj, to_out
    final = 2 * 128 * 256 + 2 * img * 128 * 128    # norm_out.linear, proj_out
    attention = 2 * 4 * joint * joint * 128        # two blocks, QK^T + AV
    return embed + double + single + final + attention


def packed_bytes(n: int, k: int, fmt: str) -> int:
    codes = n * k // 8 if fmt == "binary" else n * math.ceil(k / 5)
    return codes + n * (k // 128) * 2  # + float16 scales


def tiny_transformer_bytes(fmt: str) -> int:
    """The tiny transformer's bytes as shipped (float tensors in 16 bits), with its 14
    packed layers in `fmt`."""
    dense = (128 * 128 + 192 * 128 + 256 * 128 + 128 * 128 + 2 * 128 * 768 + 128 * 384
             + 128 * 256 + 128 * 128 + 6 * 32)  # embedders, modulations, out, q/k norms
    packed = [(128, 128)] * 8 + [(768, 128), (128, 384)] * 2 + [(1152, 128), (128, 512)]
    if fmt == "bf16":
        return 2 * (dense + sum(n * k for n, k in packed))
    return 2 * dense + sum(packed_bytes(n, k, fmt) for n, k in packed)


@pytest.fixture(scope="module")
def tiny_records(tmp_path_factory):
    out = {}
    for kind in bench.SYNTHETIC_KINDS:
        path = tmp_path_factory.mktemp(kind) / "bench.jsonl"
        bench.run_bench(synthetic=kind, tiny=True, sizes=[(64, 64)], steps=2, repeats=2,
                        warmup=0, dtype="float32", json_path=path, log=lambda s: None)
        out[kind] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


@pytest.mark.parametrize("kind", bench.SYNTHETIC_KINDS)
def test_tiny_records_are_complete_and_sane(tiny_records, kind):
    records = tiny_records[kind]
    assert len(records) == 2 and [r["run"] for r in records] == [0, 1]
    for r in records:
        assert RUN_FIELDS <= r.keys()
        assert r["schema"] == bench.SCHEMA and r["kind"] == "run"
        assert (r["model"], r["precision"], r["dtype"]) == (f"synthetic-{kind}-tiny", kind,
                                                            "float32")
        assert (r["width"], r["height"], r["steps"]) == (64, 64, 2)
        s = r["seconds"]
        assert len(s["steps"]) == 2 and all(t > 0 for t in s["steps"])
        assert s["encode"] > 0 and s["decode"] > 0
        assert s["denoise"] == pytest.approx(sum(s["steps"]))
        assert s["total"] >= s["encode"] + s["denoise"] + s["decode"]
        m = r["memory"]
        assert m["peak_bytes"] > 0 and m["samples"] >= 2
        assert 0 < m["active_mean_bytes"] <= m["active_max_bytes"]
        assert MACHINE_FIELDS <= r["machine"].keys()
        assert r["machine"]["mlx_version"] and r["machine"]["backend"] in ("cpu", "metal",
                                                                           "cuda", "gpu")
        assert ROOFLINE_FIELDS <= r["roofline"].keys()
        if kind == "bf16":
            assert r["packed_kernels"] is None
        else:
            assert set(r["packed_kernels"]) == {"image_tokens", "text_tokens", "joint"}


@pytest.mark.parametrize("kind", bench.SYNTHETIC_KINDS)
def test_flop_count_matches_hand_computation(tiny_records, kind):
    roof = tiny_records[kind][0]["roofline"]
    assert roof["flops_per_step"] == tiny_transformer_flops_64x64()
    assert roof["linear_flops_per_step"] + roof["attention_flops_per_step"] == roof[
        "flops_per_step"]
    assert (roof["image_tokens"], roof["text_tokens"]) == (16, 32)
    step = roof["median_step_seconds"]
    assert step > 0
    assert roof["achieved_tflops"] == pytest.approx(roof["flops_per_step"] / step / 1e12)


def test_klein_4b_flops_per_step_at_1024():
    # Counted by hand from flux2-klein.md: 3,875,536,896 linear parameters, of which the
    # joint-sequence layers see L = 4096 + 512 tokens, the embedders their own streams.
    from bonsai_mlx.models.transformer import Flux2TransformerConfig

    f = bench.transformer_flops(Flux2TransformerConfig(), 1024, 1024)
    d, mlp, n_img, n_txt = 3072, 9216, 4096, 512
    n = n_img + n_txt
    stream = 4 * d * d + d * 2 * mlp + mlp * d  # q, k, v, out + SwiGLU: one stream of a block
    single = d * (3 * d + 2 * mlp) + (d + mlp) * d
    per_token_1 = 256 * d + d * d + 2 * d * 6 * d + d * 3 * d + d * 2 * d  # temb + modulation
    # Each double block holds an image and a text stream; each token passes through one.
    assert 5 * 2 * stream + 20 * single + 128 * d + 7680 * d + per_token_1 + d * 128 == (
        3_875_536_896)
    linear = 2 * (n * (5 * stream + 20 * single) + n_img * 128 * d + n_txt * 7680 * d
                  + per_token_1 + n_img * d * 128)
    assert f["linear"] == linear
    assert f["attention"] == 25 * 4 * n * n * d


def test_footprint_counts_packed_bytes(tiny_records):
    got = {k: tiny_records[k][0]["footprint_bytes"]["transformer"] for k in tiny_records}
    for kind, n in got.items():
        assert n == tiny_transformer_bytes(kind), kind
    assert got["binary"] < got["ternary"] < got["bf16"]
    fp = tiny_records["binary"][0]["footprint_bytes"]
    assert fp["total"] == fp["transformer"] + fp["text_encoder"] + fp["vae"]
    assert fp["text_encoder"] > 0 and fp["vae"] > 0


@pytest.mark.parametrize(("machine", "peak"), [
    ({"backend": "metal", "chip": "Apple M4 Pro", "gpu_cores": 20}, 8.8),
    ({"backend": "metal", "chip": "Apple M1 Max", "gpu_cores": None}, 0.33 * 32),
    ({"backend": "metal", "chip": "Apple M9"}, None),
    ({"backend": "cuda", "chip": "NVIDIA H100 80GB HBM3"}, 989.0),
    ({"backend": "cuda", "chip": "NVIDIA H100 PCIe"}, 756.0),
    ({"backend": "cuda", "chip": "NVIDIA L40S"}, 362.0),
    ({"backend": "cuda", "chip": "NVIDIA L4"}, 121.0),
    ({"backend": "cpu", "chip": "AMD EPYC"}, None),
])
def test_peak_table(machine, peak):
    got, source = bench.peak_tflops(machine)
    assert got == (pytest.approx(peak) if peak is not None else None)
    assert source


def test_cli_tiny_prints_table_and_writes_json(tmp_path):
    path = tmp_path / "out.jsonl"
    result = CliRunner().invoke(bench.bench_command, [
        "--tiny", "--synthetic", "ternary", "--steps", "1", "--repeats", "1", "--warmup", "0",
        "--dtype", "float32", "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "synthetic-ternary-tiny" in result.output and "64x64" in result.output
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["command"] == ("bonsai-mlx bench --synthetic ternary --steps 1 --repeats 1 "
                                 "--warmup 0 --dtype float32 --tiny")


def test_bad_size_is_a_user_error():
    with pytest.raises(BonsaiError, match="multiple"):
        bench.run_bench(synthetic="binary", tiny=True, sizes=[parse_size("65x64")])


def test_skip_encode_reports_no_encode_time(tmp_path):
    records = bench.run_bench(synthetic="binary", tiny=True, steps=1, repeats=1, warmup=0,
                              dtype="float32", skip_encode=True, log=lambda s: None)
    (r,) = records
    assert r["seconds"]["encode"] is None and r["text_encoder_ran"] is False
    assert r["seconds"]["decode"] > 0 and r["footprint_bytes"]["text_encoder"] > 0
    assert "text encoder skipped" in bench.format_table(records)


def test_model_folder_footprint_is_its_safetensors_bytes(fixtures_dir):
    folder = fixtures_dir / "pipeline" / "distilled"  # a tiny diffusers Flux2KleinPipeline
    (r,) = bench.run_bench(str(folder), sizes=[(64, 64)], steps=1, repeats=1, warmup=0,
                           dtype="float32", log=lambda s: None)
    assert RUN_FIELDS <= r.keys() and r["footprint_source"] == "files"
    assert r["precision"] == "dense" and r["text_encoder_ran"] is True
    sizes = {c: sum(f.stat().st_size for f in (folder / c).glob("*.safetensors"))
             for c in ("transformer", "text_encoder", "vae")}
    assert {k: v for k, v in r["footprint_bytes"].items() if k != "total"} == sizes
    assert r["seconds"]["encode"] > 0 and len(r["seconds"]["steps"]) == 1
    assert r["roofline"]["encode_flops"] > 0  # from text_encoder/config.json


@pytest.mark.parametrize(("kind", "precision"),
                         [("binary", "binary"), ("ternary", "ternary"), ("bf16", "dense")])
def test_precision_is_read_from_the_loaded_layers(kind, precision):
    import mlx.core as mx

    model = bench.synthetic_transformer(kind, mx.float32, tiny=True)
    assert packed_format(model) == precision


def test_text_encoder_flops_by_hand(tiny_records):
    # Tiny Qwen3: hidden 64, 4 q heads / 2 kv heads of 16, MLP 128; 3 layers over 32 tokens.
    per_layer = 2 * 32 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128) + 4 * 32 * 32 * 64
    roof = tiny_records["binary"][0]["roofline"]
    assert roof["encode_flops"] == 3 * per_layer
    assert roof["encode_achieved_tflops"] > 0
    # Qwen3-4B, layers 1..27 over 512 tokens: about 2.9 TFLOP.
    assert bench.text_encoder_flops(QWEN3_4B, 512, 27) == pytest.approx(2.9e12, rel=0.02)
