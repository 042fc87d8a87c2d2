"""The studio's job API on a live server: server-sent events in order (with per-step
previews), resuming a stream, cancel between steps, the bounded queue's 429 with
Retry-After, and the gallery of the output folder."""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import pytest
from PIL import Image
from serve_server import module_server, request, running_server, sse_events

SLOW = {"prompt": "a very slow picture", "size": "16x16", "steps": 500}


server = module_server("jobs", "--max-queue", "1")


def submit(server, body) -> dict:
    status, _, raw = server.request("POST", "/jobs", body)
    assert status == 202, raw
    return json.loads(raw)


def wait_until_running(server, job_id: str) -> None:
    for _, kind, _ in sse_events(server.url + f"jobs/{job_id}/events"):
        if kind == "step":
            return
    raise AssertionError("the job ended before its first step")


def wait_idle(server) -> None:
    deadline = time.monotonic() + 60
    while json.loads(server.request("GET", "/health")[2])["queue"]["running"]:
        assert time.monotonic() < deadline, "the server stayed busy"
        time.sleep(0.05)


def data_url_image(url: str) -> Image.Image:
    head, _, data = url.partition(",")
    assert head == "data:image/jpeg;base64"
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_events_arrive_in_order_with_previews(server):
    job = submit(server, {"prompt": "a small house", "n": 2, "steps": 2, "size": "64x32",
                          "seed": 5})
    events = list(sse_events(server.url + f"jobs/{job['id']}/events"))
    assert [i for i, _, _ in events] == list(range(len(events)))
    kinds = [kind for _, kind, _ in events]
    per_image = ["encode", "step", "step", "decode", "image"]
    assert kinds == ["queued", "started", *per_image, *per_image, "done"]
    steps = [data for _, kind, data in events if kind == "step"]
    assert [(s["image"], s["step"], s["total"]) for s in steps] == [
        (0, 1, 2), (0, 2, 2), (1, 1, 2), (1, 2, 2)]
    # the stream was read live, so every step carried its preview: 1/8 of the image
    for s in steps:
        assert data_url_image(s["preview"]).size == (8, 4)
    images = [data for _, kind, data in events if kind == "image"]
    assert [im["seed"] for im in images] == [5, 6]
    assert [im["name"] for im in images] == ["a-small-house-5.png", "a-small-house-6.png"]
    assert events[-1][2]["images"] == [{k: v for k, v in im.items() if k not in ("type",
                                                                                "image")}
                                       for im in images]
    status, _, raw = server.request("GET", f"/jobs/{job['id']}")
    assert status == 200 and json.loads(raw)["status"] == "done"


def test_a_stream_resumes_after_last_event_id(server):
    job = submit(server, {"prompt": "resume", "steps": 2, "size": "32x32", "seed": 1})
    first = list(sse_events(server.url + f"jobs/{job['id']}/events"))
    again = list(sse_events(server.url + f"jobs/{job['id']}/events",
                            headers={"Last-Event-ID": "3"}))
    assert [(i, k) for i, k, _ in again] == [(i, k) for i, k, _ in first[4:]]


def test_cancel_stops_between_steps_and_saves_nothing(server):
    before = set(server.output.glob("*.png"))
    job = submit(server, SLOW)
    wait_until_running(server, job["id"])
    status, _, raw = server.request("DELETE", f"/jobs/{job['id']}")
    assert status == 200 and json.loads(raw)["cancel_requested"] is True
    events = list(sse_events(server.url + f"jobs/{job['id']}/events"))
    assert events[-1][1] == "cancelled"
    steps = [d["step"] for _, k, d in events if k == "step"]
    assert steps and max(steps) < SLOW["steps"]
    assert "decode" not in [k for _, k, _ in events]
    status, _, raw = server.request("GET", f"/jobs/{job['id']}")
    assert json.loads(raw)["status"] == "cancelled"
    assert set(server.output.glob("*.png")) == before
    assert server.healthy()


def test_a_full_queue_is_429_with_retry_after(server):
    openai = pytest.importorskip("openai")
    wait_idle(server)
    running = submit(server, SLOW)
    wait_until_running(server, running["id"])
    waiting = submit(server, SLOW)  # fills the queue (--max-queue 1)
    assert waiting["position"] == 1
    try:
        status, headers, raw = server.request("POST", "/jobs", {"prompt": "one more"})
        assert status == 429
        assert int(headers["retry-after"]) >= 1
        error = json.loads(raw)["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError) as excinfo:
            client.images.generate(prompt="and another", size="32x32")
        assert int(excinfo.value.response.headers["retry-after"]) >= 1
        assert "the queue is full" in excinfo.value.response.json()["error"]["message"]
    finally:
        for job in (waiting, running):
            server.request("DELETE", f"/jobs/{job['id']}")
    status, _, raw = server.request("GET", f"/jobs/{waiting['id']}")
    assert json.loads(raw)["status"] == "cancelled"  # a waiting job ends at once
    wait_idle(server)
    job = submit(server, {"prompt": "after the rush", "steps": 1, "size": "32x32"})
    assert list(sse_events(server.url + f"jobs/{job['id']}/events"))[-1][1] == "done"


def test_unknown_jobs_are_404(server):
    for method in ("GET", "DELETE"):
        status, _, raw = server.request(method, "/jobs/0123456789abcdef")
        assert status == 404 and json.loads(raw)["error"]["code"] == "job_not_found"
    status, _, _ = server.request("GET", "/jobs/0123456789abcdef/events")
    assert status == 404


def test_a_multipart_job_edits_with_the_uploaded_images(server):
    from serve_server import REFERENCE, multipart

    body, content_type = multipart({"prompt": "edit me", "steps": "1", "seed": "4"},
                                   [("image[]", "ref.png", REFERENCE.read_bytes(),
                                     "image/png")])
    status, _, raw = server.request("POST", "/jobs", body, {"Content-Type": content_type})
    assert status == 202, raw
    events = list(sse_events(server.url + f"jobs/{json.loads(raw)['id']}/events"))
    image = [d for _, k, d in events if k == "image"][0]
    with Image.open(server.output / image["name"]) as im:
        assert im.text["images"] == "ref.png"
        # no size given: the reference's 100x72, cropped to multiples of 16 (the pipeline)
        assert im.size == (96, 64)


def test_the_gallery_lists_newest_first_with_settings(server):
    submit(server, {"prompt": "older", "steps": 1, "size": "32x32", "seed": 1})
    job = submit(server, {"prompt": "newer", "steps": 1, "size": "48x32", "seed": 2})
    list(sse_events(server.url + f"jobs/{job['id']}/events"))
    status, _, raw = server.request("GET", "/gallery")
    items = json.loads(raw)["images"]
    names = [item["name"] for item in items]
    assert names.index("newer-2.png") < names.index("older-1.png")
    newer = items[names.index("newer-2.png")]
    assert newer["settings"]["prompt"] == "newer"
    assert newer["settings"]["size"] == "48x32" and newer["settings"]["seed"] == "2"
    status, headers, raw = server.request("GET", newer["thumb"])
    assert status == 200 and headers["content-type"] == "image/jpeg"
    status, headers, raw = server.request("GET", newer["url"] + "?download=1")
    assert status == 200 and "attachment" in headers["content-disposition"]
    assert raw == (server.output / "newer-2.png").read_bytes()


def test_the_gallery_serves_only_plain_files_inside_the_folder(server, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (16, 16), "red").save(secret)
    (server.output / "link.png").symlink_to(secret)
    (server.output / ".hidden.png").write_bytes(secret.read_bytes())
    (server.output / "notes.txt").write_text("not an image")
    for path in ("/gallery/link.png", "/gallery/link.png/thumb", "/gallery/.hidden.png",
                 "/gallery/notes.txt", "/gallery/..%2F..%2Fetc%2Fpasswd",
                 "/gallery/%2e%2e/secret.png", f"/gallery/{secret}"):
        status, _, raw = server.request("GET", path)
        assert status == 404, (path, status)
        assert "error" in json.loads(raw)
    names = [item["name"] for item in json.loads(server.request("GET", "/gallery")[2])["images"]]
    assert "link.png" not in names and ".hidden.png" not in names


def test_the_studio_page_and_its_files_are_served(server):
    status, headers, raw = server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/static/studio.js" in raw
    for name in ("studio.js", "studio.css"):
        assert server.request("GET", f"/static/{name}")[0] == 200
    assert request("GET", server.url + "static/../app.py")[0] == 404


def test_a_client_that_hangs_up_cancels_its_request(server):
    wait_idle(server)  # then the first job running is this request's
    before = set(server.output.glob("*.png"))
    host, port = server.url.split("//")[1].strip("/").split(":")
    body = json.dumps(SLOW).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.monotonic() + 60
    while (running := json.loads(server.request("GET", "/health")[2])["queue"]["running"]) \
            is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    wait_until_running(server, running)
    sock.close()
    while (status := json.loads(server.request("GET", f"/jobs/{running}")[2])["status"]) \
            == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status == "cancelled"
    assert set(server.output.glob("*.png")) == before


def test_a_lazy_server_loads_the_model_on_the_first_job(tmp_path, tmp_path_factory):
    with running_server(tmp_path, "--lazy",
                        preview_cache=tmp_path_factory.getbasetemp() / "previews") as lazy:
        health = json.loads(lazy.request("GET", "/health")[2])
        assert health["model"] == {"id": "distilled", "loaded": False}
        job = submit(lazy, {"prompt": "first", "steps": 1, "size": "32x32"})
        kinds = [k for _, k, _ in sse_events(lazy.url + f"jobs/{job['id']}/events")]
        assert kinds[:4] == ["queued", "started", "loading", "encode"]
        assert kinds[-1] == "done"
        health = json.loads(lazy.request("GET", "/health")[2])
        assert health["model"]["loaded"] is True and health["model"]["default_steps"] == 4


def test_a_bug_is_a_500_without_a_traceback_and_the_server_serves_on(tmp_path, capfd):
    """In-process (uvicorn in a thread) with a pipeline that fails the way a bug would."""
    import threading

    from bonsai_mlx.serve.app import Settings, create_app
    from bonsai_mlx.serve.jobs import Worker

    import uvicorn

    class BrokenPipeline:
        is_distilled, default_steps, default_guidance = True, 4, 1.0

        def run(self, *args, **kwargs):
            raise RuntimeError("an internal detail that must not reach the client")

    worker = Worker(BrokenPipeline, tmp_path, "broken", max_queue=2)
    worker.start(preload=True)
    app = create_app(Settings(model="broken", model_id="broken", output=tmp_path), worker)
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for _ in range(2):
            status, _, raw = request("POST", url + "v1/images/generations",
                                     {"prompt": "a fox", "size": "32x32"})
            assert status == 500
            error = json.loads(raw)["error"]
            assert error["type"] == "server_error" and error["code"] == "internal_error"
            assert error["message"] == "internal error (RuntimeError); see the server's log"
            assert request("GET", url + "health")[0] == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        worker.stop()
    assert "an internal detail" in capfd.readouterr().err  # in the log, for the developer
