"""What a generation may ask for, checked before any model is loaded, and what it gives back.

The CLI, the Python API and the server all check sizes, prompts, strength and images here,
so a mistake reads the same everywhere and fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bonsai_mlx.arrays import to_mx
from bonsai_mlx.checks import check_prompts, integer, number, text
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import (
    DEFAULT_SIZE,
    ImageInput,
    as_image_list,
    check_size,
    load_image,
    prepare_image,
    to_pil,
)
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
             "strength": "strength", "image": "input image"}


@dataclass(frozen=True)
class GenerationRequest:
    """One generation, checked: everything `Pipeline.generate` takes but the callback.

    `create` checks and normalises the arguments without any model: prompts, size (the
    first input image's when not given), steps, guidance, seed, latents, strength, images
    (read, resized and cropped as Flux2KleinPipeline does). What depends on the model
    (default steps and guidance, the latents' channels) is settled by the pipeline.
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
        if strength is not None:
            strength = _strength(strength, names["strength"])
        prepared = _prepared_images(images, strength, names)
        first = prepared[0].size if prepared else (DEFAULT_SIZE, DEFAULT_SIZE)
        width, height = first[0] if width is None else width, first[1] if height is None else height
        width, height = check_size(width, height)
        return cls(
            tuple(prompts), width, height,
            _negatives(negative_prompt, len(prompts), names["negative_prompt"]),
            steps, guidance, _seed(seed), _latents(latents),
            tuple(prepared), strength, num_images, output_type, sigmas, tiled_vae,
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


def _prepared_images(images, strength, names: Mapping[str, str]) -> list[PIL.Image.Image]:
    """Input images read and prepared; image-to-image takes exactly one."""
    image_list = as_image_list(images)
    if strength is not None and len(image_list) != 1:
        raise BonsaiError(f"image-to-image ({names['strength']}) needs exactly one "
                          f"{names['image']}, got {len(image_list)}")
    return [prepare_image(load_image(im, names["image"]), im) for im in image_list]


def _seed(seed) -> int | None:
    if seed is None:
        return None
    seed = integer(seed, "seed", low=0)
    if seed >= 2**64:
        raise BonsaiError(f"seed must be below 2**64, not {seed}")
    return seed
