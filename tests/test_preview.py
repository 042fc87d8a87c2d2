"""Live previews (bonsai_mlx/preview.py): the affine latent -> RGB map, its least-squares
fit against the VAE's own decode, the cache keyed by the decoder's weights, the pipeline's
`preview=True` step callback and `gen --preview FILE`."""

from __future__ import annotations

import json
from pathlib import Path

from bonsai_mlx import preview as preview_module
from bonsai_mlx.cli import cli
from bonsai_mlx.models.vae import VAE
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.preview import LatentPreview, decoder_fingerprint, fit_matrix

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "pipeline" / "distilled"


@pytest.fixture(autouse=True)
def preview_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BONSAI_PREVIEW_CACHE", str(tmp_path / "previews"))
    return tmp_path / "previews"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(TINY, dtype="float32")


def test_the_preview_is_the_affine_map_of_the_vaes_own_unnormalised_latents(pipe):
    vae = pipe.vae
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((33, 3)).astype(np.float32) * 0.1
    latents = rng.standard_normal((2, 128, 3, 5)).astype(np.float32)  # callback layout
    got = LatentPreview.with_matrix(vae, matrix)(latents)
    # reference: the VAE's un-normalise + unpatchify (checked against diffusers in
    # test_vae.py), then the map, per latent pixel
    z = np.array(vae.denormalize_latents(mx.array(latents.transpose(0, 2, 3, 1))))
    expected = np.clip((z @ matrix[:32] + matrix[32]) * 0.5 + 0.5, 0, 1)
    assert got.shape == (2, 6, 10, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_fit_is_the_least_squares_map_to_the_decodes_block_means(pipe, monkeypatch):
    vae = pipe.vae
    calls = []
    real_decode = VAE.decode

    def recording_decode(self, z, **kwargs):
        out = real_decode(self, z, **kwargs)
        calls.append((np.array(z), np.array(out)))
        return out

    monkeypatch.setattr(VAE, "decode", recording_decode)
    matrix = fit_matrix(vae)
    assert matrix.shape == (33, 3) and len(calls) == preview_module.FIT_SAMPLES
    # the normal equations hold on the decoded samples: the residual is orthogonal to
    # every input column (the definition of the least-squares solution)
    b = preview_module.FIT_BORDER
    xs, ys = [], []
    for z, image in calls:
        n, f = z.shape[1], vae.scale_factor
        blocks = image.reshape(1, n, f, n, f, 3).mean(axis=(2, 4))
        xs.append(z[:, b:n - b, b:n - b].reshape(-1, 32))
        ys.append(blocks[:, b:n - b, b:n - b].reshape(-1, 3))
    x = np.concatenate([np.concatenate(xs), np.ones((sum(len(a) for a in xs), 1))], axis=1)
    residual = np.concatenate(ys) - x @ matrix
    assert np.abs(x.T @ residual).max() < 1e-3 * np.abs(x.T @ np.concatenate(ys)).max()


class SmoothDecoderVAE(VAE):
    """A stand-in for a trained decoder, which no tiny fixture has: the colour of each 8x8
    block follows its latent pixel smoothly (a fixed tanh of an affine map, which the
    preview's affine fit can only approximate), with the tiny VAE's own random decoder on
    top at a tenth of its amplitude as fine detail. (The tiny VAE alone decodes latents
    into texture noise that no cheap preview can follow: an affine map explains about 4%
    of its 8x8 block means' variance, and decoding a 2x or 4x smaller latent does worse
    than a constant colour.)"""

    def __init__(self, config, dtype=mx.float32):
        super().__init__(config, dtype)
        rng = np.random.default_rng(1)
        n = config.latent_channels
        self.colour = mx.array(rng.standard_normal((n, 3)).astype(np.float32) / np.sqrt(n))
        self.colour_bias = mx.array(rng.uniform(-0.3, 0.3, 3).astype(np.float32))

    def decode(self, z, **kwargs):
        blocks = mx.tanh(z.astype(mx.float32) @ self.colour + self.colour_bias)  # (B, h, w, 3)
        b, h, w, _ = blocks.shape
        f = self.scale_factor
        smooth = mx.broadcast_to(blocks[:, :, None, :, None], (b, h, f, w, f, 3))
        detail = super().decode(z, **kwargs).astype(mx.float32)
        return smooth.reshape(b, h * f, w * f, 3) + 0.1 * detail


def test_the_preview_follows_the_full_decode_of_a_smooth_decoder(pipe):
    tiny = pipe.vae
    vae = SmoothDecoderVAE(tiny.config)
    vae.update(tiny.parameters())
    render = LatentPreview.for_vae(vae)
    errors, spreads = [], []
    for seed in range(2):  # the tiny pipeline's own final latents (std ~2.4, not 1)
        latents = []
        pipe.generate("a red fox", width=128, height=96, steps=4, seed=seed,
                      callback=lambda s, t, lat, out=latents: out.append(np.array(lat)))
        z = vae.denormalize_latents(mx.array(latents[-1].transpose(0, 2, 3, 1)))
        full = np.array(vae.decode(z)) * 0.5 + 0.5  # (1, 96, 128, 3)
        blocks = np.clip(full.reshape(1, 12, 8, 16, 8, 3).mean(axis=(2, 4)), 0, 1)
        preview = render(latents[-1])
        errors.append(np.sqrt(np.mean(np.square(preview - blocks))))
        spreads.append(np.sqrt(np.mean(np.square(blocks - blocks.mean(axis=(1, 2))))))
    # measured: RMSE 0.069-0.073 against 8x8 block means that vary by 0.40 around the
    # image's mean colour (the error of the best constant picture)
    assert max(errors) < 0.09, errors
    assert max(errors) < 0.25 * min(spreads), (errors, spreads)


def test_the_fit_is_cached_by_the_decoders_weights(pipe, preview_cache, monkeypatch):
    vae = pipe.vae
    first = LatentPreview.for_vae(vae)
    files = list(preview_cache.glob("*.json"))
    assert [f.stem for f in files] == [decoder_fingerprint(vae)]
    monkeypatch.setattr(preview_module, "fit_matrix",
                        lambda *a, **k: pytest.fail("the cached fit was not used"))
    np.testing.assert_array_equal(LatentPreview.for_vae(vae).matrix, first.matrix)
    # the encoder (loaded for editing) is not part of the key; a decoder weight is
    vae.load_encoder()
    try:
        assert decoder_fingerprint(vae) == files[0].stem
    finally:
        vae.unload_encoder()
    other = VAE.from_pretrained(TINY / "vae", dtype="float32")
    other.decoder.conv_out.bias = other.decoder.conv_out.bias + 1e-3
    assert decoder_fingerprint(other) != files[0].stem


def test_a_bad_cache_file_is_fitted_again(pipe, preview_cache):
    path = preview_cache / f"{decoder_fingerprint(pipe.vae)}.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    LatentPreview.for_vae(pipe.vae)
    assert len(json.loads(path.read_text())["matrix"]) == 33


def test_generate_previews_the_denoised_estimate_at_every_step(pipe):
    got = []
    image = pipe.generate("a fox", width=96, height=64, steps=3, seed=2, output_type="np",
                          preview=True,
                          callback=lambda s, t, lat, pv: got.append((s, t, np.array(lat), pv)))
    assert [(s, t) for s, t, _, _ in got] == [(1, 3), (2, 3), (3, 3)]
    assert all(pv.size == (12, 8) and pv.mode == "RGB" for _, _, _, pv in got)
    render = pipe.latent_preview()
    as_pil = [np.asarray(pv, np.float32) / 255 for _, _, _, pv in got]
    # the last step's estimate is the final latents (sigma = 0)
    np.testing.assert_allclose(as_pil[-1], render(got[-1][2])[0], atol=1 / 255 + 1e-6)
    # earlier ones are the estimate x0 = x_t - sigma_t v, not the noisy latents the
    # callback also receives
    assert np.abs(as_pil[0] - render(got[0][2])[0]).max() > 0.05
    # previews do not change the image
    same = pipe.generate("a fox", width=96, height=64, steps=3, seed=2, output_type="np")
    np.testing.assert_array_equal(image, same)


def test_a_batch_gets_a_list_of_previews(pipe):
    got = []
    pipe.generate(["a", "b"], width=32, height=32, steps=1, seed=0, preview=True,
                  callback=lambda s, t, lat, pv: got.append(pv))
    assert isinstance(got[0], list) and [p.size for p in got[0]] == [(4, 4), (4, 4)]


# ---- gen --preview FILE ----------------------------------------------------------------------


def gen(*args):
    return CliRunner().invoke(cli, ["gen", "-m", str(TINY), "-p", "a fox", "--size",
                                    "64x32", "--steps", "2", "--seed", "1", "-q", *args])


def test_gen_preview_writes_its_file_and_may_replace_only_its_own(tmp_path):
    target = tmp_path / "live.png"
    result = gen("-o", str(tmp_path / "out"), "--preview", str(target))
    assert result.exit_code == 0, result.output
    with Image.open(target) as im:
        assert im.size == (8, 4)
        assert im.text["bonsai-mlx-preview"] == "step 2/2"
    # its own preview is replaced on the next run
    result = gen("-o", str(tmp_path / "out"), "--preview", str(target), "--steps", "3")
    assert result.exit_code == 0, result.output
    with Image.open(target) as im:
        assert im.text["bonsai-mlx-preview"] == "step 3/3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.png", "out", "previews"]


@pytest.mark.parametrize("existing, phrase", [
    ("photo.png", "exists and is not a bonsai-mlx preview"),
    ("notes.txt", "previews are PNG files"),
])
def test_gen_preview_never_replaces_another_file(tmp_path, existing, phrase):
    target = tmp_path / existing
    Image.new("RGB", (8, 8), "red").save(target, format="PNG")
    before = target.read_bytes()
    result = gen("-o", str(tmp_path / "out"), "--preview", str(target))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert phrase in result.stderr
    assert target.read_bytes() == before
    assert not (tmp_path / "out").exists()  # refused before any model was loaded
