"""Active memory over time, sampled in a background thread."""

from __future__ import annotations

import statistics
import threading

import mlx.core as mx

SAMPLE_INTERVAL_S = 0.05


class MemorySampler:
    """Samples `mx.get_active_memory()` every `interval` seconds in a background thread.

    `with MemorySampler() as s: ...` then `s.mean`, `s.max`, `s.count` (bytes).
    """

    def __init__(self, interval: float = SAMPLE_INTERVAL_S):
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append(mx.get_active_memory())
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(mx.get_active_memory())

    @property
    def count(self) -> int:
        return len(self.samples)

    @property
    def mean(self) -> int:
        return int(statistics.fmean(self.samples)) if self.samples else 0

    @property
    def max(self) -> int:
        return max(self.samples, default=0)

