"""Checks of values a user or a config file supplies: integers, numbers, flags, text, prompts,
and config dataclasses filled from config.json (`BaseConfig`, as mlx-lm's `BaseModelArgs`).

Each check returns the value as a plain Python int / float / bool / str, or raises a
BonsaiError naming it. numpy scalars are accepted wherever numbers are (`np.float32(0.5)` is
a number); bools are not numbers, and a float is not an integer.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bonsai_mlx.errors import BonsaiError

import numpy as np


def shown(value, limit: int = 60) -> str:
    """repr(value) for an error message, cut to `limit` characters (an integer too long for
    Python to print, as a JSON body can hold, reads as its number of digits)."""
    try:
        text = repr(value)
    except ValueError:  # beyond sys.get_int_max_str_digits()
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def integer(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """An integer in [low, high] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BonsaiError(f"{name} must be an integer, not {shown(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = (f"in {low}..{high}" if low is not None and high is not None
                else f">= {low}" if low is not None else f"<= {high}")
        raise BonsaiError(f"{name} must be an integer {span}, not {shown(value)}")
    return value


def number(value, name: str, *, positive: bool = False) -> float:
    """A finite real number (> 0 if `positive`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BonsaiError(f"{name} must be a number, not {shown(value)}")
    kind = "a positive finite number" if positive else "a finite number"
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range (a JSON body can hold one)
        raise BonsaiError(f"{name} must be {kind}, not {shown(value)}") from None
    if not math.isfinite(number) or (positive and number <= 0):
        raise BonsaiError(f"{name} must be {kind}, not {shown(number)}")
    return number


def flag(value, name: str) -> bool:
    """true or false."""
    if not isinstance(value, (bool, np.bool_)):
        raise BonsaiError(f"{name} must be true or false, not {value!r}")
    return bool(value)


def text(value: str, name: str) -> str:
    """A string that is valid Unicode text (encodable as UTF-8). Bytes that were not UTF-8
    reach Python as lone surrogates (a command line's `surrogateescape`), and would fail
    later in the tokenizer or the PNG metadata."""
    if not isinstance(value, str):
        raise BonsaiError(f"{name} must be a string, not {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start:e.end]
        shown = (" ".join(f"0x{ord(c) - 0xDC00:02x}" for c in bad)
                 if all(0xDC80 <= ord(c) <= 0xDCFF for c in bad) else repr(bad))
        raise BonsaiError(
            f"{name} is not valid UTF-8 text ({shown} at character {e.start}); "
            "write it as UTF-8"
        ) from None
    return value


def check_prompts(prompt: str | Sequence[str], name: str = "the prompt") -> list[str]:
    """One prompt or a non-empty list of them -> a list, else a BonsaiError."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if (not isinstance(prompts, (list, tuple)) or not prompts
            or not all(isinstance(p, str) for p in prompts)):
        raise BonsaiError("prompt must be a string or a non-empty list of strings")
    return [text(p, name) for p in prompts]



C = TypeVar("C", bound="BaseConfig")


class BaseConfig:
    """Base of the config dataclasses (frozen or not): `from_dict` is the one config parser."""

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any], source: str | Path | None = None) -> C:
        """Build from a config.json dict. Keys that are not fields (`_class_name`, ...) are
        ignored; a value `__post_init__` rejects is a BonsaiError naming `source`."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except BonsaiError as e:
            if source is None:
                raise
            raise BonsaiError(f"{source}: {e}") from None
