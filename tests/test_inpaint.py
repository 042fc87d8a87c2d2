"""Inpainting against diffusers' Flux2KleinInpaintPipeline (tiny pipelines of
scripts/fixtures/make_pipeline.py, cases of scripts/fixtures/make_variants.py), the mask's
exact arithmetic, the kept region at every step, user errors and the CLI."""

from bonsai_mlx import BonsaiError
from bonsai_mlx.images import prepare_inpaint_image
from bonsai_mlx.inpaint import bilinear_resize, mask_latents
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.request import GenerationRequest
from bonsai_mlx.scheduler import img2img_start_index, make_schedule

import mlx.core as mx
import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from variants import PIPELINES, TOLERANCE, VARIANTS, arrays, generate_kwargs, max_error

IMAGE, MASK = VARIANTS / "inpaint_image.png", VARIANTS / "inpaint_mask.png"


@pytest.fixture(scope="module")
def data():
    return arrays()


@pytest.fixture(scope="module")
def pipes():
    return {n: Pipeline.from_pretrained(PIPELINES / n, dtype="float32")
            for n in ("distilled", "base")}


@pytest.mark.parametrize("case, pipe", [
    ("inpaint_distilled", "distilled"),
    ("inpaint_base_cfg", "base"),
    ("inpaint_reference_two_images", "distilled"),  # a reference image, num_images 2
])
def test_inpainting_matches_diffusers(pipes, data, case, pipe):
    kwargs = generate_kwargs(case, data)
    err = max_error(pipes[pipe].generate(**kwargs), case, data)
    assert err < TOLERANCE, f"{case}: max abs error {err:.2e}"


def test_kept_region_is_the_noised_image_after_every_step(pipes, data):
    """Where the mask is black, each step ends on sigma_next * noise + (1 - sigma_next) * z
    (the clean image latents at the end), and the mask's edge tokens are blends."""
    pipe = pipes["distilled"]
    steps, strength = 4, 0.5
    noise = data["inpaint_distilled/noise"]  # (1, 128, 4, 5): the image's 80 x 64
    seen = []
    pipe.generate("x", images=[IMAGE], mask=MASK, strength=strength, steps=steps,
                  latents=noise, output_type="np",
                  callback=lambda i, n, lat: seen.append(np.array(lat)))
    start = img2img_start_index(steps, strength)
    assert len(seen) == steps - start
    schedule = make_schedule(pipe.scheduler_config, steps, 20)
    m = mask_latents(PIL.Image.open(MASK), 80, 64).reshape(4, 5)
    assert (m == 0).any() and (m == 1).any() and ((m > 0) & (m < 1)).any()
    untiled = GenerationRequest.create("x", tiled_vae=False)  # as generate() chose here
    z = pipe._encode_image(prepare_inpaint_image(PIL.Image.open(IMAGE)), untiled)  # -> 80x64
    z = np.array(z).reshape(4, 5, 128).transpose(2, 0, 1)
    for i, lat in enumerate(seen):
        sigma = float(schedule.sigmas[start + i + 1])
        kept = sigma * noise[0] + (1 - sigma) * z
        np.testing.assert_allclose(lat[0][:, m == 0], kept[:, m == 0], atol=1e-5)
        assert np.abs(lat[0][:, m == 1] - kept[:, m == 1]).max() > 1e-2  # repainted
    np.testing.assert_array_equal(seen[-1][0][:, m == 0], z[:, m == 0])


@pytest.mark.parametrize("mask", [None, MASK], ids=["image-to-image", "inpainting"])
def test_a_strength_that_leaves_no_step_is_an_error(pipes, mask):
    """1 step at strength 1e-17: diffusers refuses ("the number of pipeline steps is 0");
    returning the encoded input as if generated would be silent."""
    with pytest.raises(BonsaiError, match="leaves none of the 1 steps to run"):
        pipes["distilled"].generate("x", images=[IMAGE], mask=mask, strength=1e-17, steps=1,
                                    output_type="np")


def test_odd_mask_arrays_are_read_or_named():
    from bonsai_mlx.inpaint import mask_image

    half = np.zeros((64, 80), np.float32)
    half[:, 40:] = 1
    as_bf16 = mask_image(mx.array(half).astype(mx.bfloat16), (80, 64))
    np.testing.assert_array_equal(np.asarray(as_bf16), half.astype(np.uint8) * 255)
    for empty in (np.zeros((0, 0), np.uint8), np.zeros((0, 0), np.float32)):
        with pytest.raises(BonsaiError, match="mask is empty"):
            mask_image(empty, (80, 64))


def test_a_16_bit_mask_reads_as_its_8_bit_levels(tmp_path):
    """65535 is white (repaint); a faint grey 1000 of 65535 is dark (keep), as in 8 bits,
    where Pillow's own conversion would clip it to white."""
    from bonsai_mlx.inpaint import mask_image

    levels = np.full((64, 80), 1000, np.uint16)
    levels[16:48, 20:60] = 65535
    PIL.Image.fromarray(levels).save(tmp_path / "mask16.png")
    assert PIL.Image.open(tmp_path / "mask16.png").mode.startswith("I")
    read = mask_image(tmp_path / "mask16.png", (80, 64))
    assert read.mode == "L"
    np.testing.assert_array_equal(np.asarray(read), np.round(levels / 257).astype(np.uint8))
    expected = mask_latents(PIL.Image.fromarray((levels > 1000).astype(np.uint8) * 255), 80, 64)
    np.testing.assert_array_equal(mask_latents(read, 80, 64), expected)
    assert 0 < expected.mean() < 1


def test_mask_downsampling_samples_the_centre_pixels():
    """torch's bilinear (align_corners=False) at a factor of 16 averages the 2 x 2 pixels
    around each cell's centre; at other factors, the interpolation formula by hand."""
    a = np.random.default_rng(0).random((48, 80)).astype(np.float32)
    out = bilinear_resize(a, 3, 5)
    expect = a.reshape(3, 16, 5, 16)[:, 7:9, :, 7:9].mean(axis=(1, 3))
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    b = np.arange(12, dtype=np.float32).reshape(3, 4)
    # rows: src (i + 0.5) * 1.5 - 0.5 = 0.25, 1.75; cols: src = (j + 0.5) * 2 - 0.5 = 0.5, 2.5
    expect = np.array([[b[0, 0] * .75 * .5 + b[0, 1] * .75 * .5 + b[1, 0] * .25 * .5
                        + b[1, 1] * .25 * .5, 0], [0, 0]], np.float32)
    expect[0, 1] = .75 * (b[0, 2] + b[0, 3]) / 2 + .25 * (b[1, 2] + b[1, 3]) / 2
    expect[1, 0] = .25 * (b[1, 0] + b[1, 1]) / 2 + .75 * (b[2, 0] + b[2, 1]) / 2
    expect[1, 1] = .25 * (b[1, 2] + b[1, 3]) / 2 + .75 * (b[2, 2] + b[2, 3]) / 2
    np.testing.assert_allclose(bilinear_resize(b, 2, 2), expect, rtol=1e-6)


def test_mask_is_binarised_at_one_half():
    grey = np.full((32, 32), 127, np.uint8)  # 127 / 255 < 0.5: kept
    with pytest.raises(BonsaiError, match="all black"):
        mask_latents(PIL.Image.fromarray(grey), 32, 32)
    grey[:16, :16] = 128  # 128 / 255 >= 0.5: repainted (the top-left token only)
    np.testing.assert_array_equal(mask_latents(PIL.Image.fromarray(grey), 32, 32).ravel(),
                                  [1, 0, 0, 0])


def test_array_and_path_masks_give_the_same_image(pipes, tmp_path):
    pipe = pipes["distilled"]
    binary = np.zeros((70, 90), bool)
    binary[10:50, 30:80] = True
    png = tmp_path / "mask.png"
    PIL.Image.fromarray(binary.astype(np.uint8) * 255).save(png)
    kwargs = dict(images=[IMAGE], steps=2, seed=3, output_type="np")
    from_path = pipe.generate("x", mask=png, **kwargs)
    for mask in (binary, binary.astype(np.float32), binary.astype(np.uint8) * 255,
                 binary[..., None], mx.array(binary.astype(np.float32))):
        np.testing.assert_array_equal(pipe.generate("x", mask=mask, **kwargs), from_path)


def test_inpainting_default_strength_is_diffusers_0_8(pipes):
    totals = []
    pipes["distilled"].generate("x", images=[IMAGE], mask=MASK, steps=5, seed=0,
                                output_type="np", callback=lambda i, n, _: totals.append(n))
    assert set(totals) == {5 - img2img_start_index(5, 0.8)} == {4}


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask=MASK), "needs the image to repaint"),
    (dict(images=[IMAGE], mask=np.zeros((70, 90), np.float32)), "all black"),
    (dict(images=[IMAGE], mask=np.ones((64, 80), np.float32)), r"mask is 80x64 .* 90x70"),
    (dict(images=[IMAGE], mask=VARIANTS / "nope.png"), "mask .*nope.png does not exist"),
    (dict(images=[IMAGE], mask=np.full((70, 90), 2.0)), r"in \[0, 1\]"),
    (dict(images=[IMAGE], mask=np.full((70, 90), 300)), "0..255"),
    (dict(images=[IMAGE], mask="not a mask"), "does not exist"),
    (dict(images=[IMAGE], mask=42), "PIL image, a path or a"),
    (dict(images=[IMAGE], mask=MASK, strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(images=[IMAGE], mask=np.pad(np.ones((70, 1)), ((0, 0), (0, 89)))), "too thin"),
])
def test_bad_masks_are_clear_errors(pipes, kwargs, match):
    with pytest.raises(BonsaiError, match=match):
        pipes["distilled"].generate("x", steps=1, **kwargs)


def test_cli_inpaints_with_mask(tmp_path):
    from bonsai_mlx.cli import cli

    out = tmp_path / "out.png"
    result = CliRunner().invoke(cli, [
        "gen", "-m", str(PIPELINES / "distilled"), "--image", str(IMAGE), "--mask", str(MASK),
        "-p", "a red balloon", "--steps", "2", "--seed", "1", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    image = PIL.Image.open(out)
    assert image.size == (80, 64)
    assert image.text["mask"] == "inpaint_mask.png" and image.text["strength"] == "0.8"
    bad = CliRunner().invoke(cli, ["gen", "-m", str(PIPELINES / "distilled"), "-p", "x",
                                   "--mask", str(MASK)])
    assert bad.exit_code == 2 and "--mask (inpainting) needs the image to repaint" in bad.output
    missing = CliRunner().invoke(cli, ["gen", "-m", str(PIPELINES / "distilled"), "-p", "x",
                                       "--image", str(IMAGE), "--mask", "nope.png"])
    assert missing.exit_code == 2 and "--mask nope.png does not exist" in missing.output
