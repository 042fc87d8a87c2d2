"""What every request passes before the app sees it (an ASGI middleware):

- Host: bound to a loopback address, the server answers only to `localhost`, `127.0.0.1`
  and `[::1]`, so a web page whose domain is made to resolve to 127.0.0.1 (DNS rebinding)
  cannot read it.
- Origin: a POST or DELETE sent by a page of another origin (a browser always says which)
  is refused, unless that origin was allowed with --allow-origin.
- API key: with --api-key, everything but the studio's static page and /health needs
  `Authorization: Bearer KEY` (compared in constant time) or the studio's session cookie.
- Size: a body larger than the upload limit is answered 413 (from its Content-Length, or
  as soon as more than the limit has arrived).
"""

from __future__ import annotations

import hashlib
import hmac

from bonsai_mlx.serve.errors import ApiError

from starlette.datastructures import Headers

PUBLIC_PATHS = ("/", "/health", "/session", "/favicon.ico")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SESSION_COOKIE = "bonsai_session"


def session_cookie(api_key: str | None, given) -> str | None:
    """The session token for a correct key (None for a wrong one)."""
    if api_key is None or not isinstance(given, str):
        return None
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        return None
    return _session_token(api_key)


def _session_token(api_key: str) -> str:
    return hmac.new(api_key.encode(), b"bonsai-mlx studio session", hashlib.sha256).hexdigest()


class _BodyTooLarge(Exception):
    pass


class Guard:
    def __init__(self, app, *, api_key: str | None, loopback: bool, max_body: int,
                 allow_origins: list[str]):
        self.app = app
        self.api_key = api_key
        self.loopback = loopback
        self.max_body = max_body
        self.allow_origins = set(allow_origins)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self._check(scope, headers)
        except ApiError as e:
            await e.response()(scope, receive, send)
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)

    def _check(self, scope, headers: Headers) -> None:
        host = headers.get("host", "")
        if self.loopback and _hostname(host) not in LOOPBACK_HOSTS:
            raise ApiError(403, f"this server answers to localhost only, not to Host {host!r} "
                                "(start it with --host to serve other names)",
                           code="invalid_host")
        origin = headers.get("origin")
        if (scope["method"] not in SAFE_METHODS and origin is not None
                and origin != f"{scope.get('scheme', 'http')}://{host}"
                and origin not in self.allow_origins):
            raise ApiError(403, f"requests from the web page at {origin} are refused (allow "
                                "it with --allow-origin)", code="forbidden_origin")
        path = scope["path"]
        if self.api_key is not None and not (path in PUBLIC_PATHS
                                             or path.startswith("/static/")):
            self._check_key(headers)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise self._too_large()

    def _check_key(self, headers: Headers) -> None:
        auth = headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              self.api_key.encode()):
            return
        cookie = _cookie(headers.get("cookie", ""), SESSION_COOKIE)
        if cookie and hmac.compare_digest(cookie.encode(),
                                          _session_token(self.api_key).encode()):
            return
        message = ("wrong API key" if auth else
                   "this server needs an API key: send `Authorization: Bearer KEY`")
        raise ApiError(401, message, code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})

    def _too_large(self) -> ApiError:
        mb = self.max_body / (1024 * 1024)
        return ApiError(413, f"the request body is larger than the upload limit ({mb:g} MB; "
                             "see --max-upload-mb)", code="request_too_large")


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
