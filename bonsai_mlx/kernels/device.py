"""The device the Metal kernels run on, and how they are built there.

`current()` answers "is there a real Metal device" and names the kernel factory
(`mx.fast.metal_kernel`); `use(device)` stands in another one for a block. Tests on Linux use
it to put a test double of `mx.fast.metal_kernel` (one built on the CPU emulator that fails to
compile, or returns garbage) where a Mac would have the real thing, so the self-check and its
fallback run here exactly as they would on a Mac.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

METAL_KERNEL = "mlx.core:fast.metal_kernel"


@dataclass(frozen=True)
class Device:
    """A Metal device as the kernels see it.

    - `chip`: the GPU's name (`mx.device_info()["device_name"]` on a Mac);
    - `has_metal`: whether the Metal kernels can run at all;
    - `factory`: `mx.fast.metal_kernel` or a stand-in with its arguments, as a callable or an
      import path `"module:attribute.path"` (a child process can import only the latter);
    - `isolated`: run self-checks in a child process, because a kernel that faults on the GPU
      aborts the process from a Metal completion handler, where nothing can catch it.
    """

    chip: str
    has_metal: bool
    factory: str | Callable[..., Any] = METAL_KERNEL
    isolated: bool = True


_override: Device | None = None


@functools.cache
def _system_device() -> Device:
    has_metal = mx.metal.is_available()
    chip = platform.machine()
    if has_metal:
        try:
            chip = str(mx.device_info().get("device_name") or chip)
        except Exception:  # an MLX without device_info: the chip only names the cache key
            pass
    return Device(chip=chip, has_metal=has_metal)


def current() -> Device:
    """The device in use: the one `use()` put in place, else this machine's."""
    return _override or _system_device()


@contextlib.contextmanager
def use(device: Device) -> Iterator[Device]:
    """Run the kernels on `device` (a test double) inside the block."""
    global _override
    previous, _override = _override, device
    try:
        yield device
    finally:
        _override = previous


def resolve_factory(factory: str | Callable[..., Any]) -> Callable[..., Any]:
    """A factory spec `"module:attr.path"` -> the callable it names (callables as they are)."""
    if callable(factory):
        return factory
    module, _, path = factory.partition(":")
    obj: Any = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def os_build() -> str:
    """The OS release and build: "macOS 15.1 (24B83)" on a Mac (the build changes with the
    Metal compiler), else `platform.platform()`."""
    if sys.platform == "darwin":
        build = _run(["sysctl", "-n", "kern.osversion"])
        return f"macOS {platform.mac_ver()[0]} ({build or 'unknown build'})"
    return platform.platform()


def cache_folder(name: str, override_env: str) -> Path:
    """`$<override_env>`, else `$XDG_CACHE_HOME/bonsai-mlx/<name>` (default ~/.cache)."""
    env = os.environ.get(override_env)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bonsai-mlx" / name
