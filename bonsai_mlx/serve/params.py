"""Request bodies -> checked requests, with OpenAI-shaped 400s naming the field.

JSON bodies (`/v1/images/generations`, `/jobs`) carry typed values; multipart forms
(`/v1/images/edits`, `/jobs` with reference images) carry strings, read as numbers here.
What only the HTTP API has is checked here (`n`, `response_format`, the size limit, the
upload formats); everything a generation may ask for is checked by the one check every
caller uses, `GenerationRequest.create`, before the job is queued.
"""

from __future__ import annotations

import asyncio
import io
import warnings

from bonsai_mlx import checks
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import parse_size
from bonsai_mlx.request import GenerationRequest
from bonsai_mlx.serve.errors import ApiError
from bonsai_mlx.serve.jobs import ImageRequest

from starlette.datastructures import FormData, UploadFile

MAX_N = 8  # images per request
MAX_REFERENCES = 8  # input images per edit
MAX_PROMPT_CHARS = 32_000
MAX_UPLOAD_PIXELS = 50_000_000  # per input image; larger ones are refused before decoding
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
RESPONSE_FORMATS = ("b64_json", "url")
# How GenerationRequest names what it checks, here: the request's field names.
API_NAMES = {"prompt": "prompt", "negative_prompt": "negative_prompt", "strength": "strength",
             "image": "image"}
# A check's message starts with what it checked: that word -> the request's field.
PARAMS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "strength": "strength",
          "image": "image", "image-to-image": "image", "input": "image", "steps": "steps",
          "guidance": "guidance", "seed": "seed", "width": "size", "height": "size"}


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


async def image_request(fields, *, form: bool, max_pixels: int, images=(),
                        image_names=()) -> tuple[ImageRequest, str]:
    """The fields every endpoint shares (and the decoded input images) -> the queued job's
    ImageRequest and the response format."""
    get = fields.get
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
    try:  # off the event loop: input images are resized here
        request = await asyncio.to_thread(
            GenerationRequest.create, prompt, width=width, height=height,
            negative_prompt=get("negative_prompt"), images=list(images) or None,
            names=API_NAMES, **values)
    except BonsaiError as e:
        raise invalid(PARAMS.get(str(e).split(" ", 1)[0]), str(e)) from None
    return ImageRequest(request, n=n, image_names=list(image_names)), response_format


def json_fields(body) -> dict:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


async def form_images(form: FormData, *, required: bool) -> tuple[list, list[str]]:
    """The uploaded `image` / `image[]` files, decoded and checked -> (images, names)."""
    uploads = form.getlist("image") + form.getlist("image[]")
    if not uploads and required:
        raise invalid("image", "image is required: upload one or more PNG, JPEG or WebP files",
                      "missing_required_parameter")
    if len(uploads) > MAX_REFERENCES:
        raise invalid("image", f"{len(uploads)} images were uploaded; the limit is "
                               f"{MAX_REFERENCES}")
    images, names = [], []
    for i, upload in enumerate(uploads):
        if not isinstance(upload, UploadFile):
            raise invalid("image", "image must be an uploaded file (multipart file field)")
        label = f"image {i + 1}" + (f" ({upload.filename})" if upload.filename else "")
        # decoding a large image takes a while: off the event loop
        images.append(await asyncio.to_thread(decode_upload, await upload.read(), label))
        names.append(_safe_name(upload.filename) or f"image-{i + 1}")
    return images, names


def decode_upload(data: bytes, label: str):
    """Uploaded bytes -> a decoded PIL image: PNG, JPEG or WebP only, at most
    MAX_UPLOAD_PIXELS (checked from the header, before the pixels are decompressed)."""
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
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        problem = f"has more than the {MAX_UPLOAD_PIXELS // 1_000_000} megapixels accepted"
    except UnidentifiedImageError:
        problem = "is not a readable image"
    except (OSError, SyntaxError, ValueError) as e:
        problem = f"could not be decoded ({e})"
    if problem is not None:
        raise invalid("image", f"{label} {problem}; upload a PNG, JPEG or WebP file",
                      "invalid_image")
    return image


def _safe_name(filename: str | None) -> str:
    """An uploaded file's base name for the PNG metadata (never used as a path)."""
    if not filename:
        return ""
    return "".join(c for c in filename.replace("\\", "/").rsplit("/", 1)[-1]
                   if c.isprintable())[:100]
