"""What a generation may ask for, checked before any model is loaded, and what it gives back.

The CLI, the Python API and the server all check sizes, prompts, strength and images here,
so a mistake reads the same everywhere and fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bonsai_mlx.arrays import to_mx
from bonsai_mlx.checks import check_prompts, flag, integer, number, text
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import (
    DEFAULT_SIZE,
    ImageInput,
    as_image_list,
    check_size,
    load_image,
    prepare_image,
    prepare_inpaint_image,
    prepared_size,
    to_pil,
)
from bonsai_mlx.inpaint import DEFAULT_STRENGTH as INPAINT_STRENGTH
from bonsai_mlx.inpaint import MaskInput, mask_image, mask_latents
from bonsai_mlx.scheduler import MAX_STEPS

import mlx.core as mx
import numpy as np
import PIL.Image


def negative_prompts(negative_prompt: str | Sequence[str] | None, n: int,
                     name: str = "the negative prompt") -> list[str]:
    """The negative prompt of each of `n` prompts ("" when none is given, as diffusers)."""
    if negative_prompt is None:
        return [""] * n  # diffusers' Flux2KleinPipeline always uses ""
    if isinstance(negative_prompt, str):
        return [text(negative_prompt, name)] * n
    negatives = list(negative_prompt) if isinstance(negative_prompt, (list, tuple)) else []
    if len(negatives) != n or not all(isinstance(p, str) for p in negatives):
        raise BonsaiError(
            f"negative_prompt must be a string or a list of {n} strings (one per prompt)"
        )
    return [text(p, name) for p in negatives]


OUTPUT_TYPES = ("pil", "np", "mx")
# How the Python API names what it checks; the CLI passes its option names instead.
API_NAMES = {"prompt": "the prompt", "negative_prompt": "the negative prompt",
             "strength": "strength", "image": "input image", "mask": "mask"}


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, checked: everything `Pipeline.generate` takes but the callback.

    `create` checks and normalises the arguments without any model: prompts, size (the
    first input image's when not given), steps, guidance, seed, latents, strength, images
    (read, resized and cropped as Flux2KleinPipeline does; the image to inpaint resized as
    Flux2KleinInpaintPipeline does), the inpainting mask. What depends on the model
    (default steps and guidance, the latents' channels, reference KV caching's default) is
    settled by the pipeline.
    """

    prompts: tuple[str, ...]
    width: int
    height: int
    negative_prompts: tuple[str, ...] | None  # None: not given ("" where CFG needs one)
    steps: int | None = None  # None: the model's default (or len(sigmas))
    guidance: float | None = None  # None: the model's default
    seed: int | None = None  # None: a random one, drawn when the request runs
    latents: mx.array | None = None  # (B, C, H/16, W/16) float32, replaces the noise
    images: tuple[PIL.Image.Image, ...] = ()  # prepared: RGB, sides multiples of 16
    strength: float | None = None  # image-to-image from images[0]
    num_images: int = 1
    output_type: str = "pil"
    sigmas: tuple[float, ...] | None = None
    tiled_vae: bool | None = None
    # inpainting images[0]: the mask's weight per latent token (h*w, 1), 1 = repaint
    mask: np.ndarray | None = None
    reference_kv_cache: bool | None = None  # None: the model's default

    @property
    def batch(self) -> int:
        """Images generated: num_images per prompt."""
        return len(self.prompts) * self.num_images

    @classmethod
    def create(
        cls,
        prompt: str | Sequence[str],
        *,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        latents: np.ndarray | mx.array | None = None,
        images: ImageInput | Sequence[ImageInput] | None = None,
        strength: float | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_images: int = 1,
        output_type: str = "pil",
        sigmas: Sequence[float] | None = None,
        tiled_vae: bool | None = None,
        mask: MaskInput | None = None,
        reference_kv_cache: bool | None = None,
        names: Mapping[str, str] = API_NAMES,
    ) -> GenerationRequest:
        """The checked request (arguments as `Pipeline.generate` documents them); a
        BonsaiError naming the first bad one, as `names` spells it."""
        prompts = check_prompts(prompt, names["prompt"])
        if output_type not in OUTPUT_TYPES:
            raise BonsaiError(f"output_type must be 'pil', 'np' or 'mx', not {output_type!r}")
        num_images = integer(num_images, "num_images", low=1)
        steps, sigmas = _steps(steps, sigmas)
        if guidance is not None:
            guidance = number(guidance, "guidance")
        if mask is not None and strength is None:
            strength = INPAINT_STRENGTH
        if strength is not None:
            strength = _strength(strength, names["strength"])
        if reference_kv_cache is not None:
            reference_kv_cache = flag(reference_kv_cache, "reference_kv_cache")
        prepared, width, height, tokens = _prepared_inputs(images, strength, mask, width,
                                                           height, names)
        return cls(
            tuple(prompts), width, height,
            _negatives(negative_prompt, len(prompts), names["negative_prompt"]),
            steps, guidance, _seed(seed), _latents(latents),
            tuple(prepared), strength, num_images, output_type, sigmas, tiled_vae,
            tokens, reference_kv_cache,
        )

    def with_seed(self, seed: int | None) -> GenerationRequest:
        """The same request with another seed (one request, several images)."""
        return dataclasses.replace(self, seed=_seed(seed))


@dataclass(frozen=True)
class GenerationResult:
    """What `Pipeline.run` made."""

    images: mx.array  # (B, H, W, 3) float32 in [0, 1]
    seed: int | None  # None when the request gave latents
    timings: dict[str, float | list[float]]  # seconds: encode, images, steps, decode, total
    peak_memory: int  # bytes

    def output(self, output_type: str = "pil"
               ) -> PIL.Image.Image | list[PIL.Image.Image] | np.ndarray | mx.array:
        """"pil": an image, or a list for a batch; "np": float32 (B, H, W, 3); "mx"."""
        if output_type == "mx":
            return self.images
        arr = np.array(self.images)
        return arr if output_type == "np" else to_pil(arr)


def _steps(steps, sigmas) -> tuple[int | None, tuple[float, ...] | None]:
    if sigmas is not None:
        sigmas = tuple(float(s) for s in sigmas)
        if steps is not None and steps != len(sigmas):
            raise BonsaiError(f"steps={steps} but {len(sigmas)} sigmas were given; pass one "
                              "of them")
        steps = len(sigmas)
    if steps is not None:
        steps = integer(steps, "steps", low=1, high=MAX_STEPS)
    return steps, sigmas


def _negatives(negative_prompt, n: int, name: str) -> tuple[str, ...] | None:
    if negative_prompt is None:
        return None
    return tuple(negative_prompts(negative_prompt, n, name))


def _latents(latents) -> mx.array | None:
    if latents is None:
        return None
    latents = to_mx(latents, mx.float32)
    if not mx.isfinite(latents).all().item():
        raise BonsaiError("latents contain NaN or infinity")
    return latents


def _strength(strength, name: str) -> float:
    value = number(strength, name)
    if not 0 < value <= 1:
        raise BonsaiError(f"{name} {strength} is out of range; strength must be in (0, 1], "
                          "i.e. 0 < strength <= 1 (lower keeps more of the input image)")
    return value


def _prepared_inputs(images, strength, mask, width, height, names: Mapping[str, str]
                     ) -> tuple[list[PIL.Image.Image], int, int, np.ndarray | None]:
    """Input images read and prepared, the size settled (given, else the first image's once
    prepared, else the default), and for inpainting the mask's weight per latent token.
    Image-to-image takes exactly one image; inpainting one and any references."""
    image_list = as_image_list(images)
    if mask is not None and not image_list:
        raise BonsaiError(f"{names['mask']} (inpainting) needs the image to repaint: give "
                          f"it as the first {names['image']}")
    if mask is None and strength is not None and len(image_list) != 1:
        raise BonsaiError(f"image-to-image ({names['strength']}) needs exactly one "
                          f"{names['image']}, got {len(image_list)}")
    opened = [load_image(im, names["image"]) for im in image_list]
    first = prepared_size(*opened[0].size, image_list[0]) if opened else (DEFAULT_SIZE,
                                                                          DEFAULT_SIZE)
    width, height = check_size(first[0] if width is None else width,
                               first[1] if height is None else height)
    if mask is None:
        return ([prepare_image(im, name) for im, name in zip(opened, image_list, strict=True)],
                width, height, None)
    mask = mask_image(mask, opened[0].size, names["mask"])
    prepared = [prepare_inpaint_image(opened[0], image_list[0], width, height)]
    prepared += [prepare_image(im, name)
                 for im, name in zip(opened[1:], image_list[1:], strict=True)]
    return prepared, width, height, mask_latents(mask, width, height, names["mask"])


def _seed(seed) -> int | None:
    if seed is None:
        return None
    seed = integer(seed, "seed", low=0)
    if seed >= 2**64:
        raise BonsaiError(f"seed must be below 2**64, not {seed}")
    return seed
