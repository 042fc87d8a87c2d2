"""What `bonsai-mlx serve` refuses: other machines without a key, foreign Host headers (DNS
rebinding), state-changing requests from other web pages, wrong keys; what the studio's
sign-in cookie allows; and that none of it stops the server."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from bonsai_mlx.cli import cli

import pytest
from click.testing import CliRunner
from serve_server import TINY, module_server

KEY = "s3cret-key"


def serve(*args):
    return CliRunner().invoke(cli, ["serve", "-m", str(TINY), *args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_another_host_without_a_key_refuses_to_start(tmp_path, host):
    line = one_line_error(serve("--host", host, "--port", "0", "-o", str(tmp_path / "o")))
    assert f"--host {host} is reachable from other machines" in line
    assert "--api-key" in line and "--insecure" in line
    assert not (tmp_path / "o").exists()


def test_a_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(serve("--port", str(port), "-o", str(tmp_path / "o")))
    assert f"port {port} on 127.0.0.1 is in use" in line and "--port 0" in line


def test_an_empty_key_is_refused(tmp_path):
    assert "--api-key is empty" in one_line_error(
        serve("--api-key", " ", "--port", "0", "-o", str(tmp_path / "o")))


@pytest.fixture
def never_listens(monkeypatch):
    """A refused start must never reach the socket (without the check it would serve)."""
    def bind(*args):
        raise AssertionError("serve went on to listen")

    monkeypatch.setattr("bonsai_mlx.serve.command.bind", bind)


@pytest.mark.parametrize("option,value", [
    ("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"), ("--max-megapixels", "inf"),
    ("--max-megapixels", "nan"), ("--max-memory", "inf"), ("--max-memory", "nan"),
    ("--max-upload-mb", "1e308"),
])
def test_limits_that_are_no_finite_number_are_refused(tmp_path, never_listens, option, value):
    line = one_line_error(serve(option, value, "--port", "0", "-o", str(tmp_path / "o")))
    assert line.startswith(f"error: {option}") and "finite" in line, line
    assert not (tmp_path / "o").exists()


def test_a_lora_scale_that_is_no_finite_number_is_refused(tmp_path, never_listens):
    lora = Path(__file__).parent / "fixtures" / "lora" / "kohya.safetensors"
    line = one_line_error(serve("--lora", f"{lora}:1e999", "--port", "0",
                                "-o", str(tmp_path / "o")))
    assert f"--lora {lora}: the scale must be a finite number, not inf" in line, line


@pytest.mark.parametrize("origin", ["*", "", "null", "http://friend.example/", "friend.example",
                                    "http://friend.example/page"])
def test_an_allowed_origin_must_be_one_origin(tmp_path, never_listens, origin):
    line = one_line_error(serve("--allow-origin", origin, "--port", "0",
                                "-o", str(tmp_path / "o")))
    assert f"--allow-origin {origin!r} is not one web page's origin" in line
    assert not (tmp_path / "o").exists()


def test_an_empty_output_folder_is_refused(tmp_path, monkeypatch, never_listens):
    monkeypatch.chdir(tmp_path)  # "" would be this folder, its files in the gallery
    line = one_line_error(serve("-o", "", "--port", "0"))
    assert "-o is empty" in line


server = module_server("security", "--api-key", KEY, "--allow-origin",
                       "http://friend.example")


AUTH = {"Authorization": f"Bearer {KEY}"}
JOB = {"prompt": "a fox", "size": "32x32", "steps": 1}


def test_a_foreign_host_header_is_refused(server):
    port = server.url.rsplit(":", 1)[1].strip("/")
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        status, _, raw = server.request("GET", "/health", headers={"Host": host})
        assert status == 403, host
        assert json.loads(raw)["error"]["code"] == "invalid_host"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert server.request("GET", "/health", headers={"Host": host})[0] == 200


def test_posts_from_another_web_page_are_refused(server):
    port = server.url.rsplit(":", 1)[1].strip("/")
    for origin in ("http://evil.example", "null", f"http://localhost:{int(port) + 1}"):
        status, _, raw = server.request("POST", "/jobs", JOB,
                                        headers={**AUTH, "Origin": origin})
        assert status == 403, origin
        assert json.loads(raw)["error"]["code"] == "forbidden_origin"
    status, _, _ = server.request("DELETE", "/jobs/0123456789abcdef",
                                  headers={**AUTH, "Origin": "http://evil.example"})
    assert status == 403
    # the page itself and a page allowed with --allow-origin may
    for origin in (server.url.rstrip("/"), "http://friend.example"):
        status, headers, _ = server.request("POST", "/jobs", JOB,
                                            headers={**AUTH, "Origin": origin})
        assert status == 202, origin
    assert headers["access-control-allow-origin"] == "http://friend.example"


def test_no_cors_headers_for_other_origins(server):
    _, headers, _ = server.request("GET", "/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers


def test_the_gallery_is_readable_cross_origin_only_by_allowed_origins(server):
    _, headers, _ = server.request("GET", "/gallery",
                                   headers={**AUTH, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers
    status, headers, _ = server.request("GET", "/gallery",
                                        headers={**AUTH, "Origin": "http://friend.example"})
    assert status == 200
    assert headers["access-control-allow-origin"] == "http://friend.example"


def test_the_key_guards_everything_but_the_page_and_health(server):
    for method, path in (("GET", "/gallery"), ("GET", "/v1/models"), ("POST", "/jobs"),
                         ("GET", "/jobs/0123456789abcdef/events"),
                         ("GET", "/gallery/x.png")):
        status, headers, raw = server.request(method, path, JOB if method == "POST" else None)
        assert status == 401, path
        assert json.loads(raw)["error"]["code"] == "invalid_api_key"
    for path in ("/", "/health", "/static/studio.js"):
        assert server.request("GET", path)[0] == 200, path


def test_the_studio_signs_in_once_and_then_uses_a_cookie(server):
    status, _, _ = server.request("POST", "/session", {"key": "wrong"})
    assert status == 401
    status, headers, _ = server.request("POST", "/session", {"key": KEY})
    assert status == 204
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert KEY not in cookie
    token = cookie.split(";")[0]
    assert server.request("GET", "/gallery", headers={"Cookie": token})[0] == 200
    assert server.request("GET", "/gallery", headers={"Cookie": token + "x"})[0] == 401


def test_the_server_still_serves(server):
    assert server.healthy()
    status, _, raw = server.request("POST", "/v1/images/generations", JOB, headers=AUTH)
    assert status == 200 and json.loads(raw)["data"][0]["b64_json"]

