"""The one worker that owns the pipeline, its FIFO queue, and the jobs' progress events.

There is one accelerator, so one thread runs every generation, in arrival order; at most
`max_queue` jobs wait behind the running one (then `QueueFull`, the HTTP layer's 429).
Everything MLX does (loading too) happens on that thread, inside a stream created there:
MLX streams belong to the thread that made them. The asyncio side reads a job's events and
awaits its end without blocking: events are appended under a lock and each waiting event
loop is woken with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import io
import math
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.outputs import (
    generation_metadata,
    image_file_name,
    png_metadata,
    write_png_exclusive,
)
from bonsai_mlx.request import GenerationRequest

KEEP_FINISHED_JOBS = 200  # finished jobs kept for GET /jobs/{id} (oldest dropped first)
FIRST_GUESS_SECONDS = 20.0  # per image, for Retry-After before anything was measured


@dataclass
class ImageRequest:
    """One HTTP request's images: a checked generation made `n` times, image i with seed
    seed + i (or a random seed each when the request has none)."""

    request: GenerationRequest
    n: int = 1
    image_names: list[str] = field(default_factory=list)  # the uploads', for the metadata
    preview: bool = False  # per-step previews in the events (the studio asks for them)

    def seeds(self) -> list[int]:
        if self.request.seed is None:
            return [secrets.randbelow(2**32) for _ in range(self.n)]
        return [self.request.seed + i for i in range(self.n)]


class QueueFull(Exception):
    def __init__(self, retry_after: int, limit: int):
        super().__init__(f"the queue is full ({limit} jobs waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class Stopping(Exception):
    """The server is shutting down: no new jobs."""


class Job:
    """A request in the queue: its status, its events (for server-sent events), its images.

    status: queued -> running -> done | error | cancelled (or queued -> cancelled).
    """

    def __init__(self, request: ImageRequest):
        self.id = secrets.token_hex(8)
        self.request = request
        self.status = "queued"
        self.created = time.time()
        self.images: list[dict] = []  # {"path", "name", "seed", "width", "height"}
        self.error: tuple[int, str] | None = None  # (HTTP status, message)
        self.events: list[dict] = []
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.cancel_requested = threading.Event()
        self._lock = threading.Lock()
        self._listeners: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    @property
    def finished(self) -> bool:
        return self.status in ("done", "error", "cancelled")

    def emit(self, kind: str, **data) -> None:
        """Append an event and wake every waiting reader. Only the newest step event keeps
        its preview picture, so a long job's history stays small."""
        with self._lock:
            if kind == "step" and self.events and "preview" in self.events[-1]:
                self.events[-1] = {k: v for k, v in self.events[-1].items() if k != "preview"}
            self.events.append({"type": kind, **data})
            listeners = list(self._listeners)
        for loop, event in listeners:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop is closed
                pass

    def finish(self, outcome: str, **data) -> None:
        """End the job: `outcome` ("done", "error" with `status` and `message`,
        "cancelled") is its status and the type of its last event."""
        if self.finished:
            return
        if outcome == "error":
            self.error = (data["status"], data["message"])
        self.status = outcome
        self.emit(outcome, **data)
        self.future.set_result(self)

    async def events_after(self, seen: int, timeout: float) -> list[dict]:
        """Events after the first `seen`, waiting up to `timeout` s for one to arrive."""
        event = asyncio.Event()
        key = (asyncio.get_running_loop(), event)
        with self._lock:
            if len(self.events) > seen:  # (a job's last event always comes)
                return self.events[seen:]
            self._listeners.add(key)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._listeners.discard(key)
        with self._lock:
            return self.events[seen:]

    def summary(self) -> dict:
        out = {"id": self.id, "status": self.status, "created": int(self.created),
               "n": self.request.n,
               "images": [{k: v for k, v in im.items() if k != "path"} for im in self.images]}
        if self.error is not None:
            out["error"] = {"status": self.error[0], "message": self.error[1]}
        return out


class Worker:
    """Owns the pipeline (loaded by `load`, on start or on the first job) and runs jobs."""

    def __init__(self, load: Callable[[], object], output: Path, model_id: str, *,
                 max_queue: int = 8):
        self._load = load
        self.output = output
        self.model_id = model_id
        self.max_queue = max_queue
        self.pipeline = None
        self.running: Job | None = None
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._stopping = False
        self._seconds_per_image = FIRST_GUESS_SECONDS
        self._measured = False
        self._thread = threading.Thread(target=self._main, name="bonsai-worker", daemon=True)
        self._loaded = concurrent.futures.Future()

    # ---- the asyncio side ----------------------------------------------------------

    def start(self, preload: bool) -> None:
        """Start the thread; with `preload`, wait for the model and raise its load error."""
        self._preload = preload
        self._thread.start()
        if preload:
            self._loaded.result()

    def stop(self) -> None:
        """Cancel every job (waiting ones now, the running one at its next step) and end
        the thread."""
        with self._cond:
            self._stopping = True
            while self._queue:
                self._queue.popleft().finish("cancelled")
            if self.running is not None:
                self.running.cancel_requested.set()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, request: ImageRequest) -> Job:
        job = Job(request)
        with self._cond:
            if self._stopping:
                raise Stopping
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after(), self.max_queue)
            self._queue.append(job)
            self._remember(job)
            job.emit("queued", position=len(self._queue))
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def cancel(self, job: Job) -> None:
        """A queued job ends now; a running one at its next step."""
        job.cancel_requested.set()
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job.finish("cancelled")
                self._announce_positions()

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the images ahead, at the measured rate."""
        images = sum(j.request.n for j in self._queue) + (self.running.request.n
                                                           if self.running else 0)
        return max(1, min(3600, math.ceil(self._seconds_per_image * max(images, 1))))

    def stats(self) -> dict:
        with self._cond:
            return {"running": self.running.id if self.running else None,
                    "queued": len(self._queue), "max_queue": self.max_queue}

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        finished = [k for k, j in self._jobs.items() if j.finished]
        for k in finished[: max(0, len(finished) - KEEP_FINISHED_JOBS)]:
            del self._jobs[k]

    def _announce_positions(self) -> None:
        for position, job in enumerate(self._queue, start=1):
            job.emit("queued", position=position)

    # ---- the worker thread ---------------------------------------------------------

    def _main(self) -> None:
        import mlx.core as mx

        # MLX streams are per thread: this thread makes its own and does everything in it.
        with mx.stream(mx.new_stream(mx.default_device())):
            if self._preload:
                try:
                    self._pipeline()
                except BaseException as e:  # the command reports it and exits
                    self._loaded.set_exception(e)
                    return
            self._loaded.set_result(None)
            while (job := self._next_job()) is not None:
                self._run(job)

    def _next_job(self) -> Job | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job = self._queue.popleft()
            self.running = job
            self._announce_positions()
            return job

    def _pipeline(self):
        if self.pipeline is None:
            self.pipeline = self._load()
            if hasattr(self.pipeline, "latent_preview"):
                self.pipeline.latent_preview()  # fitted (or read) now, not on a first step
        return self.pipeline

    def _run(self, job: Job) -> None:
        t0 = time.perf_counter()
        job.status = "running"
        job.emit("started")
        try:
            outcome, data = self._make_images(job)
        except Exception as e:  # anything else is a bug: logged, and the job says so
            traceback.print_exc(file=sys.stderr)
            outcome, data = "error", {"status": 500, "message": f"internal error "
                                      f"({type(e).__name__}); see the server's log"}
        with self._cond:  # no longer running once its end is announced
            self.running = None
        if outcome == "done":
            self._measure(job, time.perf_counter() - t0)
        job.finish(outcome, **data)

    def _make_images(self, job: Job) -> tuple[str, dict]:
        """Every image of the job -> its outcome and the data of its last event; user errors
        and cancellation are outcomes too."""
        from bonsai_mlx.pipeline import GenerationCancelled

        try:
            if self.pipeline is None:
                job.emit("loading", model=self.model_id)
            try:
                pipe = self._pipeline()
            except BonsaiError as e:
                return "error", {"status": 500, "message": f"the model could not be loaded: {e}"}
            for i, seed in enumerate(job.request.seeds()):
                if job.cancel_requested.is_set():
                    raise GenerationCancelled
                self._make_image(pipe, job, i, seed)
        except GenerationCancelled:
            return "cancelled", {}
        except BonsaiError as e:  # the request does not suit this model
            return "error", {"status": 400, "message": str(e)}
        return "done", {"images": job.summary()["images"]}

    def _make_image(self, pipe, job: Job, index: int, seed: int) -> None:
        r = job.request
        job.emit("encode", image=index, n=r.n, seed=seed)
        request = r.request.with_seed(seed)
        image = pipe.run(request, callback=_StepEvents(job, index),
                         preview=r.preview).output("pil")
        prompt = request.prompts[0]
        negative = request.negative_prompts[0] if request.negative_prompts else None
        meta = generation_metadata(pipe, request, image, prompt=prompt,
                                   negative_prompt=negative, model=self.model_id,
                                   images=", ".join(r.image_names) or None)
        path = write_png_exclusive(image, self.output / image_file_name(prompt, seed),
                                   png_metadata(meta))
        record = {"path": path, "name": path.name, "url": f"/gallery/{path.name}",
                  "seed": seed, "width": image.width, "height": image.height}
        job.images.append(record)
        job.emit("image", image=index, **{k: v for k, v in record.items() if k != "path"})

    def _measure(self, job: Job, seconds: float) -> None:
        per_image = seconds / max(1, job.request.n)
        self._seconds_per_image = (per_image if not self._measured
                                   else 0.7 * self._seconds_per_image + 0.3 * per_image)
        self._measured = True


class _StepEvents:
    """The pipeline's step callback for one image: cancel check, step and decode events."""

    def __init__(self, job: Job, index: int):
        self.job, self.index = job, index

    def __call__(self, step: int, total: int, latents, preview=None) -> None:
        from bonsai_mlx.pipeline import GenerationCancelled

        if self.job.cancel_requested.is_set():
            raise GenerationCancelled
        data = {"image": self.index, "step": step, "total": total}
        if preview is not None:
            data["preview"] = preview_data_url(preview)
        self.job.emit("step", **data)
        if step >= total:
            self.job.emit("decode", image=self.index)


def preview_data_url(image) -> str:
    """A preview picture (PIL, or the first of a list) as a small JPEG data URL."""
    if isinstance(image, list):
        image = image[0]
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
