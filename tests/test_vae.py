"""The FLUX.2 VAE against diffusers' AutoencoderKLFlux2 (fixtures: scripts/fixtures/make_vae.py).

References are diffusers outputs stored NCHW; our API is NHWC.
"""

import shutil
from pathlib import Path

import mlx.core as mx
import pytest

import bonsai_mlx.models.vae as vae_module
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.vae import VAE, _run_tiled
from bonsai_mlx.weights import load_weights, save_safetensors

VAE_DIR = Path(__file__).parent / "fixtures" / "vae"
BOUND = 1e-4  # float32: max abs error <= BOUND * max|ref|

# name -> (folder or file, reference file). bfl/ and bfl_diffusers/ hold the same model.
LAYOUTS = {
    "diffusers_fp32": ("small", "small_io"),
    "diffusers_fp16": ("bfl_diffusers", "bfl_io"),
    "bfl_folder_bf16": ("bfl", "bfl_io"),
    "bfl_file_bf16": ("bfl/ae.safetensors", "bfl_io"),
}


def nhwc(a: mx.array) -> mx.array:
    return a.transpose(0, 2, 3, 1)


def load_reference(name: str) -> dict[str, mx.array]:
    return {k: nhwc(v) for k, v in mx.load(str(VAE_DIR / f"{name}.safetensors")).items()}


def assert_close(out: mx.array, ref: mx.array, bound: float = BOUND) -> None:
    assert out.shape == ref.shape
    err = mx.abs(out.astype(mx.float32) - ref).max().item()
    scale = mx.abs(ref).max().item()
    assert err <= bound * scale, f"max abs error {err:.3g} > {bound} * {scale:.3g}"


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def loaded(request):
    path, io = LAYOUTS[request.param]
    vae = VAE.from_pretrained(VAE_DIR / path, dtype="float32")
    return vae, load_reference(io)


def test_decode_matches_diffusers(loaded):
    vae, ref = loaded
    assert_close(vae.decode(ref["z"]), ref["decoded"])


def test_encode_matches_diffusers_mean(loaded):
    vae, ref = loaded
    assert_close(vae.encode(ref["x"]), ref["encoded"])


def test_normalize_latents_matches_pipeline(loaded):
    vae, ref = loaded
    assert_close(vae.normalize_latents(ref["encoded"]), ref["normalized"])


def test_denormalize_then_decode_matches_pipeline(loaded):
    vae, ref = loaded
    z = vae.denormalize_latents(ref["p"])
    assert_close(z, ref["denormalized"])
    assert_close(vae.decode(z), ref["decoded_from_p"])
    assert_close(vae.normalize_latents(z), ref["p"], 1e-5)


def test_config_from_json_and_inferred_shapes_agree():
    from_json = VAE.from_pretrained(VAE_DIR / "bfl_diffusers", dtype="float32")
    inferred = VAE.from_pretrained(VAE_DIR / "bfl", dtype="float32")
    assert from_json.config == inferred.config
    assert from_json.scale_factor == 2
    small = VAE.from_pretrained(VAE_DIR / "small", dtype="float32")
    assert small.scale_factor == 8 and small.config.norm_num_groups == 8


def test_encoder_is_loaded_only_by_encode():
    vae = VAE.from_pretrained(VAE_DIR / "small", dtype="float32")
    assert not vae.encoder_loaded
    vae.decode(mx.zeros((1, 2, 2, 32)))
    assert not vae.encoder_loaded
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in _param_names(vae))
    vae.encode(mx.zeros((1, 16, 16, 3)))
    assert vae.encoder_loaded
    vae.unload_encoder()
    assert not vae.encoder_loaded


def _param_names(module) -> list[str]:
    from mlx.utils import tree_flatten

    return [k for k, _ in tree_flatten(module.parameters())]


def test_bfloat16_load_keeps_batchnorm_in_float32():
    vae = VAE.from_pretrained(VAE_DIR / "bfl", dtype="bfloat16")
    assert vae.decoder.conv_in.weight.dtype == mx.bfloat16
    assert vae.bn.running_var.dtype == mx.float32
    ref = load_reference("bfl_io")
    assert_close(vae.decode(ref["z"]), ref["decoded"], 0.05)  # bf16 activations


def test_missing_tensor_is_a_clear_error(tmp_path):
    weights = load_weights(VAE_DIR / "bfl" / "ae.safetensors")
    del weights["decoder.up.0.block.1.conv2.weight"]
    save_safetensors(tmp_path / "ae.safetensors", weights)
    with pytest.raises(BonsaiError, match=r"missing.*decoder\.up_blocks\.1\.resnets\.1\.conv2"):
        VAE.from_pretrained(tmp_path / "ae.safetensors", dtype="float32")


def test_missing_encoder_only_fails_encode(tmp_path):
    folder = tmp_path / "vae"
    shutil.copytree(VAE_DIR / "small", folder)
    file = folder / "diffusion_pytorch_model.safetensors"
    weights = {
        k: v for k, v in load_weights(file).items()
        if not k.startswith(("encoder.", "quant_conv."))
    }
    save_safetensors(file, weights)
    vae = VAE.from_pretrained(folder, dtype="float32")
    vae.decode(mx.zeros((1, 2, 2, 32)))
    with pytest.raises(BonsaiError, match="cannot encode"):
        vae.encode(mx.zeros((1, 16, 16, 3)))


def test_bad_input_shapes_are_clear_errors():
    vae = VAE.from_pretrained(VAE_DIR / "small", dtype="float32")
    with pytest.raises(BonsaiError, match="NHWC"):
        vae.decode(mx.zeros((1, 32, 4, 4)))  # NCHW by mistake
    with pytest.raises(BonsaiError, match="multiple of 8"):
        vae.encode(mx.zeros((1, 20, 16, 3)))
    with pytest.raises(BonsaiError, match="tile_size"):
        vae.decode(mx.zeros((1, 4, 4, 32)), tiled=True, tile_size=64, tile_overlap=48)


# ---- tiling -------------------------------------------------------------------------


def _local_decode(z: mx.array) -> mx.array:
    """A stand-in decoder with a 1-pixel receptive field: nearest x8 then a channel mix."""
    up = mx.repeat(mx.repeat(z, 8, axis=1), 8, axis=2)
    return mx.tanh(up[..., :3] * 0.7 + up[..., 3:6] * up[..., 6:9])


@pytest.mark.parametrize("tile,overlap", [(8, 2), (8, 4), (6, 3), (5, 1), (40, 8)])
def test_tile_blending_is_exact_for_a_local_map(tile, overlap):
    z = mx.random.normal((2, 19, 27, 9), key=mx.random.key(0))
    out = _run_tiled(_local_decode, z, tile, overlap, in_scale=1, out_scale=8)
    assert_close(out, _local_decode(z), 1e-6)
    # the encode direction: image tiles in, latent tiles out
    x = mx.random.normal((1, 19 * 8, 27 * 8, 4), key=mx.random.key(1))
    pool = lambda t: t.reshape(t.shape[0], t.shape[1] // 8, 8, t.shape[2] // 8, 8, 4).mean((2, 4))  # noqa: E731
    assert_close(_run_tiled(pool, x, tile, overlap, in_scale=8, out_scale=1), pool(x), 1e-6)


def test_tiled_decode_and_encode_stay_near_diffusers():
    """Regression guard, not a precision bound: this tiny random model's receptive field
    (about 19 latent pixels) is larger than its 12-latent tiles, and its GroupNorm and
    attention are far more global than a trained VAE's, so tiles differ a lot from one
    untiled pass (measured: decode max 0.73 / mean 0.62, encode 0.44 / 0.39 relative)."""
    vae = VAE.from_pretrained(VAE_DIR / "small", dtype="float32")
    ref = load_reference("small_io")
    out = vae.decode(ref["z_large"], tiled=True, tile_size=96, tile_overlap=32)
    assert_close(out, ref["z_large_out"], 0.85)
    assert_close(vae.decode(ref["z_large"], tiled=False), ref["z_large_out"])
    assert_close(vae.encode(ref["x_large"], tiled=True, tile_size=96, tile_overlap=32),
                 ref["x_large_out"], 0.55)


def test_decode_tiles_automatically_above_the_threshold(monkeypatch):
    vae = VAE.from_pretrained(VAE_DIR / "small", dtype="float32")
    calls = []
    monkeypatch.setattr(VAE, "decode_tiled", lambda self, z, **kw: calls.append(kw) or z)
    vae.decode(mx.zeros((1, 4, 4, 32)))
    assert calls == []
    monkeypatch.setattr(vae_module, "AUTO_TILE_PIXELS", 32 * 32 - 1)
    vae.decode(mx.zeros((1, 4, 4, 32)), tile_size=16, tile_overlap=8)
    assert calls == [{"tile_size": 16, "tile_overlap": 8}]


def test_pipeline_folder_with_vae_subfolder_loads(tmp_path):
    shutil.copytree(VAE_DIR / "small", tmp_path / "vae")
    (tmp_path / "model_index.json").write_text("{}")
    vae = VAE.from_pretrained(tmp_path, dtype="float32")
    assert vae.config.block_out_channels == (16, 16, 32, 32)
