"""What a generation may ask for, checked before any model is loaded.

The CLI, the Python API and the server all check sizes, prompts, strength and images here,
so a mistake reads the same everywhere and fails in milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from bonsai_mlx.checks import text
from bonsai_mlx.errors import BonsaiError

MULTIPLE = 16  # VAE factor 8 x 2x2 patch: one token per 16x16 pixels
MIN_SIZE, MAX_SIZE = 16, 4096  # per side, pixels
DEFAULT_SIZE = 1024  # per side, without a size or an input image


def check_size(width: int, height: int) -> None:
    """Multiples of 16 within [MIN_SIZE, MAX_SIZE]; the error suggests valid sizes."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise BonsaiError(f"{name} must be an integer number of pixels, not {v!r}")
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise BonsaiError(f"{name} {v} is out of range: use {MIN_SIZE} to {MAX_SIZE} pixels")
    bad = [(n, v) for n, v in (("width", width), ("height", height)) if v % MULTIPLE]
    if bad:
        def near(v: int) -> str:
            lo = max(MIN_SIZE, v // MULTIPLE * MULTIPLE)
            hi = min(MAX_SIZE, lo + MULTIPLE)
            return f"{lo} or {hi}"

        parts = ", ".join(f"{n} {v} (nearest valid: {near(v)})" for n, v in bad)
        raise BonsaiError(f"width and height must be multiples of {MULTIPLE}: {parts}")


def parse_size(text: str, option: str = "--size") -> tuple[int, int]:
    """`"WxH"` -> (width, height), multiples of 16 within the pipeline's bounds, else a
    BonsaiError naming `option` and the nearest valid sizes."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", text)
    if not m:
        raise BonsaiError(
            f"{option} {text!r} is not WIDTHxHEIGHT; write it like 1024x1024 or 512x768"
        )
    width, height = int(m.group(1)), int(m.group(2))
    for name, v in (("width", width), ("height", height)):
        if v < MIN_SIZE:
            raise BonsaiError(f"{option} {text}: {name} {v} is too small; use at least {MIN_SIZE}")
        if v % MULTIPLE:
            lo, hi = v // MULTIPLE * MULTIPLE, v // MULTIPLE * MULTIPLE + MULTIPLE
            options = f"{lo} or {hi}" if lo >= MIN_SIZE else f"{hi}"
            raise BonsaiError(
                f"{option} {text}: {name} {v} is not a multiple of {MULTIPLE}; use {options} "
                f"(e.g. {option} {_round(width)}x{_round(height)})"
            )
    check_size(width, height)
    return width, height


def _round(v: int) -> int:
    return max(MIN_SIZE, int(round(v / MULTIPLE)) * MULTIPLE)


def check_prompts(prompt: str | Sequence[str]) -> list[str]:
    """One prompt or a non-empty list of them -> a list, else a BonsaiError."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (not isinstance(prompts, (list, tuple)) or not prompts
            or not all(isinstance(p, str) for p in prompts)):
        raise BonsaiError("prompt must be a string or a non-empty list of strings")
    return [text(p, "the prompt") for p in prompts]


def negative_prompts(negative_prompt: str | Sequence[str] | None, n: int) -> list[str]:
    """The negative prompt of each of `n` prompts ("" when none is given, as diffusers)."""
    if negative_prompt is None:
        return [""] * n  # diffusers' Flux2KleinPipeline always uses ""
    if isinstance(negative_prompt, str):
        return [text(negative_prompt, "the negative prompt")] * n
    negatives = list(negative_prompt)
    if len(negatives) != n or not all(isinstance(p, str) for p in negatives):
        raise BonsaiError(
            f"negative_prompt must be a string or a list of {n} strings (one per prompt)"
        )
    return [text(p, "the negative prompt") for p in negatives]
