"""`bonsai-mlx serve` answers the official `openai` client (a live server on 127.0.0.1 with
the tiny distilled pipeline): generate and edit give the PNGs the library itself makes for
the same settings; every bad request gets its status and an OpenAI-shaped error body, and
the server keeps serving."""

from __future__ import annotations

import base64
import io
import itertools
import json

from bonsai_mlx.pipeline import Pipeline

import numpy as np
import pytest
from PIL import Image
from serve_server import REFERENCE, REFERENCE2, TINY, module_server, png, request, same_pixels

openai = pytest.importorskip("openai")

KEY = "test-key-0123456789"
STEPS = 2


server = module_server("openai", "--api-key", KEY, "--max-upload-mb", "1")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(TINY, dtype="auto")


# ---- what works ------------------------------------------------------------------------------


def test_generate_b64_gives_the_pipelines_pngs_at_the_requested_size(client, pipe):
    result = client.images.generate(prompt="a red fox in the snow", size="64x48", n=2,
                                    extra_body={"seed": 7, "steps": STEPS})
    assert len(result.data) == 2
    for i, item in enumerate(result.data):
        assert item.url is None and item.revised_prompt is None
        assert item.model_extra["seed"] == 7 + i
        image = png(base64.b64decode(item.b64_json))
        assert image.size == (64, 48)
        assert image.text["prompt"] == "a red fox in the snow"
        assert image.text["seed"] == str(7 + i) and image.text["steps"] == str(STEPS)
        same_pixels(image, pipe.generate("a red fox in the snow", width=64, height=48,
                                         steps=STEPS, seed=7 + i))


def test_generate_url_serves_the_saved_file(server, client):
    result = client.images.generate(prompt="a lighthouse", size="32x64",
                                    response_format="url", extra_body={"seed": 3,
                                                                       "steps": STEPS})
    url = result.data[0].url
    assert url.startswith(server.url) and url.endswith("/a-lighthouse-3.png")
    assert result.data[0].b64_json is None
    status, headers, body = request("GET", url, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and headers["content-type"] == "image/png"
    assert body == (server.output / "a-lighthouse-3.png").read_bytes()
    assert png(body).size == (32, 64)


def test_generating_again_never_overwrites(server, client):
    for _ in range(2):
        client.images.generate(prompt="same name", size="32x32",
                               extra_body={"seed": 11, "steps": 1})
    assert (server.output / "same-name-11.png").is_file()
    assert (server.output / "same-name-11-1.png").is_file()


def test_edit_with_one_image_is_the_pipelines_edit(client, pipe):
    with open(REFERENCE, "rb") as f:
        result = client.images.edit(image=f, prompt="make it night", size="64x64",
                                    extra_body={"seed": 5, "steps": STEPS})
    image = png(base64.b64decode(result.data[0].b64_json))
    assert image.size == (64, 64)
    assert image.text["images"] == "reference.png"
    same_pixels(image, pipe.generate("make it night", width=64, height=64, steps=STEPS,
                                     seed=5, images=[REFERENCE]))


def test_edit_with_two_images_uses_both(client, pipe):
    result = client.images.edit(image=[open(REFERENCE, "rb"), open(REFERENCE2, "rb")],
                                prompt="the two together", size="48x64",
                                extra_body={"seed": 2, "steps": STEPS})
    image = png(base64.b64decode(result.data[0].b64_json))
    assert image.size == (48, 64)
    assert image.text["images"] == "reference.png, reference2.png"
    same_pixels(image, pipe.generate("the two together", width=48, height=64, steps=STEPS,
                                     seed=2, images=[REFERENCE, REFERENCE2]))


def test_edit_with_strength_is_image_to_image(client, pipe):
    with open(REFERENCE, "rb") as f:
        result = client.images.edit(image=f, prompt="an oil painting",
                                    extra_body={"seed": 9, "steps": 4, "strength": 0.5})
    image = png(base64.b64decode(result.data[0].b64_json))
    expected = pipe.generate("an oil painting", steps=4, seed=9, images=[REFERENCE],
                             strength=0.5)
    assert image.size == expected.size  # no size: the input image's
    assert image.text["strength"] == "0.5"
    same_pixels(image, expected)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert models.data[0].id == "distilled"
    assert models.data[0].model_extra["served"] is True


def test_models_lists_the_served_one_then_cached_klein_pipelines(tmp_path, monkeypatch):
    import os

    from bonsai_mlx.serve.models import model_list

    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))

    def cached(repo: str, name: str, content: str) -> None:  # the Hub cache's layout
        folder = tmp_path / ("models--" + repo.replace("/", "--"))
        snapshot = folder / "snapshots" / "0123abcd"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("0123abcd")
        (folder / "blobs").mkdir()
        (folder / "blobs" / "blob0").write_text(content)
        (snapshot / name).parent.mkdir(parents=True)
        (snapshot / name).symlink_to(os.path.relpath(folder / "blobs" / "blob0",
                                                     (snapshot / name).parent))

    cached("prism-ml/bonsai-image-ternary-4B-mlx-2bit", "transformer-packed-mflux/config.json",
           "{}")
    cached("someone/klein-finetune", "model_index.json", '{"_class_name": "Flux2KleinPipeline"}')
    cached("someone/sdxl", "model_index.json", '{"_class_name": "StableDiffusionXLPipeline"}')
    cached("someone/klein-finetune-served", "model_index.json",
           '{"_class_name": "Flux2KleinPipeline"}')
    models = model_list("klein-finetune-served", "someone/klein-finetune-served", loaded=True,
                        created=1)
    assert [(m["id"], m["served"], m.get("alias")) for m in models] == [
        ("klein-finetune-served", True, None),
        ("prism-ml/bonsai-image-ternary-4B-mlx-2bit", False, "ternary"),
        ("someone/klein-finetune", False, None),
    ]
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in models)


# ---- what fails, and how -----------------------------------------------------------------


def error_of(excinfo) -> dict:
    body = excinfo.value.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("kwargs, param, phrase", [
    ({"size": "65x64"}, "size", "width 65 is not a multiple of 16; use 64 or 80"),
    ({"size": "8192x8192"}, "size", "out of range"),
    ({"size": "2048x4096"}, "size", "8.4 megapixels"),
    ({"size": "big"}, "size", "is not WIDTHxHEIGHT"),
    ({"n": 0}, "n", "n must be an integer in 1..8, not 0"),
    ({"n": 100}, "n", "n must be an integer in 1..8, not 100"),
    ({"response_format": "jpeg"}, "response_format", "'b64_json' or 'url'"),
    ({"extra_body": {"steps": 0}}, "steps", "steps must be an integer in 1..1000, not 0"),
    ({"extra_body": {"steps": 2.5}}, "steps", "steps must be an integer, not 2.5"),
    ({"extra_body": {"seed": -1}}, "seed", "seed must be an integer >= 0, not -1"),
    ({"extra_body": {"seed": 2**64}}, "seed", "seed must be at most 2**64 - n"),
    ({"extra_body": {"strength": 1.5}}, "strength", "strength 1.5 is out of range"),
    ({"extra_body": {"guidance": "high"}}, "guidance", "guidance must be a number"),
    ({"extra_body": {"negative_prompt": 3}}, "negative_prompt", "must be a string"),
    ({"prompt": "   "}, "prompt", "prompt must not be empty"),
])
def test_bad_generation_requests_are_400_and_the_server_keeps_serving(
        server, client, kwargs, param, phrase):
    kwargs = {"prompt": "a fox", **kwargs}
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.images.generate(**kwargs)
    error = error_of(excinfo)
    assert excinfo.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert phrase in error["message"], error["message"]
    assert server.healthy()


def test_strength_without_an_image_is_400(client):
    # the generation's own check (GenerationRequest), run before the job is queued
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.images.generate(prompt="a fox", size="32x32", extra_body={"strength": 0.5})
    error = error_of(excinfo)
    assert error["param"] == "image"
    assert "image-to-image (strength) needs exactly one image, got 0" in error["message"]


def test_not_an_image_is_400(server, client):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.images.edit(image=("notes.png", b"this is text, not a PNG", "image/png"),
                           prompt="edit it")
    error = error_of(excinfo)
    assert error["param"] == "image" and error["code"] == "invalid_image"
    assert "image 1 (notes.png) is not a readable image" in error["message"]
    assert server.healthy()


def test_a_gif_is_refused_by_format(client):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, format="GIF")
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.images.edit(image=("anim.gif", buf.getvalue(), "image/gif"), prompt="x")
    assert "is a GIF image" in error_of(excinfo)["message"]


@pytest.mark.parametrize("side", [8_000, 10_000])  # over our limit; over PIL's too
def test_a_decompression_bomb_is_refused_before_decoding(client, side):
    # a PNG of one colour: ~100 kB compressed, hundreds of MB decoded
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 1024 * 1024
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.images.edit(image=("bomb.png", buf.getvalue(), "image/png"), prompt="x")
    assert "megapixels accepted" in error_of(excinfo)["message"]


def test_an_upload_over_the_limit_is_413(server, client):
    noise = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    assert len(buf.getvalue()) > 1024 * 1024
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.images.edit(image=("big.png", buf.getvalue(), "image/png"), prompt="x")
    assert excinfo.value.status_code == 413
    error = error_of(excinfo)
    assert error["code"] == "request_too_large" and "1 MB" in error["message"]
    assert server.healthy()


def test_edit_without_an_image_is_400(server):
    from serve_server import multipart

    body, content_type = multipart({"prompt": "x"}, [])
    status, _, raw = server.request("POST", "/v1/images/edits", body,
                                    {"Content-Type": content_type,
                                     "Authorization": f"Bearer {KEY}"})
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "image"


@pytest.mark.parametrize("key", ["wrong-key", ""])
def test_a_wrong_key_is_401(server, key):
    bad = openai.OpenAI(base_url=server.url + "v1", api_key=key or "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as excinfo:
        bad.images.generate(prompt="a fox", size="32x32")
    assert excinfo.value.status_code == 401
    assert error_of(excinfo)["code"] == "invalid_api_key"
    status, headers, _ = server.request("GET", "/v1/models")  # no key at all
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert server.healthy()  # /health needs no key


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.images.generate(prompt="a fox", model="dall-e-3", size="32x32")
    error = error_of(excinfo)
    assert error["code"] == "model_not_found" and "'distilled'" in error["message"]


def test_the_served_model_may_be_named(client):
    result = client.images.generate(prompt="a fox", model="distilled", size="32x32",
                                    extra_body={"steps": 1})
    assert png(base64.b64decode(result.data[0].b64_json)).size == (32, 32)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"'])
def test_a_body_that_is_not_a_json_object_is_400(server, body):
    status, _, raw = server.request("POST", "/v1/images/generations", body,
                                    {"Content-Type": "application/json",
                                     "Authorization": f"Bearer {KEY}"})
    assert status == 400
    assert json.loads(raw)["error"]["code"] == "invalid_json"


def test_a_non_finite_number_is_400(server):
    # Python's json (the server's) reads NaN; the openai client would not send it
    status, _, raw = server.request("POST", "/v1/images/generations",
                                    b'{"prompt": "a fox", "guidance": NaN}',
                                    {"Content-Type": "application/json",
                                     "Authorization": f"Bearer {KEY}"})
    assert status == 400
    error = json.loads(raw)["error"]
    assert error["param"] == "guidance" and "finite" in error["message"]


def test_unknown_routes_and_methods_are_openai_shaped(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    status, _, raw = server.request("GET", "/v1/nothing", headers=auth)
    assert status == 404 and json.loads(raw)["error"]["code"] == "not_found"
    status, _, raw = server.request("GET", "/v1/images/generations", headers=auth)
    assert status == 405 and json.loads(raw)["error"]["type"] == "invalid_request_error"


def test_a_body_far_over_the_limit_is_413_not_a_broken_connection(server):
    # more than the kernel's socket buffers hold: the server must read it to be heard
    body = b"x" * (24 * 1024 * 1024)
    status, _, raw = server.request("POST", "/v1/images/edits", body,
                                    {"Content-Type": "multipart/form-data; boundary=b",
                                     "Authorization": f"Bearer {KEY}"})
    assert status == 413
    assert json.loads(raw)["error"]["code"] == "request_too_large"
    assert server.healthy()


def test_a_chunked_body_over_the_limit_is_413(server):
    import http.client

    host, port = server.url.split("//")[1].strip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    head = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    chunks = itertools.chain([head], (b"y" * 65536 for _ in range(32)))  # 2 MB, unsized
    conn.request("POST", "/v1/images/edits", body=chunks, encode_chunked=True,
                 headers={"Content-Type": "multipart/form-data; boundary=b",
                          "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    assert server.healthy()
