"""A real `bonsai-mlx serve` process on 127.0.0.1 (a free port) for the server tests, and
plain-HTTP helpers (http.client from the standard library: independent of the server's
own stack and of the openai client)."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import select
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures" / "pipeline"
TINY = FIXTURES / "distilled"
REFERENCE = FIXTURES / "reference.png"
REFERENCE2 = FIXTURES / "reference2.png"
START_TIMEOUT = 180  # seconds: a loaded 2-core CI machine imports MLX slowly


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT/
    output: Path
    log: Path
    process: subprocess.Popen

    def request(self, method: str, path: str, body=None, headers=None, timeout=60):
        return request(method, self.url + path.lstrip("/"), body, headers, timeout)

    def healthy(self) -> bool:
        status, _, body = self.request("GET", "/health")
        return status == 200 and json.loads(body)["status"] == "ok"


@contextlib.contextmanager
def running_server(tmp: Path, *args: str, model: Path = TINY, preview_cache: Path):
    """`bonsai-mlx serve -m model --port 0 -o tmp/out ARGS`; stopped (SIGTERM) afterwards.
    `preview_cache`: shared by a session's servers, so the preview is fitted once."""
    output, log = tmp / "out", tmp / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "BONSAI_PREVIEW_CACHE": str(preview_cache)}
    cmd = [sys.executable, "-m", "bonsai_mlx.cli", "serve", "-m", str(model), "--port", "0",
           "-o", str(output), *args]
    with open(log, "wb") as log_file:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, env=env)
    try:
        url = _read_url(process, log)
        server = Server(url, output, log, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def module_server(name: str, *args: str):
    """A module-scoped pytest fixture: one server for the module's tests, whose log must
    show no traceback at the end (no request made it fail)."""
    import pytest

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        with running_server(tmp_path_factory.mktemp(name), *args,
                            preview_cache=tmp_path_factory.getbasetemp() / "previews") as s:
            yield s
        log = s.log.read_text()
        assert "Traceback" not in log, log

    return server


def _read_url(process: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
        elif process.poll() is not None:
            break
    if b"http://" not in line:
        raise AssertionError(f"the server did not start: {line!r}\n{log.read_text()}")
    return line.decode().split()[-1]


def request(method: str, url: str, body=None, headers=None, timeout=60):
    """(status, headers as a dict with lower-case names, body bytes)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body,
                     headers or {})
        response = conn.getresponse()
        return (response.status, {k.lower(): v for k, v in response.getheaders()},
                response.read())
    finally:
        conn.close()


def sse_events(url: str, headers=None, timeout=120):
    """The server-sent events of a stream, as (id, type, data dict), until it ends."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path, headers=headers or {})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("content-type").startswith("text/event-stream")
        event: dict = {}
        for raw in response:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if "data" in event:
                    yield int(event["id"]), event["event"], json.loads(event["data"])
                event = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                event[key] = value
    finally:
        conn.close()


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes, str]]):
    """A multipart/form-data body: (body, content type)."""
    boundary = "----bonsai-test-boundary"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                     f"{value}\r\n".encode())
    for name, filename, data, content_type in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
                     + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def png(data: bytes | str) -> Image.Image:
    """A PNG from its bytes or from the API's base64 text (`b64_json`), loaded."""
    image = Image.open(io.BytesIO(base64.b64decode(data) if isinstance(data, str) else data))
    assert image.format == "PNG"
    image.load()
    return image


def same_pixels(image: Image.Image, expected: Image.Image) -> None:
    assert image.size == expected.size
    diff = np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16))
    assert diff.max() <= 1, diff.max()  # identical but for float rounding at .5
