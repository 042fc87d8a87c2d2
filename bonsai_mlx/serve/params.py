"""Request bodies -> checked requests, with OpenAI-shaped 400s naming the field.

JSON bodies (`/v1/images/generations`, `/jobs`) carry typed values; multipart forms
(`/v1/images/edits`, `/jobs` with reference images) carry strings, read as numbers here
(and `loras` as one JSON-encoded field). What only the HTTP API has is checked here (`n`,
`response_format`, the size limit, the upload formats, OpenAI's mask convention, the LoRAs
a request may choose); everything a generation may ask for is checked by the one check
every caller uses, `GenerationRequest.create`, before the job is queued.

Masks (`mask` on /v1/images/edits): a mask with fully transparent pixels (alpha 0) marks
them as the area to edit, as OpenAI's API does; a mask without any (no alpha channel, or
all opaque) is read as diffusers' are, grey levels with white (>= 50%) = repaint.
"""

from __future__ import annotations

import asyncio
import io
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from bonsai_mlx import checks
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import parse_size, upright
from bonsai_mlx.inpaint import eight_bit
from bonsai_mlx.request import GenerationRequest
from bonsai_mlx.serve.errors import ApiError
from bonsai_mlx.serve.jobs import ImageRequest

import numpy as np
import PIL.Image
from starlette.datastructures import FormData, UploadFile

MAX_N = 8  # images per request
MAX_REFERENCES = 8  # input images per edit
MAX_PROMPT_CHARS = 32_000
MAX_UPLOAD_PIXELS = 50_000_000  # per input image; larger ones are refused before decoding
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
RESPONSE_FORMATS = ("b64_json", "url")
# How GenerationRequest names what it checks, here: the request's field names.
API_NAMES = {"prompt": "prompt", "negative_prompt": "negative_prompt", "strength": "strength",
             "image": "image", "mask": "mask"}
# A check's message starts with what it checked: that word -> the request's field.
PARAMS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "strength": "strength",
          "image": "image", "image-to-image": "image", "input": "image", "steps": "steps",
          "guidance": "guidance", "seed": "seed", "width": "size", "height": "size",
          "mask": "mask", "mask:": "mask"}
MASK_RULE = ("fully transparent pixels (alpha 0) mark the area to edit, as in OpenAI's API; "
             "a mask without transparency is read as black = keep, white = repaint")
LORA_FIELDS = ("name", "scale")


def invalid(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _checked(param: str, check, value, *args, **kwargs):
    """A `bonsai_mlx.checks` check, its BonsaiError as a 400 naming `param`."""
    try:
        return check(value, param, *args, **kwargs)
    except BonsaiError as e:
        raise invalid(param, str(e)) from None


def _from_form(value, kind):
    """A form field's text as an int / float when it reads as one (else as it is, for the
    check to refuse with its message)."""
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            return value
    return value


def _size(value, max_pixels: int) -> tuple[int | None, int | None]:
    if value is None or value == "auto":
        return None, None
    if not isinstance(value, str):
        raise invalid("size", f"size must be a string like '1024x1024', not {value!r}",
                      "invalid_size")
    try:
        width, height = parse_size(value, option="size")
    except BonsaiError as e:
        raise invalid("size", str(e), "invalid_size") from None
    if width * height > max_pixels:
        raise invalid("size", f"size {value} is {width * height / 1e6:.1f} megapixels; this "
                              f"server makes at most {max_pixels / 1e6:.1f} "
                              "(bonsai-mlx serve --max-megapixels)", "invalid_size")
    return width, height


def _prompt(value) -> str:
    if value is None:
        raise invalid("prompt", "prompt is required", "missing_required_parameter")
    prompt = _checked("prompt", checks.text, value)
    if not prompt.strip():
        raise invalid("prompt", "prompt must not be empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid("prompt", f"prompt is {len(prompt)} characters; the limit is "
                                f"{MAX_PROMPT_CHARS}")
    return prompt


def _response_format(fields) -> str:
    response_format = fields.get("response_format") or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise invalid("response_format", f"response_format must be 'b64_json' or 'url', not "
                                         f"{response_format!r}")
    if fields.get("output_format") not in (None, "png"):
        raise invalid("output_format", "only PNG is written (output_format 'png')")
    if fields.get("stream") not in (None, False, "false"):
        raise invalid("stream", "streaming responses are not supported; the studio's job API "
                                "(POST /jobs, GET /jobs/{id}/events) streams progress")
    return response_format


@dataclass
class Uploads:
    """A multipart request's files, decoded and checked."""

    images: list = field(default_factory=list)  # PIL images, in the order sent
    names: list[str] = field(default_factory=list)  # their file names, for the metadata
    mask: PIL.Image.Image | None = None  # ours: grey levels, white = repaint
    mask_name: str | None = None


async def image_request(fields, *, form: bool, max_pixels: int, uploads: Uploads | None = None,
                        loras: Mapping[str, float] | None = None) -> tuple[ImageRequest, str]:
    """The fields every endpoint shares (and the decoded uploads) -> the queued job's
    ImageRequest and the response format. `loras`: the server's LoRAs and their default
    scales, among which the request's `loras` choose."""
    get = fields.get
    uploads = uploads or Uploads()
    prompt = _prompt(get("prompt"))
    response_format = _response_format(fields)
    n = 1 if get("n") is None else _checked(
        "n", checks.integer, _from_form(get("n"), int) if form else get("n"), low=1, high=MAX_N)
    width, height = _size(get("size"), max_pixels)
    number = {"steps": int, "seed": int, "guidance": float, "strength": float}
    values = {k: _from_form(get(k), kind) if form else get(k) for k, kind in number.items()}
    if isinstance(values["seed"], int) and not isinstance(values["seed"], bool) \
            and values["seed"] > 2**64 - n:
        raise invalid("seed", f"seed must be at most 2**64 - n (image i gets seed + i), not "
                              f"{values['seed']}")
    scales = lora_scales(_lora_field(fields) if form else get("loras"), loras or {})
    try:  # off the event loop: input images are resized here
        request = await asyncio.to_thread(
            GenerationRequest.create, prompt, width=width, height=height,
            negative_prompt=get("negative_prompt"), images=uploads.images or None,
            mask=uploads.mask, names=API_NAMES, **values)
    except BonsaiError as e:
        raise invalid(PARAMS.get(str(e).split(" ", 1)[0]), str(e)) from None
    return ImageRequest(request, n=n, image_names=uploads.names, mask_name=uploads.mask_name,
                        loras=scales), response_format


def lora_scales(value, loaded: Mapping[str, float]) -> dict[str, float] | None:
    """A request's `loras` ([{"name", "scale"?}, ...]) -> the scale of every loaded LoRA for
    this request: those listed at their scale (default: the server's), the others 0. None
    when the request has no `loras` (the server's defaults apply). A request chooses among
    the LoRAs the server loaded at start-up; it never names a file."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise invalid("loras", f"loras must be a list of {{\"name\", \"scale\"}} objects, not "
                               f"{checks.shown(value, 80)}")
    names = ", ".join(loaded) or "none (start the server with --lora PATH[:SCALE])"
    scales = dict.fromkeys(loaded, 0.0)
    chosen: set[str] = set()
    for i, entry in enumerate(value):
        where = f"loras[{i}]"
        if not isinstance(entry, dict):
            raise invalid("loras", f"{where} must be an object {{\"name\", \"scale\"}}, not "
                                   f"{checks.shown(entry, 80)}")
        if "path" in entry:
            raise invalid("loras", f"{where}.path: this server reads no file a request names; "
                                   "its LoRAs are the ones loaded at start-up (bonsai-mlx "
                                   f"serve --lora PATH[:SCALE]), chosen by name: {names}",
                          "unsupported_parameter")
        extra = sorted(set(entry) - set(LORA_FIELDS))
        if extra:
            raise invalid("loras", f"{where} has unknown fields {extra}; give name and scale")
        name = entry.get("name")
        if not isinstance(name, str) or name not in loaded:
            raise invalid("loras", f"{where}.name: no LoRA named {checks.shown(name, 80)} is "
                                   f"loaded on this server; loaded: {names} (GET /v1/models "
                                   "lists them)",
                          "lora_not_found")
        if name in chosen:
            raise invalid("loras", f"{where}: LoRA {name!r} is listed twice")
        chosen.add(name)
        try:
            scales[name] = checks.number(entry.get("scale", loaded[name]), f"{where}.scale")
        except BonsaiError as e:
            raise invalid("loras", str(e)) from None
    return scales


def _lora_field(form: FormData):
    """A form's `loras`: one field holding the list as JSON (multipart has no lists)."""
    if any(key.startswith("loras[") for key in form.keys()):
        raise invalid("loras", "send loras as one form field holding JSON, e.g. "
                               'loras=[{"name": "ink", "scale": 0.8}] (with the openai '
                               'client: extra_body={"loras": json.dumps([...])})')
    value = form.get("loras")
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid("loras", "loras must be a form field holding JSON, not a file")
    try:
        return json.loads(value)
    except ValueError:  # not JSON, or an integer too long to read
        raise invalid("loras", f"loras is not valid JSON: {checks.shown(value, 80)}") from None


def json_fields(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


async def form_uploads(form: FormData, *, required: bool) -> Uploads:
    """The uploaded `image` / `image[]` files and the `mask`, decoded and checked."""
    uploads = Uploads()
    files = form.getlist("image") + form.getlist("image[]")
    if not files and required:
        raise invalid("image", "image is required: upload one or more PNG, JPEG or WebP files",
                      "missing_required_parameter")
    if len(files) > MAX_REFERENCES:
        raise invalid("image", f"{len(files)} images were uploaded; the limit is "
                               f"{MAX_REFERENCES}")
    for i, upload in enumerate(files):
        uploads.images.append(await _decoded(upload, f"image {i + 1}", "image"))
        uploads.names.append(_safe_name(upload.filename) or f"image-{i + 1}")
    masks = form.getlist("mask")
    if len(masks) > 1:
        raise invalid("mask", f"{len(masks)} masks were uploaded; send one (it applies to "
                              "the first image)")
    if masks:
        uploads.mask = openai_mask(await _decoded(masks[0], "mask", "mask"))
        uploads.mask_name = _safe_name(masks[0].filename) or "mask"
    return uploads


async def _decoded(upload, label: str, param: str):
    """A file field, decoded (off the event loop: a large image takes a while)."""
    if not isinstance(upload, UploadFile):
        raise invalid(param, f"{param} must be an uploaded file (multipart file field)")
    label += f" ({upload.filename})" if upload.filename else ""
    return await asyncio.to_thread(decode_upload, await upload.read(), label, param)


def openai_mask(mask: PIL.Image.Image) -> PIL.Image.Image:
    """An uploaded mask -> ours (grey levels, white = repaint): where it has fully
    transparent pixels, those are the area to edit (OpenAI's convention) and everything
    else is kept; without any, its grey levels as they are (white = repaint). A mask that
    marks nothing to edit is a 400."""
    if mask.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in mask.info:
        alpha = np.asarray(mask.convert("RGBA").getchannel("A"))
        if (alpha == 0).any():
            return PIL.Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")
    grey = eight_bit(mask).convert("L")
    if np.asarray(grey).max() < 128:  # binarised at 0.5, as the pipeline does
        raise invalid("mask", f"mask marks nothing to edit: {MASK_RULE}", "invalid_mask")
    return grey


def decode_upload(data: bytes, label: str, param: str = "image"):
    """Uploaded bytes -> a decoded PIL image: PNG, JPEG or WebP only, at most
    MAX_UPLOAD_PIXELS (checked from the header, before the pixels are decompressed); a 400
    naming `param` otherwise."""
    from PIL import Image, UnidentifiedImageError

    problem = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in UPLOAD_FORMATS:
                problem = f"is a {image.format} image"
            elif image.width * image.height > MAX_UPLOAD_PIXELS:
                problem = (f"is {image.width}x{image.height}, more than the "
                           f"{MAX_UPLOAD_PIXELS // 1_000_000} megapixels accepted")
            else:
                image.load()
                image = upright(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        problem = f"has more than the {MAX_UPLOAD_PIXELS // 1_000_000} megapixels accepted"
    except UnidentifiedImageError:
        problem = "is not a readable image"
    except (OSError, SyntaxError, ValueError) as e:
        problem = f"could not be decoded ({e})"
    if problem is not None:
        raise invalid(param, f"{label} {problem}; upload a PNG, JPEG or WebP file",
                      "invalid_image")
    return image


def _safe_name(filename: str | None) -> str:
    """An uploaded file's base name for the PNG metadata (never used as a path)."""
    if not filename:
        return ""
    return "".join(c for c in filename.replace("\\", "/").rsplit("/", 1)[-1]
                   if c.isprintable())[:100]
