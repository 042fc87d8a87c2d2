"""What `bonsai-mlx serve` does with the library's inpainting, LoRAs and memory estimate, on a
live server (the tiny distilled pipeline, two LoRAs loaded at start-up, a small memory cap)
driven by the official `openai` client and the job API:

- `mask` on /v1/images/edits: OpenAI's convention (fully transparent = edit) and an opaque
  black-and-white mask (white = repaint) give `Pipeline.generate(..., mask=...)`'s image;
- `loras` in the body chooses among the server's LoRAs and sets their scales for that
  request only: the image is `Pipeline.generate` with the same LoRAs, the next request gets
  the defaults again, and a request cannot make the server read a file;
- a request estimated not to fit in memory is a 400 naming the largest size that fits.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

from bonsai_mlx.memory import largest_fitting_size, read_model_sizes
from bonsai_mlx.pipeline import Pipeline

import numpy as np
import pytest
from PIL import Image
from serve_server import REFERENCE, TINY, module_server, multipart, png, same_pixels, sse_events

openai = pytest.importorskip("openai")

LORAS = Path(__file__).parent / "fixtures" / "lora"
MAX_MEMORY = 20_000_000  # bytes (--max-memory 0.02): the tiny model fits up to ~112x112
STEPS = 2
# the area to repaint in the 100x72 reference: rows 10..49, columns 30..79
HOLE = (slice(10, 50), slice(30, 80))

server = module_server("extras", "--lora", f"{LORAS / 'diffusers.safetensors'}:0.7",
                       "--lora", str(LORAS / "kohya.safetensors"),
                       "--max-memory", str(MAX_MEMORY / 1e9))
DEFAULTS = {"diffusers": 0.7, "kohya": 1.0}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(TINY, dtype="auto")


@pytest.fixture
def with_loras(pipe):
    """The pipeline with the given LoRAs at the given scales; none again afterwards."""

    def load(scales: dict[str, float]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the diffusers fixture's text-encoder tensors
            for name, scale in scales.items():
                pipe.load_lora(LORAS / f"{name}.safetensors", scale=scale)
        return pipe

    yield load
    pipe.unload_lora()


def differs(image: Image.Image, other: Image.Image) -> bool:
    return np.abs(np.asarray(image, np.int16) - np.asarray(other, np.int16)).max() > 8


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def hole_mask() -> np.ndarray:
    """The library's mask for HOLE: True = repaint, the reference's (height, width)."""
    mask = np.zeros((72, 100), bool)
    mask[HOLE] = True
    return mask


def openai_style_mask() -> bytes:
    """OpenAI's convention: the image itself, with the area to edit erased (alpha 0)."""
    rgba = np.asarray(Image.open(REFERENCE).convert("RGBA")).copy()
    rgba[..., 3] = 255
    rgba[HOLE + (3,)] = 0
    return png_bytes(Image.fromarray(rgba, "RGBA"))


def error_of(excinfo) -> dict:
    body = excinfo.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert excinfo.value.status_code == 400
    return body["error"]


# ---- mask ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["transparent", "black-and-white"])
def test_an_edit_with_a_mask_is_the_pipelines_inpainting(server, client, pipe, kind):
    mask = (openai_style_mask() if kind == "transparent"
            else png_bytes(Image.fromarray(hole_mask().astype(np.uint8) * 255, "L")))
    result = client.images.edit(image=open(REFERENCE, "rb"), mask=("mask.png", mask),
                                prompt="a window", size="64x48",
                                extra_body={"seed": 3, "steps": STEPS, "loras": "[]"})
    image = png(result.data[0].b64_json)
    assert image.text["mask"] == "mask.png" and image.text["strength"] == "0.8"
    expected = pipe.generate("a window", width=64, height=48, steps=STEPS, seed=3,
                             images=[REFERENCE], mask=hole_mask())
    same_pixels(image, expected)
    # the mask mattered: repainting everything is another picture
    everything = pipe.generate("a window", width=64, height=48, steps=STEPS, seed=3,
                               images=[REFERENCE], mask=np.ones((72, 100), bool))
    assert differs(expected, everything)
    assert server.healthy()


def test_a_photo_with_an_exif_rotation_is_edited_upright(client, pipe, tmp_path):
    """A phone photo stores its pixels sideways with an EXIF orientation; the browser shows
    (and the studio paints the mask over) it upright, as diffusers' load_image reads it."""
    from bonsai_mlx.images import load_image

    upright = Image.open(REFERENCE).convert("RGB")  # 100x72, as the mask
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    sideways = tmp_path / "photo.png"
    upright.transpose(Image.Transpose.ROTATE_90).save(sideways, exif=exif)
    assert Image.open(sideways).size == (72, 100)
    assert load_image(sideways).size == (100, 72)  # gen --image reads it upright too
    result = client.images.edit(image=open(sideways, "rb"), mask=("mask.png",
                                                                   openai_style_mask()),
                                prompt="a window", size="64x48",
                                extra_body={"seed": 3, "steps": STEPS, "loras": "[]"})
    same_pixels(png(result.data[0].b64_json),
                pipe.generate("a window", width=64, height=48, steps=STEPS, seed=3,
                              images=[upright], mask=hole_mask()))


def test_a_mask_with_a_second_image_inpaints_the_first(client, pipe):
    from serve_server import REFERENCE2

    result = client.images.edit(image=[open(REFERENCE, "rb"), open(REFERENCE2, "rb")],
                                mask=("m.png", openai_style_mask()), prompt="a door",
                                size="48x48",
                                extra_body={"seed": 8, "steps": STEPS, "loras": "[]",
                                            "strength": 0.6})
    expected = pipe.generate("a door", width=48, height=48, steps=STEPS, seed=8,
                             images=[REFERENCE, REFERENCE2], mask=hole_mask(), strength=0.6)
    same_pixels(png(result.data[0].b64_json), expected)


@pytest.mark.parametrize("mask, param, code, phrase", [
    (png_bytes(Image.new("L", (64, 64), 255)), "mask", "invalid_value",
     "mask is 64x64 but the image to inpaint is 100x72"),
    (png_bytes(Image.new("RGBA", (100, 72), (0, 0, 0, 255))), "mask", "invalid_mask",
     "mask marks nothing to edit"),
    (png_bytes(Image.new("L", (100, 72), 100)), "mask", "invalid_mask",
     "mask marks nothing to edit"),
    (b"not an image at all", "mask", "invalid_image", "mask (m.png) is not a readable image"),
])
def test_a_bad_mask_is_400_naming_the_mask(server, client, mask, param, code, phrase):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.images.edit(image=open(REFERENCE, "rb"), mask=("m.png", mask), prompt="x")
    error = error_of(excinfo)
    assert (error["param"], error["code"]) == (param, code)
    assert phrase in error["message"], error["message"]
    assert server.healthy()


def test_a_job_with_a_mask_inpaints(server, pipe):
    body, content_type = multipart(
        {"prompt": "a window", "steps": str(STEPS), "seed": "3", "size": "64x48",
         "loras": "[]"},
        [("image[]", "ref.png", REFERENCE.read_bytes(), "image/png"),
         ("mask", "hole.png", openai_style_mask(), "image/png")])
    status, _, raw = server.request("POST", "/jobs", body, {"Content-Type": content_type})
    assert status == 202, raw
    events = list(sse_events(server.url + f"jobs/{json.loads(raw)['id']}/events"))
    assert events[-1][1] == "done", events[-1]
    with Image.open(server.output / events[-1][2]["images"][0]["name"]) as image:
        assert image.text["mask"] == "hole.png"
        same_pixels(image, pipe.generate("a window", width=64, height=48, steps=STEPS,
                                         seed=3, images=[REFERENCE], mask=hole_mask()))


# ---- LoRAs -----------------------------------------------------------------------------------


def test_a_request_sets_lora_scales_for_itself_only(client, pipe, with_loras):
    def generate(**extra):
        result = client.images.generate(prompt="a bonsai", size="48x32",
                                        extra_body={"seed": 4, "steps": STEPS, **extra})
        return png(result.data[0].b64_json)

    chosen = generate(loras=[{"name": "kohya", "scale": 0.5}])
    assert chosen.text["loras"] == "kohya.safetensors:0.5"  # as gen records them
    plain = pipe.generate("a bonsai", width=48, height=32, steps=STEPS, seed=4)
    expected = with_loras({"kohya": 0.5}).generate("a bonsai", width=48, height=32,
                                                   steps=STEPS, seed=4)
    same_pixels(chosen, expected)
    assert differs(chosen, plain)
    pipe.unload_lora()

    # the next request without `loras`: the server's defaults again
    default = generate()
    assert default.text["loras"] == "diffusers.safetensors:0.7; kohya.safetensors:1"
    same_pixels(default, with_loras(DEFAULTS).generate("a bonsai", width=48, height=32,
                                                       steps=STEPS, seed=4))
    # an empty list: no LoRA at all
    none = generate(loras=[])
    same_pixels(none, plain)
    assert "loras" not in none.text


def test_an_edit_takes_loras_as_a_json_form_field(client, with_loras):
    result = client.images.edit(
        image=open(REFERENCE, "rb"), prompt="ink drawing", size="48x48",
        extra_body={"seed": 6, "steps": STEPS,
                    "loras": json.dumps([{"name": "diffusers"}, {"name": "kohya",
                                                                 "scale": -0.5}])})
    image = png(result.data[0].b64_json)
    assert image.text["loras"] == "diffusers.safetensors:0.7; kohya.safetensors:-0.5"
    expected = with_loras({"diffusers": 0.7, "kohya": -0.5}).generate(
        "ink drawing", width=48, height=48, steps=STEPS, seed=6, images=[REFERENCE])
    same_pixels(image, expected)


def test_a_job_chooses_loras_like_the_api(server, with_loras):
    body = {"prompt": "a bonsai", "size": "32x32", "seed": 2, "steps": STEPS,
            "loras": [{"name": "diffusers", "scale": 1.5}]}
    status, _, raw = server.request("POST", "/jobs", body)
    assert status == 202, raw
    events = list(sse_events(server.url + f"jobs/{json.loads(raw)['id']}/events"))
    with Image.open(server.output / events[-1][2]["images"][0]["name"]) as image:
        assert image.text["loras"] == "diffusers.safetensors:1.5"
        same_pixels(image, with_loras({"diffusers": 1.5}).generate(
            "a bonsai", width=32, height=32, steps=STEPS, seed=2))


@pytest.mark.parametrize("body, param", [
    ('"loras": [{"name": "kohya", "scale": 1%s}]' % ("0" * 400), "loras"),  # beyond float
    ('"guidance": 1%s' % ("0" * 400), "guidance"),
    ('"seed": 1%s' % ("0" * 5000), None),  # beyond what Python reads as an int by default
])
def test_numbers_too_large_for_a_float_are_a_400(server, body, param):
    raw_body = ('{"prompt": "a bonsai", "size": "32x32", ' + body + "}").encode()
    for path in ("/v1/images/generations", "/jobs"):
        status, _, raw = server.request("POST", path, raw_body,
                                        {"Content-Type": "application/json"})
        assert status == 400, (path, raw[:300])
        error = json.loads(raw)["error"]
        assert len(error["message"]) < 300 and (param is None or error["param"] == param)
    assert server.healthy()


def test_models_lists_the_loras_requests_may_choose(client):
    served = client.models.list().data[0]
    assert served.model_extra["loras"] == [
        {"name": "diffusers", "scale": 0.7, "file": "diffusers.safetensors"},
        {"name": "kohya", "scale": 1.0, "file": "kohya.safetensors"}]


@pytest.mark.parametrize("loras, code, phrase", [
    ([{"name": "nope"}], "lora_not_found",
     "loras[0].name: no LoRA named 'nope' is loaded on this server; loaded: diffusers, kohya"),
    ([{"path": str(LORAS / "kohya.safetensors")}], "unsupported_parameter",
     "this server reads no file a request names"),
    ([{"path": "/etc/passwd", "name": "kohya"}], "unsupported_parameter", "loras[0].path"),
    ([{"name": "kohya"}, {"name": "kohya", "scale": 2}], "invalid_value", "listed twice"),
    ([{"name": "kohya", "scale": "high"}], "invalid_value",
     "loras[0].scale must be a number, not 'high'"),
    ([{"name": "kohya", "weight": 1}], "invalid_value", "unknown fields ['weight']"),
    ({"kohya": 1}, "invalid_value", "loras must be a list"),
    (["kohya"], "invalid_value", "loras[0] must be an object"),
])
def test_bad_loras_are_400(server, client, loras, code, phrase):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.images.generate(prompt="x", size="32x32", extra_body={"loras": loras})
    error = error_of(excinfo)
    assert (error["param"], error["code"]) == ("loras", code)
    assert phrase in error["message"], error["message"]
    assert server.healthy()


def test_an_edits_loras_must_be_one_json_field(client):
    for loras, phrase in ([[{"name": "kohya"}], "one form field holding JSON"],
                          ["{not json", "loras is not valid JSON"]):
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.images.edit(image=open(REFERENCE, "rb"), prompt="x",
                               extra_body={"loras": loras})
        assert phrase in error_of(excinfo)["message"]


# ---- memory --------------------------------------------------------------------------------


def test_a_size_that_does_not_fit_is_400_naming_the_largest_that_does(server, client):
    fit = largest_fitting_size(read_model_sizes(TINY, "auto"), 1024, 1024, MAX_MEMORY,
                               dtype="auto")
    assert fit is not None and fit[0] < 1024
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.images.generate(prompt="too big", size="1024x1024")
    error = error_of(excinfo)
    assert (error["param"], error["code"]) == ("size", "insufficient_memory")
    message = error["message"]
    assert message.startswith("1024x1024 needs about ")
    assert f"the largest size that fits is {fit[0]}x{fit[1]}" in message
    assert "--max-memory" in message
    # the size named is served; 16 pixels more is not
    result = client.images.generate(prompt="just fits", size=f"{fit[0]}x{fit[1]}",
                                    extra_body={"steps": 1})
    assert png(result.data[0].b64_json).size == fit
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="too big", size=f"{fit[0] + 16}x{fit[1] + 16}")
    # the job API checks before queueing too
    status, _, raw = server.request("POST", "/jobs", {"prompt": "too big", "size": "512x512"})
    assert status == 400 and json.loads(raw)["error"]["code"] == "insufficient_memory"
    assert server.healthy()


def test_the_memory_check_counts_the_input_images():
    from bonsai_mlx.request import GenerationRequest
    from bonsai_mlx.serve.errors import ApiError
    from bonsai_mlx.serve.memory_check import MemoryCheck

    sizes = read_model_sizes(TINY, "auto")
    plain = GenerationRequest.create("x", width=96, height=96)
    edit = GenerationRequest.create("x", width=96, height=96, images=[Image.new("RGB",
                                                                               (512, 512))])
    assert edit.reference_sizes == ((512, 512),)
    from bonsai_mlx.memory import estimate_memory

    limit = estimate_memory(sizes, 96, 96).total  # the plain request just fits
    # the 512x512 input image does not, even encoded in the smallest tiles
    assert estimate_memory(sizes, 96, 96, reference_sizes=((512, 512),),
                           available=limit).total > limit
    check = MemoryCheck(str(TINY), "auto", limit=limit)  # not loaded: read from the folder
    check.check(plain, None)
    with pytest.raises(ApiError) as excinfo:
        check.check(edit, None)
    assert excinfo.value.status == 400 and "fewer, smaller input images" in excinfo.value.message


def test_serve_no_offload_counts_the_text_encoder_as_resident():
    from bonsai_mlx.memory import estimate_memory
    from bonsai_mlx.request import GenerationRequest
    from bonsai_mlx.serve.errors import ApiError
    from bonsai_mlx.serve.memory_check import MemoryCheck

    request = GenerationRequest.create("x", width=96, height=96, tiled_vae=False)
    limit = estimate_memory(read_model_sizes(TINY, "auto"), 96, 96, tiled_vae=False).total
    MemoryCheck(str(TINY), "auto", limit=limit).check(request, None)
    with pytest.raises(ApiError) as excinfo:
        MemoryCheck(str(TINY), "auto", limit=limit, keep_text_encoder=True).check(request, None)
    assert excinfo.value.code == "insufficient_memory"


def test_bonsai_no_memory_check_turns_it_off(monkeypatch):
    from bonsai_mlx.request import GenerationRequest
    from bonsai_mlx.serve.memory_check import MemoryCheck

    check = MemoryCheck(str(TINY), "auto", limit=1000)
    monkeypatch.setenv("BONSAI_NO_MEMORY_CHECK", "1")
    check.check(GenerationRequest.create("x", width=1024, height=1024), None)


def test_what_mlx_already_holds_counts_as_available_to_the_next_request(monkeypatch):
    import bonsai_mlx.memory as memory
    from bonsai_mlx.request import GenerationRequest
    from bonsai_mlx.serve.errors import ApiError
    from bonsai_mlx.serve.memory_check import MemoryCheck

    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.gpu:
        pytest.skip("the Linux (CPU) branch")
    # untiled: a tiled VAE would make the request fit in less
    need = memory.estimate_memory(read_model_sizes(TINY, "auto"), 64, 64, tiled_vae=False).total
    held = {"active": 0, "cache": 0}
    monkeypatch.setattr(memory, "_linux_available", lambda: need - 1000)  # free memory
    monkeypatch.setattr(memory._malloc, "free_bytes", lambda: 0)  # glibc keeps nothing freed
    monkeypatch.setattr(memory.mx, "get_active_memory", lambda: held["active"])
    monkeypatch.setattr(memory.mx, "get_cache_memory", lambda: held["cache"])
    assert memory.available_memory() == need - 1000
    check, request = MemoryCheck(str(TINY), "auto"), GenerationRequest.create("x", width=64,
                                                                              height=64,
                                                                              tiled_vae=False)
    with pytest.raises(ApiError):
        check.check(request, None)
    # the loaded model (active) and MLX's buffer cache are the next job's to reuse
    held.update(active=600, cache=500)
    assert memory.available_memory(include_own=True) == need + 100
    check.check(request, None)
