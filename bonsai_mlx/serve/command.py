"""`bonsai-mlx serve`: start the studio and the OpenAI-compatible Images API."""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from bonsai_mlx.checks import number
from bonsai_mlx.cli import (
    DEFAULT_MODEL,
    apply_loras,
    dtype_option,
    read_lora_options,
    verbose_option,
)
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.weights import MODEL_ALIASES, resolve_model

import click

DEFAULT_OUTPUT = "bonsai-images"


@click.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True,
              help=f"Alias ({', '.join(MODEL_ALIASES)}), Hugging Face repo id or local folder.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback needs --api-key (or "
                   "--insecure).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port (0: any free port; the URL printed says which).")
@click.option("--api-key", default=None, envvar="BONSAI_API_KEY", show_envvar=True,
              help="Require `Authorization: Bearer KEY` (the studio asks for it once).")
@click.option("-o", "--output", default=DEFAULT_OUTPUT, show_default=True,
              help="Folder the images are saved in (PNG with metadata, never overwritten); "
                   "the studio's gallery shows it.")
@click.option("--preload/--lazy", default=True, show_default=True,
              help="Load the model before serving, or on the first request.")
@click.option("--max-queue", type=click.IntRange(0, 10_000), default=8, show_default=True,
              help="Requests that may wait behind the running one; more get 429.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=50.0,
              show_default=True, help="Largest request body (uploaded images), in MiB.")
@click.option("--max-megapixels", type=click.FloatRange(min=0, min_open=True), default=4.2,
              show_default=True, help="Largest image a request may ask for (4.2: 2048x2048).")
@click.option("--max-memory", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="GB", help="Most memory a generation may use, the model included "
              "[default: what the system has free]; larger requests get 400 naming the "
              "largest size that fits.")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="Load a LoRA (file, folder or Hub repo) at SCALE [1.0]; repeatable. "
                   "Requests choose among these by name (the file's stem) and may set "
                   "their scale; the server reads no LoRA file a request names.")
@click.option("--lora-ignore-unmatched", is_flag=True,
              help="Skip LoRA layers that match no layer of the model (listed) instead of "
                   "failing.")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="URL",
              help="Let web pages from this origin call the API (CORS); repeatable.")
@click.option("--insecure", is_flag=True,
              help="Serve a non-loopback --host without an API key.")
@dtype_option
@click.option("--no-offload", is_flag=True,
              help="Keep the text encoder loaded between prompts (more memory, faster).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@verbose_option
def serve(model, host, port, api_key, output, preload, max_queue, max_upload_mb,
          max_megapixels, max_memory, loras, lora_ignore_unmatched, allow_origins, insecure,
          dtype, no_offload, revision) -> None:
    """Serve the studio (a web page) and an OpenAI-compatible Images API.

    \b
    bonsai-mlx serve                      # then open the printed URL
    bonsai-mlx serve -m binary --port 8080 -o ~/Pictures/bonsai
    bonsai-mlx serve --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
    bonsai-mlx serve --lora ink.safetensors:0.8 --lora style.safetensors:0

    One worker owns the model: requests run one at a time, in order.
    """
    limits = {"max_upload_bytes": _limit(max_upload_mb, "--max-upload-mb", 1024 * 1024),
              "max_pixels": _limit(max_megapixels, "--max-megapixels", 1_000_000),
              "max_memory": _limit(max_memory, "--max-memory", 1e9)}
    check_origins(allow_origins)
    model_id = resolve_model(model)
    address = resolve_address(host, port)
    if not _is_loopback(address) and api_key is None and not insecure:
        raise BonsaiError(f"--host {host} is reachable from other machines; give --api-key "
                          "KEY (or BONSAI_API_KEY), or --insecure to serve without a key")
    if api_key is not None and not api_key.strip():
        raise BonsaiError("--api-key is empty; give a key, or leave the option out")
    folder = output_folder(output)
    lora_files = read_lora_options(loras)  # read and checked before anything starts
    served_loras = _served_loras(lora_files)
    sock = bind(address, host, port)

    from bonsai_mlx.serve.app import Settings, create_app
    from bonsai_mlx.serve.jobs import Worker

    settings = Settings(model=model, model_id=model_id, output=folder, api_key=api_key,
                        loopback=_is_loopback(address), allow_origins=list(allow_origins),
                        dtype=dtype, loras=served_loras, keep_text_encoder=no_offload,
                        **limits)

    def load():
        from bonsai_mlx.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(model_id, dtype=dtype, revision=revision,
                                        keep_text_encoder=no_offload)
        apply_loras(pipe, lora_files, lora_ignore_unmatched, quiet=False)
        lora_files.clear()  # the adapters hold what they need
        return pipe

    worker = Worker(load, folder, model_id, max_queue=max_queue)
    if preload:
        click.echo(f"loading {model_id} ...", err=True)
    worker.start(preload=preload)
    app = create_app(settings, worker)
    url = _url(*sock.getsockname()[:2])
    click.echo(f"bonsai-mlx studio: {url}")
    click.echo(f"OpenAI Images API: {url}v1 (images saved in {folder})", err=True)
    sys.stdout.flush()
    try:
        _run(app, sock, worker)
    finally:
        worker.stop()


def _served_loras(lora_files: list) -> list:
    """The LoRAs read from --lora, under the names requests choose them by (each file's
    stem, which load_lora gives them): two with one name are an error."""
    from bonsai_mlx.outputs import lora_label
    from bonsai_mlx.serve.app import ServedLora

    import mlx.core as mx

    # Evaluated now: a lazy array would be computed on this thread's MLX stream, which the
    # worker thread (that applies the LoRAs) cannot use.
    mx.eval([a for lora_file, _ in lora_files for layer in lora_file.layers
             for a in (layer.down, layer.up)])
    served: dict[str, ServedLora] = {}
    for lora_file, scale in lora_files:
        if lora_file.name in served:
            raise BonsaiError(f"--lora {lora_file.source} and --lora "
                              f"{served[lora_file.name].file} are both named "
                              f"{lora_file.name!r}; rename one of the files")
        number(scale, f"--lora {lora_file.source}: the scale")
        served[lora_file.name] = ServedLora(lora_file.name, scale, lora_label(lora_file.source))
    return list(served.values())


def _limit(value: float | None, option: str, unit: float) -> int | None:
    """A size limit given in `unit`s -> a whole count (None: no limit given). click's
    FloatRange lets nan and inf through (they compare false with its bounds)."""
    if value is None:
        return None
    amount = number(value, option, positive=True) * unit
    if not math.isfinite(amount):
        raise BonsaiError(f"{option} {value:g} is too large; give a finite limit")
    return int(amount)


def check_origins(origins: tuple[str, ...] | list[str]) -> None:
    """Each --allow-origin must be one web origin, scheme://host[:port], as a browser
    sends it. `*` would let any web page read the API (the gallery's prompts and files)
    through CORS while the request guard takes it literally; `null` is what sandboxed
    pages and local files send: both are refused, as is an empty one."""
    for origin in origins:
        parts = urlsplit(origin)
        if (origin in ("*", "null") or not parts.scheme or not parts.netloc
                or origin != f"{parts.scheme}://{parts.netloc}"):
            raise BonsaiError(f"--allow-origin {origin!r} is not one web page's origin; give "
                              "scheme://host[:port], e.g. http://localhost:3000 ('*' and "
                              "'null' are refused: any page could then read the gallery)")


def resolve_address(host: str, port: int) -> tuple:
    """(family, type, proto, sockaddr) of host:port (its first address)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise BonsaiError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    return family, kind, proto, address


def _is_loopback(address: tuple) -> bool:
    return ipaddress.ip_address(address[3][0]).is_loopback


def bind(address: tuple, host: str, port: int) -> socket.socket:
    """A listening socket: connections wait in its backlog until the server runs."""
    family, kind, proto, sockaddr = address
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise BonsaiError(f"port {port} on {host} is in use; choose another with --port "
                              "(--port 0 picks a free one)") from None
        raise BonsaiError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def output_folder(output: str) -> Path:
    if not output.strip():  # "" is the current folder: the gallery would serve its files
        raise BonsaiError("-o is empty; give the folder the images are saved in")
    folder = Path(output).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BonsaiError(f"-o {output}: cannot create the folder ({e.strerror})") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise BonsaiError(f"-o {output} is not a folder this user can write to")
    return folder.resolve()


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _run(app, sock: socket.socket, worker) -> None:
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # Jobs first: their requests and event streams then end (cancelled, 503) and
            # uvicorn's graceful shutdown has no open request left to wait for.
            await asyncio.to_thread(worker.stop)
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    Server(config).run(sockets=[sock])
