"""What every config dataclass shares: filled from a config.json dict (as mlx-lm's
`BaseModelArgs`). Each config checks its own values in `__post_init__` (`bonsai_mlx.checks`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from bonsai_mlx.errors import BonsaiError

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
