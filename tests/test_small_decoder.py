"""The FLUX.2 small decoder (`vae="small"`): AutoencoderKLFlux2 with
decoder_block_out_channels against diffusers, as a whole pipeline's decoder (the pipeline
keeping its own encoder), the alias, errors, converting and the CLI (fixtures of
scripts/fixtures/make_variants.py)."""

import json

from bonsai_mlx import BonsaiError
from bonsai_mlx.cli import cli
from bonsai_mlx.convert import convert
from bonsai_mlx.models import vae as vae_module
from bonsai_mlx.models.vae import VAE
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.weights import load_weights

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from variants import PIPELINES, TOLERANCE, VARIANTS, arrays, generate_kwargs, max_error

SMALL = VARIANTS / "small_decoder"


@pytest.fixture(scope="module")
def data():
    return arrays()


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(PIPELINES / "distilled", dtype="float32", vae=SMALL)


def test_small_decoder_decode_matches_diffusers(data):
    vae = VAE.from_pretrained(SMALL, dtype="float32")
    assert vae.config.decoder_block_out_channels == (8, 16, 24, 24)
    z = mx.array(data["small_decoder_decode/z"].transpose(0, 2, 3, 1))
    out = np.array(vae.decode(z)).transpose(0, 3, 1, 2)
    ref = data["small_decoder_decode/image"]
    assert out.shape == ref.shape == (1, 3, 48, 64)
    assert np.abs(out - ref).max() <= 5e-6 * np.abs(ref).max()


@pytest.mark.parametrize("case", ["small_decoder_t2i", "small_decoder_edit"])
def test_pipeline_with_small_decoder_matches_diffusers(pipe, data, case):
    err = max_error(pipe.generate(**generate_kwargs(case, data)), case, data)
    assert err < TOLERANCE, f"{case}: max abs error {err:.2e}"


def test_swapped_decoder_keeps_the_pipelines_encoder(pipe):
    assert pipe.vae.decoder_source == SMALL and pipe.vae.source == PIPELINES / "distilled/vae"
    channels = [b.resnets[0].conv1.weight.shape[0] for b in pipe.vae.decoder.up_blocks]
    assert channels == [24, 24, 16, 8]
    pipe.vae.load_encoder()
    own = load_weights(PIPELINES / "distilled" / "vae")
    w = own["encoder.conv_in.weight"].astype(mx.float32).transpose(0, 2, 3, 1)
    assert mx.array_equal(pipe.vae.encoder.conv_in.weight, w).item()
    pipe.vae.unload_encoder()


def test_small_alias_downloads_only_the_vae_files(monkeypatch, tmp_path):
    asked = {}

    def fake_resolve(name, allow_patterns=None, **_):
        asked.update(name=name, patterns=allow_patterns)
        return SMALL

    monkeypatch.setattr(vae_module, "resolve_model_path", fake_resolve)
    vae = VAE.from_pretrained("small", dtype="float32", encoder=PIPELINES / "distilled/vae")
    assert asked["name"] == "black-forest-labs/FLUX.2-small-decoder"
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= set(asked["patterns"])
    assert vae.config.decoder_block_out_channels == (8, 16, 24, 24)


def test_decoder_for_another_encoder_is_refused():
    with pytest.raises(BonsaiError, match="does not fit the encoder .*block_out_channels"):
        Pipeline.from_pretrained(PIPELINES / "distilled", vae=VARIANTS / "klein9b" / "vae")
    with pytest.raises(BonsaiError, match="does not exist|not a folder|unknown model"):
        Pipeline.from_pretrained(PIPELINES / "distilled", vae="./no/such/vae")


def test_convert_writes_a_pipeline_with_the_small_decoder(pipe, data, tmp_path):
    report = convert(PIPELINES / "distilled", tmp_path / "out", vae=SMALL, echo=None)
    vae_dir = tmp_path / "out" / "vae"
    config = json.loads((vae_dir / "config.json").read_text())
    assert config["decoder_block_out_channels"] == [8, 16, 24, 24]
    assert report.after["vae"] < report.before["vae"]  # the smaller decoder's bytes
    # diffusers' layout: the source's encoder tensors and the small decoder's, as stored
    saved, enc, dec = (load_weights(p) for p in (vae_dir, PIPELINES / "distilled/vae", SMALL))
    assert set(saved) == set(dec)
    for k, v in saved.items():
        want = enc[k] if k.startswith(("encoder.", "quant_conv.")) else dec[k]
        assert v.dtype == want.dtype and mx.array_equal(v, want).item(), k
    again = Pipeline.from_pretrained(tmp_path / "out", dtype="float32")
    kwargs = generate_kwargs("small_decoder_edit", data)
    np.testing.assert_array_equal(again.generate(**kwargs), pipe.generate(**kwargs))


def test_cli_vae_option(tmp_path):
    out = tmp_path / "o.png"
    result = CliRunner().invoke(cli, [
        "gen", "-m", str(PIPELINES / "distilled"), "--vae", str(SMALL), "-p", "a cat",
        "--size", "32x32", "--steps", "1", "--seed", "0", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(cli, [
        "gen", "-m", str(PIPELINES / "distilled"), "--vae", str(VARIANTS / "klein9b/vae"),
        "-p", "a cat", "--size", "32x32", "--steps", "1"])
    assert bad.exit_code == 2 and "does not fit the encoder" in bad.output


def test_bench_reports_decode_seconds_and_memory_for_both_decoders():
    from bonsai_mlx.bench import run_bench, synthetic_vae

    runs = {vae: run_bench(str(PIPELINES / "distilled"), vae=vae, sizes=[(64, 64)], steps=1,
                           repeats=1, warmup=0, dtype="float32", log=lambda _: None)[0]
            for vae in (None, str(SMALL))}
    full, small = runs[None], runs[str(SMALL)]
    assert small["model"].endswith("+vae-small_decoder") and full["model"] != small["model"]
    for r in (full, small):
        assert r["seconds"]["decode"] > 0
        assert 0 < r["memory"]["decode_peak_bytes"] <= r["memory"]["peak_bytes"]
    # the smaller decoder's weights and activations: less memory while decoding
    assert small["memory"]["decode_peak_bytes"] < full["memory"]["decode_peak_bytes"]
    # --synthetic --vae small has the published small decoder's shapes
    vae = synthetic_vae(mx.bfloat16, small=True)
    assert [b.resnets[0].conv1.weight.shape[0] for b in vae.decoder.up_blocks] == [
        384, 384, 192, 96]


def test_decode_peak_memory_counts_only_the_decode(pipe):
    real = pipe.transformer

    class Heavy:  # a denoising step that briefly holds 64 MiB
        dtype = real.dtype

        def rope_tables(self, *a):
            return real.rope_tables(*a)

        def __call__(self, x, c, t, **kw):
            mx.eval(mx.zeros((16, 1024, 1024)))
            return real(x, c, t, **kw)

    pipe.transformer = Heavy()
    try:
        pipe.generate("a cat on a sofa", width=32, height=32, steps=1, seed=0,
                      output_type="np")
    finally:
        pipe.transformer = real
    assert pipe.last_peak_memory >= 64 * 2**20 > pipe.last_decode_peak_memory > 0
