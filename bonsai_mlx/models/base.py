"""What every config dataclass shares: filled from a config.json dict (as mlx-lm's
`BaseModelArgs`), with keys that are not fields ignored and values of the wrong type named."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from bonsai_mlx.errors import BonsaiError

C = TypeVar("C", bound="BaseConfig")


class BaseConfig:
    """Base of the config dataclasses (frozen or not): `from_dict` is the one config parser."""

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any], source: str = "config") -> C:
        """Build from a config.json dict. Keys that are not fields (`_class_name`, ...) are
        ignored; lists become tuples where a field is a tuple; a value of another type than
        its field's is a BonsaiError naming `source` and the key."""
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                kwargs[f.name] = _checked(d[f.name], hints[f.name], f.name, source)
        return cls(**kwargs)


_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _checked(value: Any, hint: Any, name: str, source: str) -> Any:
    """`value` as the annotation `hint` (int, float, bool, str, tuple[...], X | None) wants
    it, else BonsaiError."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if typing.get_origin(option) is tuple and isinstance(value, (list, tuple)):
            item = typing.get_args(option)[0]
            return tuple(_checked(v, item, name, source) for v in value)
        if option in _SCALARS and _is_instance(value, option):
            return value
    wanted = " or ".join(_SCALARS.get(o, "a list") for o in options if o is not type(None))
    raise BonsaiError(f"{source}: {name} must be {wanted}, not {value!r}; fix the file")


def _is_instance(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)  # true is not 1 here
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)
