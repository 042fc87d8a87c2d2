"""The ASGI app: the OpenAI Images API, the studio's job API, the gallery, the studio page.

    POST /v1/images/generations   JSON: prompt, n, size, response_format, model, user,
                                  and seed, steps, guidance, negative_prompt, strength,
                                  loras ([{"name", "scale"}], among the server's --lora)
    POST /v1/images/edits         multipart: image / image[] (PNG, JPEG, WebP), mask
                                  (inpainting the first image), the same fields (loras
                                  as one JSON-encoded field)
    GET  /v1/models, /health
    POST /jobs                    JSON or multipart as above -> 202 {"id", ...}
    GET  /jobs/{id}               status and images
    GET  /jobs/{id}/events        server-sent events: queued, started, encode, step (with a
                                  preview), decode, image, then done | error | cancelled
    DELETE /jobs/{id}             cancel (queued: now; running: at the next step)
    GET  /gallery, /gallery/{name}, /gallery/{name}/thumb
    GET  /                        the studio (static files in bonsai_mlx/serve/static)

Every error is `{"error": {"message", "type", "param", "code"}}` with its status; nothing a
client sends stops the server. A request estimated not to fit in memory is a 400 (param
`size`, code `insufficient_memory`) naming the largest size that fits.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from bonsai_mlx import __version__
from bonsai_mlx.serve.errors import ApiError, error_response
from bonsai_mlx.serve.gallery import Gallery
from bonsai_mlx.serve.guard import Guard, session_cookie
from bonsai_mlx.serve.jobs import ImageRequest, Job, QueueFull, Stopping, Worker
from bonsai_mlx.serve.memory_check import MemoryCheck
from bonsai_mlx.serve.params import form_uploads, image_request, json_fields
from bonsai_mlx.weights import MODEL_ALIASES

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
TERMINAL_EVENTS = ("done", "error", "cancelled")
KEEPALIVE_SECONDS = 15.0
DISCONNECT_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class ServedLora:
    """A LoRA the operator loaded (`--lora PATH[:SCALE]`): requests choose it by name."""

    name: str
    scale: float  # its default; a request may set another for itself
    file: str  # the file's name as PNG metadata records it (no local folder)


@dataclass
class Settings:
    """What `bonsai-mlx serve` was started with."""

    model: str  # as given (-m): an alias, a repo id or a folder
    model_id: str  # resolved: the repo id or the folder
    output: Path
    api_key: str | None = None
    loopback: bool = True  # bound to a loopback address: only localhost Host headers
    max_upload_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 2048 * 2048
    allow_origins: list[str] = field(default_factory=list)
    dtype: str = "auto"
    max_memory: int | None = None  # bytes a generation may use, the model included
    keep_text_encoder: bool = False  # --no-offload: it stays loaded between prompts
    loras: list[ServedLora] = field(default_factory=list)  # loaded at start-up (--lora)

    @property
    def model_names(self) -> set[str]:
        """What a request's `model` may say: the name given, the repo id or folder, the
        folder's name, an alias of the repo."""
        aliases = {alias for alias, repo in MODEL_ALIASES.items() if repo == self.model_id}
        return {self.model, self.model_id, Path(self.model_id).name, *aliases}

    @property
    def public_name(self) -> str:
        """The model's name in /v1/models: the alias or repo id given, or a folder's name."""
        return Path(self.model_id).name if Path(self.model_id).is_dir() else self.model


def create_app(settings: Settings, worker: Worker) -> FastAPI:
    app = FastAPI(title="bonsai-mlx", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.settings = settings
    app.state.worker = worker
    app.state.gallery = Gallery(settings.output)
    app.state.memory_check = MemoryCheck(settings.model_id, settings.dtype, settings.max_memory,
                                         keep_text_encoder=settings.keep_text_encoder)
    app.state.started = int(time.time())
    _add_error_handlers(app)
    app.add_middleware(Guard, api_key=settings.api_key, loopback=settings.loopback,
                       max_body=settings.max_upload_bytes, allow_origins=settings.allow_origins)
    if settings.allow_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.allow_origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_openai_routes(app)
    _add_job_routes(app)
    _add_gallery_routes(app)
    _add_page_routes(app)
    return app


# ---- errors -------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        code = None
        if exc.status_code == 404:
            message, code = f"no route {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", \
                "method_not_allowed"
        return error_response(exc.status_code, message, code=code,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = (exc.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, f"invalid request: {first.get('msg', exc)}", param=param)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # the traceback goes to the server's log (uvicorn prints it), never to the client
        return error_response(500, f"internal error ({type(exc).__name__}); see the "
                                   "server's log", code="internal_error")


# ---- OpenAI Images API --------------------------------------------------------------------


def _add_openai_routes(app: FastAPI) -> None:
    @app.post("/v1/images/generations")
    async def generations(request: Request) -> JSONResponse:
        image_req, response_format = await _read_request(app, request, images="none")
        return await _respond(app, request, image_req, response_format)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> JSONResponse:
        image_req, response_format = await _read_request(app, request, images="required")
        return await _respond(app, request, image_req, response_format)

    @app.get("/v1/models")
    def models() -> dict:  # reads the Hub cache's folders: in the thread pool
        from bonsai_mlx.serve.models import model_list

        settings = app.state.settings
        return {"object": "list",
                "data": model_list(settings.public_name, settings.model_id,
                                   loaded=app.state.worker.pipeline is not None,
                                   created=app.state.started,
                                   loras=[vars(lora) for lora in settings.loras])}

    @app.get("/health")
    async def health() -> dict:
        settings, worker = app.state.settings, app.state.worker
        pipe = worker.pipeline
        model = {"id": settings.public_name, "loaded": pipe is not None}
        if pipe is not None:
            model.update(distilled=pipe.is_distilled, default_steps=pipe.default_steps,
                         default_guidance=pipe.default_guidance)
        return {"status": "ok", "version": __version__, "model": model,
                "auth": settings.api_key is not None, "queue": worker.stats()}


async def _read_request(app: FastAPI, request: Request, *, images: str
                        ) -> tuple[ImageRequest, str]:
    """A JSON body (`images="none"`) or a multipart form with `image` files ("required" or
    "optional") -> (ImageRequest, response_format), or a 400 naming the field."""
    settings = app.state.settings
    allowed = {"max_pixels": settings.max_pixels,
              "loras": {lora.name: lora.scale for lora in settings.loras}}
    if images == "none":
        fields = json_fields(await _json(request))
        _check_model(app, fields.get("model"))
        image_req, response_format = await image_request(fields, form=False, **allowed)
    else:
        form = await _form(request)
        _check_model(app, form.get("model"))
        uploads = await form_uploads(form, required=images == "required")
        image_req, response_format = await image_request(form, form=True, uploads=uploads,
                                                         **allowed)
    await asyncio.to_thread(app.state.memory_check.check, image_req.request,
                            app.state.worker.pipeline)
    return image_req, response_format


async def _respond(app: FastAPI, request: Request, image_req: ImageRequest,
                   response_format: str) -> JSONResponse:
    """Queue the job, wait for it, answer as the OpenAI Images API does."""
    job = _submit(app, image_req)
    await _wait(app, request, job)
    if job.status == "error":
        status, message = job.error
        raise ApiError(status, message, code="invalid_value" if status == 400
                       else "internal_error")
    if job.status != "done":
        raise ApiError(503, "the job was cancelled (the server is stopping)", code="cancelled")
    data = []
    for image in job.images:
        item = {"revised_prompt": None, "seed": image["seed"]}
        if response_format == "url":
            item["url"] = str(request.base_url).rstrip("/") + image["url"]
        else:
            item["b64_json"] = base64.b64encode(Path(image["path"]).read_bytes()).decode()
        data.append(item)
    first = job.images[0]
    return JSONResponse({"created": int(job.created), "data": data, "output_format": "png",
                         "size": f"{first['width']}x{first['height']}"})


async def _wait(app: FastAPI, request: Request, job: Job) -> None:
    """Until the job ends; a client that hangs up cancels it (nobody would get the images)."""
    done = asyncio.wrap_future(job.future)
    while not done.done():
        await asyncio.wait([done], timeout=DISCONNECT_POLL_SECONDS)
        if not done.done() and await request.is_disconnected():
            app.state.worker.cancel(job)
            await done
            return


def _submit(app: FastAPI, image_req: ImageRequest) -> Job:
    try:
        return app.state.worker.submit(image_req)
    except QueueFull as e:
        raise ApiError(429, str(e), code="queue_full",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except Stopping:
        raise ApiError(503, "the server is stopping", code="stopping") from None


def _check_model(app: FastAPI, model) -> None:
    settings = app.state.settings
    if model in (None, "") or model in settings.model_names:
        return
    raise ApiError(404, f"the model {model!r} is not served here; this server runs "
                        f"{settings.public_name!r} (start `bonsai-mlx serve -m {model}` "
                        "to use another)", param="model", code="model_not_found")


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except ValueError:  # not JSON, not UTF-8, or an integer too long to read
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


async def _form(request: Request):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "send multipart/form-data (image files and fields)",
                       code="invalid_content_type")
    try:
        return await request.form(max_files=32, max_fields=64)
    except ApiError:
        raise
    except Exception as e:  # python-multipart's and Starlette's parse errors
        raise ApiError(400, f"could not read the multipart form: {e}",
                       code="invalid_multipart") from None


# ---- jobs (the studio) --------------------------------------------------------------------


def _add_job_routes(app: FastAPI) -> None:
    @app.post("/jobs", status_code=202)
    async def submit(request: Request) -> dict:
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        image_req, _ = await _read_request(app, request,
                                           images="optional" if multipart else "none")
        image_req.preview = True
        job = _submit(app, image_req)
        return {"id": job.id, "status": job.status, "events": f"/jobs/{job.id}/events",
                "position": job.events[0].get("position")}

    @app.get("/jobs/{job_id}")
    async def job_status(job_id: str) -> dict:
        return _job(app, job_id).summary()

    @app.delete("/jobs/{job_id}")
    async def cancel(job_id: str) -> dict:
        job = _job(app, job_id)
        if not job.finished:
            app.state.worker.cancel(job)
        return {"id": job.id, "status": job.status,
                "cancel_requested": job.cancel_requested.is_set()}

    @app.get("/jobs/{job_id}/events")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        job = _job(app, job_id)
        last = request.headers.get("last-event-id", "")
        start = int(last) + 1 if last.isdigit() else 0
        return StreamingResponse(_event_stream(job, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})


async def _event_stream(job: Job, seen: int):
    """Server-sent events from index `seen` on, until the job's last event."""
    yield "retry: 2000\n\n"
    if job.events[seen - 1:seen] and job.events[seen - 1]["type"] in TERMINAL_EVENTS:
        return
    while True:
        events = await job.events_after(seen, KEEPALIVE_SECONDS)
        if not events:
            yield ": keep-alive\n\n"
            continue
        for event in events:
            yield f"id: {seen}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
            seen += 1
            if event["type"] in TERMINAL_EVENTS:
                return


def _job(app: FastAPI, job_id: str) -> Job:
    job = app.state.worker.get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for a while only)",
                       code="job_not_found")
    return job


# ---- gallery and studio -------------------------------------------------------------------


def _add_gallery_routes(app: FastAPI) -> None:
    gallery: Gallery = app.state.gallery

    @app.get("/gallery")
    def listing(limit: int = 200) -> dict:
        return {"images": gallery.list(max(1, min(limit, 1000)))}

    @app.get("/gallery/{name}")
    def image(name: str, download: bool = False) -> Response:
        data = gallery.read(name)
        if data is None:
            raise ApiError(404, f"no image {name!r} in the output folder", code="not_found")
        headers = {"Cache-Control": "private, max-age=3600"}
        if download:
            headers["Content-Disposition"] = f'attachment; filename="{name}"'
        return Response(data, media_type="image/png", headers=headers)

    @app.get("/gallery/{name}/thumb")
    def thumbnail(name: str) -> Response:
        data = gallery.thumbnail(name)
        if data is None:
            raise ApiError(404, f"no image {name!r} in the output folder", code="not_found")
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})


def _add_page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def studio() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.post("/session", include_in_schema=False)
    async def session(request: Request) -> Response:
        """The studio's sign-in when the server has an API key: the key once, then a
        cookie (HttpOnly, SameSite=Strict) that images and event streams carry."""
        settings = app.state.settings
        body = json_fields(await _json(request))
        token = session_cookie(settings.api_key, body.get("key"))
        if token is None:
            raise ApiError(401, "wrong API key", code="invalid_api_key")
        response = Response(status_code=204)
        response.set_cookie("bonsai_session", token, httponly=True, samesite="strict")
        return response
