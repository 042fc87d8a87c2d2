"""Prompt embeddings cached per prompt: the last few in memory, and optionally every one on
disk, so a seed sweep over one prompt runs the text encoder once."""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.weights import load_safetensors, read_safetensors_header, save_safetensors

import mlx.core as mx
import numpy as np


class PromptCache:
    """Embeddings by prompt: the last `size` in memory (least recently used go first), and
    all of them as safetensors files under `folder` if given.

    A file's name hashes `key_parts()` (what determines the embeddings: the model's files,
    dtype, layers, length; computed on first use) with the prompt. Each file carries the
    checksum of its bytes and is checked against `shape` and `dtype` when read: an entry
    that does not verify is a miss (with a warning) and is rewritten, and a folder that
    cannot be written leaves the embeddings in memory only (with a warning).
    """

    def __init__(self, folder: str | Path | None, size: int,
                 key_parts: Callable[[], Sequence[str]], shape: tuple[int, ...],
                 dtype: mx.Dtype):
        self.folder = Path(folder) if folder is not None else None
        self.size = size
        self.shape, self.dtype = shape, dtype
        self._key_parts = key_parts
        self._memory: OrderedDict[str, mx.array] = OrderedDict()
        self._unwritable = False  # warned once that the folder cannot be written

    def get(self, prompt: str) -> mx.array | None:
        """The cached embeddings of one prompt, (1, L, D), or None."""
        if prompt in self._memory:
            self._memory.move_to_end(prompt)
            return self._memory[prompt]
        if self.folder is None:
            return None
        path = self.path(prompt)
        if not path.is_file():
            return None
        try:
            embeds = self._read(path)
        except (BonsaiError, OSError, KeyError) as e:  # recomputed, then rewritten
            warnings.warn(f"prompt cache entry {path} is unusable ({e}); recomputing it",
                          stacklevel=3)
            return None
        self._keep(prompt, embeds)
        return embeds

    def put(self, prompt: str, embeds: mx.array) -> None:
        """Remember one prompt's embeddings (1, L, D), in memory and on disk."""
        self._keep(prompt, embeds)
        if self.folder is None:
            return
        path = self.path(prompt)
        try:
            save_safetensors(path, {"prompt_embeds": embeds},
                             metadata={"key": path.stem, "sha256": _checksum(embeds)})
        except OSError as e:  # a read-only or full cache folder: keep generating
            if not self._unwritable:
                warnings.warn(f"cannot write the prompt cache in {self.folder} "
                              f"({e.strerror or e}); prompts are cached in memory only",
                              stacklevel=3)
            self._unwritable = True

    def path(self, prompt: str) -> Path:
        """The file of one prompt's entry under `folder`."""
        key = hashlib.sha256()
        for part in (*self._key_parts(), prompt):
            key.update(part.encode("utf-8") + b"\0")
        return self.folder / f"{key.hexdigest()}.safetensors"

    def _keep(self, prompt: str, embeds: mx.array) -> None:
        if self.size > 0:
            self._memory[prompt] = embeds
            self._memory.move_to_end(prompt)
            while len(self._memory) > self.size:
                self._memory.popitem(last=False)

    def _read(self, path: Path) -> mx.array:
        """A disk entry, checked: its key, shape, dtype and the checksum of its bytes."""
        meta = read_safetensors_header(path).get("__metadata__") or {}
        embeds = load_safetensors(path)["prompt_embeds"]
        if meta.get("key") != path.stem:
            raise BonsaiError("written for another key")
        if tuple(embeds.shape) != self.shape or embeds.dtype != self.dtype:
            raise BonsaiError(f"shape {tuple(embeds.shape)} {embeds.dtype}, expected "
                              f"{self.shape} {self.dtype}")
        if meta.get("sha256") != _checksum(embeds):
            raise BonsaiError("checksum mismatch: the file was changed or damaged")
        return embeds


def _checksum(embeds: mx.array) -> str:
    """SHA-256 of an array's bytes, as stored (any dtype, bfloat16 included)."""
    return hashlib.sha256(np.array(embeds.view(mx.uint8)).tobytes()).hexdigest()
