"""Refusing a request that would not fit in memory before it is queued: a 400 that names the
largest size that fits, instead of the operating system killing the server halfway through.

The estimate is `bonsai_mlx.memory`'s, from the model folder's configs and safetensors
headers, read once. The memory a job may use is what the system has free plus what MLX
already holds in this process (the loaded model, the buffers it keeps for reuse), since the
estimate counts the model too; with `--max-memory` at most that. A request that the worker
is running meanwhile does not skew it: what that job holds is MLX's, counted as ours.
"""

from __future__ import annotations

import threading
from pathlib import Path

from bonsai_mlx.memory import (
    ModelSizes,
    available_memory,
    memory_check_disabled,
    memory_shortfall,
    read_model_sizes,
)
from bonsai_mlx.request import GenerationRequest
from bonsai_mlx.serve.errors import ApiError


class MemoryCheck:
    """Checks one request at a time against the model `model_id` in `dtype`; `limit`
    (bytes, --max-memory) caps what a generation may use, the model included;
    `keep_text_encoder` (--no-offload): the text encoder stays loaded with the model."""

    def __init__(self, model_id: str, dtype: str, limit: int | None = None, *,
                 keep_text_encoder: bool = False):
        self.model_id = model_id
        self.dtype = dtype
        self.limit = limit
        self.keep_text_encoder = keep_text_encoder
        self._sizes: ModelSizes | None = None
        self._lock = threading.Lock()

    def sizes(self, pipe) -> ModelSizes | None:
        """The model's sizes, read once from the folder the pipeline was loaded from (or
        `model_id`, when it is a folder and the model is not loaded yet); None while a Hub
        model is neither loaded nor known."""
        with self._lock:
            if self._sizes is None:
                folder = getattr(pipe, "source", None) or Path(self.model_id)
                if folder.is_dir():
                    sizes = read_model_sizes(folder, self.dtype)
                    self._sizes = sizes.text_encoder_kept() if self.keep_text_encoder else sizes
            return self._sizes

    def available(self) -> int | None:
        """Bytes a generation may use now, the loaded model included; None if unknown."""
        free = available_memory(include_own=True)
        known = [b for b in (free, self.limit) if b is not None]
        return min(known) if known else None

    def check(self, request: GenerationRequest, pipe) -> None:
        """A 400 (param `size`, code `insufficient_memory`) when one image of `request` is
        estimated not to fit. BONSAI_NO_MEMORY_CHECK=1 on the server turns it off."""
        if memory_check_disabled():
            return
        sizes, available = self.sizes(pipe), self.available()
        if sizes is None or available is None:
            return
        problem = memory_shortfall(sizes, request.width, request.height, available,
                                   dtype=self.dtype, tiled_vae=request.tiled_vae,
                                   vae_tile_size=request.vae_tile_size,
                                   reference_sizes=request.reference_sizes)
        if problem is None:
            return
        if self.limit is not None and available == self.limit:
            problem += " (the server's --max-memory)"
        smaller = "a smaller size" + (" or fewer, smaller input images"
                                      if request.reference_sizes else "")
        raise ApiError(400, f"{problem}; ask for {smaller}", param="size",
                       code="insufficient_memory")
