"""End-to-end pipeline against diffusers' Flux2KleinPipeline (tiny random pipelines and
reference images from scripts/fixtures/make_pipeline.py), plus exact img2img math,
determinism and every user error."""

import json
import warnings
from pathlib import Path

from bonsai_mlx import BonsaiError
from bonsai_mlx.images import preprocess_image
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.scheduler import img2img_start_index, make_schedule

import mlx.core as mx
import numpy as np
import PIL.Image
import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "pipeline"
CASES = json.loads((FIXTURES / "cases.json").read_text())
PARITY_CASES = [c for c in CASES if c != "large_preprocessed"]
# Measured max abs error 2e-5 .. 8e-5 (float32, CPU). A wrong prompt, a missing reference
# image or no CFG moves the image by >= 1.9e-3 on these fixtures, so 2e-4 separates them.
TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def arrays():
    return np.load(FIXTURES / "cases.npz")


@pytest.fixture(scope="module")
def pipes():
    return {name: Pipeline.from_pretrained(FIXTURES / name, dtype="float32")
            for name in ("distilled", "base")}


def _generate_case(pipes, arrays, case):
    meta = CASES[case]
    k = meta["kwargs"]
    kwargs = dict(steps=k["num_inference_steps"], latents=arrays[f"{case}/latents"],
                  output_type="np")
    if "images" in k:
        kwargs["images"] = [FIXTURES / n for n in k["images"]]
    if meta["size_given"]:
        kwargs.update(width=k["width"], height=k["height"])
    if "guidance_scale" in k:
        kwargs["guidance"] = k["guidance_scale"]
    if "num_images_per_prompt" in k:
        kwargs["num_images"] = k["num_images_per_prompt"]
    return pipes[meta["pipeline"]].generate(k["prompt"], **kwargs)


@pytest.mark.parametrize("case", PARITY_CASES)
def test_pipeline_matches_diffusers_reference(pipes, arrays, case):
    out = _generate_case(pipes, arrays, case)
    ref = arrays[f"{case}/image"]
    assert out.shape == ref.shape and out.dtype == np.float32
    err = float(np.abs(out - ref).max())
    assert err < TOLERANCE, f"{case}: max abs error {err:.2e}"


def test_model_defaults_come_from_is_distilled(pipes):
    assert (pipes["distilled"].default_steps, pipes["distilled"].default_guidance) == (4, 1.0)
    assert (pipes["base"].default_steps, pipes["base"].default_guidance) == (50, 4.0)


def test_large_reference_image_is_resized_and_cropped_as_diffusers():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_pipeline", Path(__file__).parents[1] / "scripts" / "fixtures" / "make_pipeline.py")
    # Only the pure-numpy pattern generator is used (the script imports torch lazily).
    make_pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_pipeline)
    meta = CASES["large_preprocessed"]
    big = PIL.Image.fromarray(make_pipeline.test_image(*meta["input_size"], seed=3))
    out = preprocess_image(big)
    assert (out.shape[1], out.shape[0]) == tuple(meta["output_size"])
    as_uint8 = np.round((out + 1) / 2 * 255).astype(np.uint8)
    ref = np.load(FIXTURES / "cases.npz")["large_preprocessed_every_3rd"]
    np.testing.assert_array_equal(as_uint8[::3, ::3], ref)
    assert int(as_uint8.astype(np.int64).sum()) == meta["sum"]


def test_same_seed_is_bit_identical_and_other_seed_differs(pipes):
    pipe = pipes["distilled"]
    a = pipe.generate("a cat", width=32, height=32, steps=1, seed=7, output_type="np")
    assert pipe.last_seed == 7
    b = pipe.generate("a cat", width=32, height=32, steps=1, seed=7, output_type="np")
    c = pipe.generate("a cat", width=32, height=32, steps=1, seed=8, output_type="np")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_strength_one_is_text_to_image_from_the_same_noise(pipes, arrays):
    pipe = pipes["distilled"]
    lat = arrays["distilled_t2i/latents"]
    t2i = pipe.generate("a red fox", width=96, height=64, steps=2, latents=lat,
                        output_type="np")
    i2i = pipe.generate("a red fox", width=96, height=64, steps=2, latents=lat,
                        images=FIXTURES / "reference.png", strength=1.0, output_type="np")
    np.testing.assert_allclose(i2i, t2i, atol=1e-6)


def test_img2img_starts_from_noised_image_at_the_matching_sigma(pipes, arrays):
    pipe = pipes["distilled"]
    steps, strength = 4, 0.5
    lat = arrays["distilled_edit/latents"]  # (1, 128, 4, 6): 96 x 64, the reference's size
    calls = []
    real = pipe.transformer

    class Recorder:
        dtype = real.dtype

        def rope_tables(self, *a):
            return real.rope_tables(*a)

        def __call__(self, x, c, t, **kw):
            calls.append((np.array(x), t))
            return real(x, c, t, **kw)

    pipe.transformer = Recorder()
    try:
        pipe.generate("blue", steps=steps, strength=strength, latents=lat,
                      images=[FIXTURES / "reference.png"], output_type="np")
    finally:
        pipe.transformer = real
    schedule = make_schedule(pipe.scheduler_config, steps, 4 * 6)
    start = img2img_start_index(steps, strength)
    assert start == 2 and len(calls) == steps - start
    assert calls[0][1] == schedule.model_timestep(start)
    sigma = float(schedule.sigmas[start])
    image = mx.array(preprocess_image(FIXTURES / "reference.png"))[None]
    z = pipe.vae.normalize_latents(pipe.vae.encode(image)).reshape(1, 24, 128)
    noise = lat.transpose(0, 2, 3, 1).reshape(1, 24, 128)
    expected = sigma * noise + (1 - sigma) * np.array(z)
    assert calls[0][0].shape == (1, 24, 128)  # no reference tokens in img2img
    np.testing.assert_allclose(calls[0][0], expected, atol=1e-5)


def test_callback_timings_peak_memory_and_output_types(pipes):
    pipe = pipes["distilled"]
    seen = []
    images = pipe.generate(["a", "b"], width=32, height=48, steps=2, seed=1,
                           callback=lambda i, n, lat: seen.append((i, n, lat.shape)))
    assert seen == [(1, 2, (2, 128, 3, 2)), (2, 2, (2, 128, 3, 2))]
    assert isinstance(images, list) and len(images) == 2
    assert images[0].size == (32, 48) and images[0].mode == "RGB"
    t = pipe.last_timings
    assert set(t) >= {"encode", "steps", "decode"} and len(t["steps"]) == 2
    assert pipe.last_peak_memory > 0
    one = pipe.generate("a", width=32, height=32, steps=1, seed=1)
    assert isinstance(one, PIL.Image.Image)
    arr = pipe.generate("a", width=32, height=32, steps=1, seed=1, output_type="mx")
    assert isinstance(arr, mx.array) and arr.shape == (1, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(one), np.round(np.array(arr[0]) * 255))


def test_encode_prompt_shape(pipes):
    emb = pipes["distilled"].encode_prompt(["a", "b c"])
    assert emb.shape == (2, 512, 3 * 16)


def test_guidance_on_distilled_model_warns_and_is_ignored(pipes, arrays):
    pipe = pipes["distilled"]
    lat = arrays["distilled_t2i/latents"]
    plain = pipe.generate("x", width=96, height=64, steps=1, latents=lat, output_type="np")
    with pytest.warns(UserWarning, match="ignored"):
        guided = pipe.generate("x", width=96, height=64, steps=1, latents=lat, guidance=5.0,
                               output_type="np")
    np.testing.assert_array_equal(plain, guided)


# ---- user errors -----------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=100), r"multiples of 16.*width 100 \(nearest valid: 96 or 112\)"),
    (dict(height=8), "out of range"),
    (dict(width=8192), "out of range"),
    (dict(width=64.0), "integer"),
    (dict(steps=0), "steps must be"),
    (dict(steps=2.5), "steps must be"),
    (dict(strength=0.5), "exactly one input image"),
    (dict(strength=0.0, images=[FIXTURES / "reference.png"]), r"strength must be in \(0, 1\]"),
    (dict(strength=1.5, images=[FIXTURES / "reference.png"]), r"strength must be in \(0, 1\]"),
    (dict(strength=0.5, images=[FIXTURES / "reference.png"] * 2), "exactly one"),
    (dict(latents=np.zeros((1, 128, 3, 2), np.float32)), r"latents must have shape"),
    (dict(output_type="pt"), "output_type"),
    (dict(num_images=0), "num_images"),
    (dict(seed=-1), "seed"),
    (dict(images=[FIXTURES / "nope.png"]), "nope.png does not exist"),
    (dict(images=[42]), "PIL image or a path"),
    (dict(sigmas=[1.0, 0.5], steps=3), "sigmas"),
])
def test_bad_generate_arguments_are_clear_errors(pipes, kwargs, match):
    kwargs = {"width": 32, "height": 32, "steps": 1, **kwargs}
    with pytest.raises(BonsaiError, match=match):
        pipes["distilled"].generate("a cat", **kwargs)


def test_bad_prompts_and_negative_prompts(pipes):
    with pytest.raises(BonsaiError, match="prompt"):
        pipes["distilled"].generate([], width=32, height=32)
    with pytest.raises(BonsaiError, match="prompt"):
        pipes["distilled"].generate(3, width=32, height=32)
    with pytest.raises(BonsaiError, match="negative_prompt"):
        pipes["base"].generate(["a", "b"], width=32, height=32, steps=1,
                               negative_prompt=["x"])


def test_unreadable_and_unusable_images_name_the_file(pipes, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(BonsaiError, match="broken.png"):
        pipes["distilled"].generate("a", images=[bad], steps=1)
    small = tmp_path / "small.png"
    PIL.Image.new("RGB", (40, 80)).save(small)
    with pytest.raises(BonsaiError, match="small.png.*at least 64"):
        pipes["distilled"].generate("a", images=[small], steps=1)
    thin = tmp_path / "thin.png"
    PIL.Image.new("RGB", (64, 600)).save(thin)
    with pytest.raises(BonsaiError, match="aspect ratio"):
        pipes["distilled"].generate("a", images=[thin], steps=1)


def test_unknown_and_unsupported_folder_layouts(tmp_path):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "weights.bin").write_bytes(b"x")
    with pytest.raises(BonsaiError, match="not a FLUX.2 \\[klein\\] model folder"):
        Pipeline.from_pretrained(tmp_path / "random")
    pack = tmp_path / "pack"
    for d in ("transformer-packed-mflux", "vae"):
        (pack / d).mkdir(parents=True)
    with pytest.raises(BonsaiError, match="Bonsai MLX pack but lacks text_encoder-mlx-4bit"):
        Pipeline.from_pretrained(pack)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(BonsaiError, match="StableDiffusionPipeline"):
        Pipeline.from_pretrained(other)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline"}')
    (partial / "transformer").mkdir()
    with pytest.raises(BonsaiError, match="lacks .*vae"):
        Pipeline.from_pretrained(partial)
    with pytest.raises(BonsaiError):
        Pipeline.from_pretrained(tmp_path / "does" / "not" / "exist")


def test_no_warnings_for_plain_text_to_image(pipes):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipes["distilled"].generate("a", width=32, height=32, steps=1, seed=0,
                                    output_type="np")


def _write_bonsai_pack_and_dense_twin(tmp_path):
    """A miniature Bonsai MLX 1-bit pack built from the distilled fixture (its transformer
    replaced by a random one wide enough to pack: K multiple of 128), and the same model as
    a dense diffusers folder holding the exactly dequantised weights."""
    import shutil

    from bonsai_mlx.models.transformer import Flux2Transformer

    from mlx.utils import tree_flatten

    config = dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                  attention_head_dim=64, num_attention_heads=2, joint_attention_dim=48,
                  axes_dims_rope=[16, 16, 16, 16], rope_theta=2000, guidance_embeds=False)
    model = Flux2Transformer(config, dtype="float32")
    packed = set(model.packable_layers())
    rng = np.random.default_rng(0)
    dense, pack = {}, {}
    for k, v in tree_flatten(model.parameters()):
        layer = k.removesuffix(".weight")
        if layer in packed:  # exactly +-s per group of 128: 1-bit affine holds it exactly
            n, kk = v.shape
            q = rng.choice([-1.0, 1.0], size=(n, kk // 128, 128))
            s = rng.uniform(0.05, 0.2, size=(n, kk // 128, 1))
            w = mx.array((q * s).reshape(n, kk).astype(np.float16))
            pack[k], pack[f"{layer}.scales"], pack[f"{layer}.biases"] = mx.quantize(
                w, group_size=128, bits=1)
            dense[k] = w
        else:
            dense[k] = pack[k] = v.astype(mx.float16)
    src = FIXTURES / "distilled"
    roots = {}
    for name, folder, weights in (("pack", "transformer-packed-mflux", pack),
                                  ("dense", "transformer", dense)):
        root = tmp_path / name
        for d in ("tokenizer", "scheduler", "vae"):
            shutil.copytree(src / d, root / d)
        shutil.copy(src / "model_index.json", root)
        te = "text_encoder-mlx-4bit" if name == "pack" else "text_encoder"
        shutil.copytree(src / "text_encoder", root / te)
        (root / folder).mkdir()
        mx.save_safetensors(str(root / folder / "diffusion_pytorch_model.safetensors"), weights)
        (root / folder / "config.json").write_text(
            json.dumps({"_class_name": "Flux2Transformer2DModel", **config}))
        roots[name] = root
    (roots["pack"] / "model_index.json").unlink()  # a pack is distilled even without it
    (roots["pack"] / "transformer-packed-mflux" / "quantization_config.json").write_text(
        json.dumps({"bits": 1, "group_size": 128,
                    "skip_patterns": ["x_embedder", "context_embedder", "proj_out", "norm_out",
                                      "time_guidance_embed", "modulation", "norm_q",
                                      "norm_k"]}))
    return roots


def test_bonsai_mlx_pack_generates_what_its_dense_twin_does(tmp_path, arrays):
    from bonsai_mlx.quant import BinaryLinear

    roots = _write_bonsai_pack_and_dense_twin(tmp_path)
    pack = Pipeline.from_pretrained(roots["pack"], dtype="float32")
    dense = Pipeline.from_pretrained(roots["dense"], dtype="float32")
    assert pack.is_distilled and pack.default_steps == 4
    assert isinstance(pack.transformer.transformer_blocks[0].attn.to_q, BinaryLinear)
    lat = arrays["distilled_t2i/latents"]
    a = pack.generate("a fox", width=96, height=64, steps=2, latents=lat, output_type="np")
    b = dense.generate("a fox", width=96, height=64, steps=2, latents=lat, output_type="np")
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_callback_can_cancel_between_steps_and_the_pipeline_carries_on(pipes):
    from bonsai_mlx.pipeline import GenerationCancelled

    pipe = pipes["distilled"]
    seen = []

    def stop_at_two(step, total, latents):
        seen.append(step)
        if step == 2:
            raise GenerationCancelled

    with pytest.raises(GenerationCancelled):
        pipe.generate("a fox", width=64, height=32, steps=4, seed=3, callback=stop_at_two)
    assert seen == [1, 2]
    after = pipe.generate("a fox", width=64, height=32, steps=4, seed=3, output_type="np")
    fresh = Pipeline.from_pretrained(FIXTURES / "distilled", dtype="float32")
    np.testing.assert_array_equal(
        after, fresh.generate("a fox", width=64, height=32, steps=4, seed=3, output_type="np"))


def test_a_request_is_checked_without_a_model_and_runs_as_generate(pipes):
    from bonsai_mlx.cli import CLI_NAMES
    from bonsai_mlx.request import GenerationRequest

    req = GenerationRequest.create("a cat", width=32, height=32, steps=1, seed=3)
    assert (req.width, req.height, req.batch, req.seed, req.images) == (32, 32, 1, 3, ())
    edit = GenerationRequest.create("a cat", images=[FIXTURES / "reference.png"])
    assert (edit.width, edit.height) == edit.images[0].size == (96, 64)  # the image's size
    pipe = pipes["distilled"]
    ran = pipe.run(req)
    assert ran.seed == 3 == pipe.last_seed and ran.timings is pipe.last_timings
    generated = pipe.generate("a cat", width=32, height=32, steps=1, seed=3, output_type="np")
    np.testing.assert_array_equal(ran.output("np"), generated)
    other = pipe.run(req.with_seed(4)).output("np")
    assert other.shape == (1, 32, 32, 3) and not np.array_equal(other, generated)
    with pytest.raises(BonsaiError, match=r"--strength 2\.0 is out of range"):
        GenerationRequest.create("a", strength=2.0, images=[FIXTURES / "reference.png"],
                                 names=CLI_NAMES)
    with pytest.raises(BonsaiError, match="needs exactly one --image, got 2"):
        GenerationRequest.create("a", strength=0.5, images=[FIXTURES / "reference.png"] * 2,
                                 names=CLI_NAMES)
    with pytest.raises(BonsaiError, match="seed"):
        req.with_seed(-1)
