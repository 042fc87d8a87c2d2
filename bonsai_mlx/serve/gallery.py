"""The output folder as a gallery: its PNGs newest first, their settings, thumbnails.

Only plain files directly inside the folder, with simple names, are ever listed or served:
no paths, no hidden files, no symbolic links (a link could point anywhere).
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import re
import stat
import threading
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.outputs import SETTINGS_KEYS, read_png_metadata

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.png")
THUMB_SIDE = 384
CACHED_THUMBS = 256


class Gallery:
    def __init__(self, folder: Path):
        self.folder = folder
        self._meta: dict[str, tuple[tuple, dict]] = {}
        self._thumbs: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def read(self, name: str) -> bytes | None:
        """The bytes of `name` if it is a plain PNG file in the folder; else None. Opened
        with O_NOFOLLOW: a symbolic link (which could point anywhere) is never followed."""
        if not NAME.fullmatch(name):
            return None
        try:
            fd = os.open(self.folder / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read()

    def list(self, limit: int = 200) -> list[dict]:
        """The newest `limit` images: name, size in bytes, modification time, settings."""
        entries = []
        try:
            with os.scandir(self.folder) as it:
                for e in it:
                    if NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        entries.append((st.st_mtime_ns, e.name, st.st_size))
        except OSError:
            return []
        entries.sort(reverse=True)
        return [self._item(name, mtime, size) for mtime, name, size in entries[:limit]]

    def _item(self, name: str, mtime_ns: int, size: int) -> dict:
        key = (mtime_ns, size)
        with self._lock:
            cached = self._meta.get(name)
        if cached is None or cached[0] != key:
            try:
                text = read_png_metadata(self.folder / name)
            except (OSError, BonsaiError, SyntaxError, ValueError):
                text = {}
            settings = {k: text[k] for k in SETTINGS_KEYS if k in text}
            cached = (key, settings)
            with self._lock:
                self._meta[name] = cached
        return {"name": name, "url": f"/gallery/{name}", "thumb": f"/gallery/{name}/thumb",
                "created": mtime_ns / 1e9, "bytes": size, "settings": cached[1]}

    def thumbnail(self, name: str) -> bytes | None:
        """A JPEG at most THUMB_SIDE pixels a side, or None (see `read`); the newest
        CACHED_THUMBS are kept in memory."""
        from PIL import Image

        data = self.read(name)
        if data is None:
            return None
        key = hashlib.sha256(data).digest()
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.thumbnail((THUMB_SIDE, THUMB_SIDE))
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG", quality=85)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None  # not a readable PNG
        with self._lock:
            self._thumbs[key] = buf.getvalue()
            while len(self._thumbs) > CACHED_THUMBS:
                self._thumbs.popitem(last=False)
        return buf.getvalue()
