"""Buffers between inaccessible pages, so the emulator catches out-of-bounds accesses.

Each buffer's data ends exactly where an inaccessible page begins, so a read or write one
element past the end faults at once (the emulator turns the fault into an `EmulatorError`
naming the buffer). The bytes between the inaccessible page below and the data start hold a
canary pattern, checked after the launch, so writes before the start show too. Reads before
the start inside that slack (less than a page) are not caught.
"""

from __future__ import annotations

import ctypes
import mmap

import numpy as np

PAGE = mmap.PAGESIZE
CANARY = 0xA5
_PROT_NONE = 0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mprotect.restype = ctypes.c_int


class GuardedBuffer:
    """`nbytes` of memory ending against an inaccessible page, with a canary below it."""

    def __init__(self, name: str, kind: str, nbytes: int):
        self.name, self.kind, self.nbytes = name, kind, nbytes
        self._pages = max(1, -(-nbytes // PAGE))
        self._map = mmap.mmap(-1, (self._pages + 2) * PAGE)
        anchor = ctypes.c_char.from_buffer(self._map)
        self.base = ctypes.addressof(anchor)
        del anchor  # (an exported buffer would keep the map from closing)
        self.end = self.base + (1 + self._pages) * PAGE
        self.start = self.end - nbytes
        self._slack = self.start - (self.base + PAGE)
        self._map[PAGE:PAGE + self._slack] = bytes([CANARY]) * self._slack
        for at in (self.base, self.end):
            if _libc.mprotect(at, PAGE, _PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed for an emulator guard page")

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The data as a numpy array (a view: drop it before `close`)."""
        raw = np.frombuffer(self._map, dtype=np.uint8, count=self.nbytes,
                            offset=PAGE + self._slack)
        return raw.view(dtype).reshape(shape)

    def canary_damage(self) -> int | None:
        """How many bytes before the start were overwritten (None: the canary is intact)."""
        slack = np.frombuffer(self._map, dtype=np.uint8, count=self._slack, offset=PAGE)
        bad = np.flatnonzero(slack != CANARY)
        return None if bad.size == 0 else int(self._slack - bad[0])

    def describe(self, address: int) -> str | None:
        """Where `address` lies relative to this buffer, if next to it."""
        if self.base <= address < self.end + PAGE and not self.start <= address < self.end:
            side = "past the end" if address >= self.end else "before the start"
            return (f"{side} of {self.kind} '{self.name}' (byte {address - self.start} of "
                    f"{self.nbytes})")
        return None

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            pass  # a view is still alive (an error's traceback): unmapped when it goes


def describe_fault(buffers: list[GuardedBuffer], address: int, write: int) -> str:
    """A sentence for a memory fault at `address` (write: 1, read: 0, unknown: -1)."""
    access = {1: "write", 0: "read"}.get(write, "access")
    for b in buffers:
        where = b.describe(address)
        if where:
            return f"out-of-bounds {access} {where}"
    return f"{access} of address {address:#x}, next to no buffer (a wild pointer?)"
