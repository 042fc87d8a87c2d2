"""Reading and writing model files: safetensors (single or sharded), JSON, Hub download.

Only safetensors and JSON are ever read from a model folder: never pickle, never remote
code. Every model module loads its tensors through here, so file errors read the same
everywhere: they name the file and say what to do.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from bonsai_mlx.checks import shown
from bonsai_mlx.errors import BonsaiError

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}

# Short names for the published models (the CLI's -m, Pipeline.from_pretrained, convert, bench).
MODEL_ALIASES = {
    "ternary": "prism-ml/bonsai-image-ternary-4B-mlx-2bit",
    "binary": "prism-ml/bonsai-image-binary-4B-mlx-1bit",
    "klein-4b": "black-forest-labs/FLUX.2-klein-4B",
    "klein-base-4b": "black-forest-labs/FLUX.2-klein-base-4B",
    "klein-9b": "black-forest-labs/FLUX.2-klein-9B",
    "klein-base-9b": "black-forest-labs/FLUX.2-klein-base-9B",
    "klein-9b-kv": "black-forest-labs/FLUX.2-klein-9b-kv",
}

TOP_LEVEL = "(top level)"  # the component of files directly in a model folder
_MAX_HEADER = 100 * 1024 * 1024
SAFETENSORS_DTYPE_NAMES = {  # a header's dtype tag -> the dtype's name
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E8M0": 1, "C64": 8,
}
# The largest JSON file read from a model folder. Configs are a few kB and the biggest shard
# index (a weight_map of thousands of tensors) well under 1 MB; a bigger "config" is an
# attack (a link to /dev/zero) or not a config.
MAX_JSON_BYTES = 16 * 1024 * 1024


def default_dtype() -> str:
    """bfloat16 where MLX runs on a GPU (Metal, CUDA); float32 on the CPU, where bfloat16
    matmuls are many times slower."""
    return "bfloat16" if mx.default_device().type == mx.DeviceType.gpu else "float32"


def parse_dtype(dtype: str | mx.Dtype) -> mx.Dtype:
    """`"bfloat16" | "float16" | "float32" | "auto"` (or an `mx.Dtype`) -> `mx.Dtype`.

    `"auto"` is `default_dtype()`: bfloat16 on a GPU, float32 on the CPU.
    """
    if dtype == "auto":
        dtype = default_dtype()
    if isinstance(dtype, mx.Dtype):
        if dtype not in DTYPES.values():
            raise BonsaiError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
        return dtype
    try:
        return DTYPES[str(dtype)]
    except KeyError:
        raise BonsaiError(
            f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))} or auto"
        ) from None


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (a link to one is fine: the
    Hugging Face cache is made of links). A folder, FIFO or device is a BonsaiError, not a
    hang or an endless read: the file is opened non-blocking and checked before reading."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BonsaiError(f"{path} does not exist") from None
    except OSError as e:
        raise BonsaiError(f"cannot read {path} ({e.strerror or e})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise BonsaiError(f"{path} is not a regular file (a folder, FIFO or device); "
                          "replace it with the model's file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BonsaiError(f"{path} is larger than {human_bytes(max_bytes)} "
                          f"({human_bytes(info.st_size)}); it is not a model's file")
    return data


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """Read a JSON object from a regular file of at most `max_bytes`, with errors that name
    the file."""
    path = Path(path)
    try:
        data = json.loads(read_regular_file(path, max_bytes).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BonsaiError(f"{path} is not valid JSON ({e}); re-download or fix the file") from e
    except RecursionError:  # [[[[...]]]] nested deeper than Python's stack
        raise BonsaiError(f"{path} is not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise BonsaiError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def check_regular_files(folder: str | Path, max_bytes: int) -> None:
    """A BonsaiError unless every entry directly in `folder` is a folder or a regular file
    (a link to one is fine) of at most `max_bytes`: for folders another library reads
    (transformers' tokenizer files), where a FIFO would hang it and /dev/zero fill memory."""
    folder = Path(folder)
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            info = entry.stat()
        except OSError:  # a broken link: the library names it if it needs it
            continue
        if stat.S_ISDIR(info.st_mode):
            continue
        if not stat.S_ISREG(info.st_mode):
            raise BonsaiError(f"{entry} is not a regular file (a FIFO or device); "
                              "replace it with the model's file")
        if info.st_size > max_bytes:
            raise BonsaiError(f"{entry} is larger than {human_bytes(max_bytes)} "
                              f"({human_bytes(info.st_size)}); it is not a model's file")


# Config keys by which transformers and diffusers import Python files shipped with a model:
# transformers' `auto_map` (it asks "run the custom code? [y/N]" in a terminal and runs it on
# "y"), diffusers' `custom_pipeline`.
CUSTOM_CODE_KEYS = ("auto_map", "custom_pipeline")
_CODE_FREE_LIBRARIES = (None, "diffusers", "transformers")


def check_no_custom_code(*folders: str | Path) -> None:
    """Refuse model folders whose JSON configs name custom code, naming the file.

    bonsai-mlx never runs code from a model folder: every `*config.json` and
    `model_index.json` in `folders` is checked for `auto_map` / `custom_pipeline`, and
    `model_index.json` components must come from diffusers or transformers (any other
    library is a Python module shipped beside the weights). Missing folders are skipped.
    """
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for f in sorted(folder.glob("*.json")):
            if not (f.name.endswith("config.json") or f.name == "model_index.json"):
                continue
            data = read_json(f)
            found = [k for k in CUSTOM_CODE_KEYS if k in data]
            if f.name == "model_index.json":
                found += [f"{k}: {v[0]}" for k, v in data.items() if isinstance(v, list)
                          and len(v) == 2 and v[0] not in _CODE_FREE_LIBRARIES]
            if found:
                raise BonsaiError(
                    f"{f} names custom code ({', '.join(found)}); bonsai-mlx never runs "
                    "code from a model folder: use the original model, or remove those entries"
                )


def write_json(path: str | Path, data: Mapping) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_safetensors_header(path: str | Path) -> dict:
    """The header of a safetensors file, checked against the file's size.

    Raises BonsaiError for a file that is not safetensors or is truncated, before MLX
    ever sees it.
    """
    path = Path(path)
    if not path.is_file():
        raise BonsaiError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BonsaiError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise BonsaiError(
                f"{path} is not a safetensors file or is truncated (header length {n}, "
                f"file {size} bytes); re-download or re-convert it"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BonsaiError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise BonsaiError(f"{path} is not a safetensors file (header is not an object)")
    for name, info in header.items():
        if name != "__metadata__":
            _check_tensor_entry(path, name, info, size - 8 - n)
    return header


def _check_tensor_entry(path: Path, name: str, info, data_bytes: int) -> None:
    """One tensor of a safetensors header: a known dtype, a shape of non-negative integers,
    and data offsets inside the file's `data_bytes` that hold exactly its bytes."""
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(info, dict):
        raise BonsaiError(f"{where} has a malformed header entry {shown(info)}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPE_BYTES:
        raise BonsaiError(f"{where} has an unknown dtype {shown(dtype)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BonsaiError(f"{where} has a malformed shape {shown(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
        raise BonsaiError(f"{where} has malformed data_offsets {shown(offsets)}")
    if offsets[1] > data_bytes:
        raise BonsaiError(f"{path} is truncated: tensor {shown(name)} ends at byte "
                          f"{offsets[1]} of {data_bytes}; re-download or re-convert it")
    if offsets[1] - offsets[0] != math.prod(shape) * _SAFETENSORS_DTYPE_BYTES[dtype]:
        raise BonsaiError(f"{where}: its data_offsets {offsets} do not hold the bytes of "
                          f"shape {shape} {dtype}; re-download or re-convert it")


_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in blocks. Remembered per path, size, modification
    time and inode, so a model's weights are hashed once per process (about a second per
    GB)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = _hash_file(path)
    return _DIGESTS[key]


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def load_safetensors(path: str | Path) -> dict[str, mx.array]:
    """All tensors of one safetensors file as MLX arrays (checked first)."""
    read_safetensors_header(path)
    try:
        return mx.load(str(path))
    except Exception as e:  # MLX's own message lacks the file's name
        raise BonsaiError(f"could not read {path}: {e}") from e


def safetensors_files(folder: str | Path, prefer: str | Sequence[str] = ()) -> list[Path]:
    """The weight files of one component folder.

    The first stem in `prefer` present as `<stem>.safetensors.index.json` (sharded) or
    `<stem>.safetensors` wins (a diffusers folder's `diffusion_pytorch_model`, BFL's `ae`);
    otherwise any single index or every `*.safetensors`. Sorted, so loading is deterministic.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BonsaiError(f"{folder} is not a folder")
    for stem in [prefer] if isinstance(prefer, str) else prefer:
        if (folder / f"{stem}.safetensors.index.json").is_file():
            return _shards(folder / f"{stem}.safetensors.index.json")
        if (folder / f"{stem}.safetensors").is_file():
            return [folder / f"{stem}.safetensors"]
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise BonsaiError(f"{folder} has several shard indexes: {[p.name for p in indexes]}")
    if indexes:
        return _shards(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BonsaiError(f"no *.safetensors in {folder}; is this the right folder?")
    return files


def _shards(index_file: Path) -> list[Path]:
    weight_map = read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise BonsaiError(f"{index_file} has no 'weight_map'")
    files = sorted({index_file.parent / name for name in weight_map.values()})
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise BonsaiError(
            f"{index_file.parent} is missing shards listed in {index_file.name}: {missing}; "
            "the download is incomplete"
        )
    return files


def load_weights(
    folder_or_file: str | Path, prefer: str | Sequence[str] = ()
) -> dict[str, mx.array]:
    """Tensors of a component: a folder (single file or shards; `prefer` as in
    `safetensors_files`) or one .safetensors file."""
    p = Path(folder_or_file)
    files = [p] if p.is_file() else safetensors_files(p, prefer)
    weights: dict[str, mx.array] = {}
    for f in files:
        for k, v in load_safetensors(f).items():
            if k in weights:
                raise BonsaiError(f"tensor {k!r} appears in more than one shard ({f})")
            weights[k] = v
    return weights


def check_weights(
    weights: Mapping[str, mx.array],
    expected: Mapping[str, tuple[int, ...]],
    source: str | Path,
) -> None:
    """Raise one BonsaiError listing every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = [
        f"{k}: file {tuple(weights[k].shape)}, model {tuple(expected[k])}"
        for k in sorted(set(weights) & set(expected))
        if tuple(weights[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source} does not match the model:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", misshaped)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    raise BonsaiError("\n".join(lines))


def load_into(
    module: nn.Module,
    weights: Mapping[str, mx.array],
    source: str | Path,
    *,
    evaluate: bool = True,
) -> None:
    """Load checkpoint tensors into `module`: names and shapes checked against its
    parameters first (one BonsaiError naming `source` lists every problem), floating tensors
    cast to the dtype of the parameter they replace (any other dtype mismatch is an error),
    then evaluated (unless `evaluate` is False: the caller evaluates, e.g. after quantizing).
    """
    params = dict(tree_flatten(module.parameters()))
    check_weights(weights, {k: tuple(v.shape) for k, v in params.items()}, source)
    loaded = []
    for name, value in weights.items():
        want = params[name].dtype
        if value.dtype != want:
            if not (mx.issubdtype(value.dtype, mx.floating) and mx.issubdtype(want, mx.floating)):
                raise BonsaiError(f"{source}: tensor {name} is {value.dtype}, the model needs "
                                  f"{want}")
            value = value.astype(want)
        loaded.append((name, value))
    module.load_weights(loaded)
    if evaluate:
        mx.eval(module.parameters())


def save_safetensors(
    path: str | Path, weights: Mapping[str, mx.array], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (temporary name, then rename)."""
    with atomic_path(Path(path)) as tmp:
        try:
            mx.save_safetensors(str(tmp), dict(weights), metadata=dict(metadata or {}))
        except RuntimeError as e:  # MLX reports a failed write (disk full) this way
            raise OSError(errno.EIO, f"{e}; is the disk full?", str(path)) from e


def check_writable(folder: str | Path, need_bytes: int = 0, *, hint: str) -> None:
    """A BonsaiError unless files can be created in `folder` (or, if it does not exist yet,
    in the nearest folder above it, where it will be made) and `need_bytes` fit there.
    Run before any long work, so that a bad destination does not waste it; `hint` says
    what to do instead ("choose another -o")."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BonsaiError(f"cannot write to {folder}: {existing} is a file, not a folder; {hint}")
    try:  # the real test: permissions, read-only mounts, ACLs, quotas on inodes
        fd, probe = tempfile.mkstemp(prefix=".bonsai-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BonsaiError(f"cannot write to {existing} ({e.strerror or e}); {hint}") from None
    free = shutil.disk_usage(existing).free
    if need_bytes > free:
        raise BonsaiError(f"cannot write to {folder}: {existing} has {free:,} bytes free, "
                          f"{need_bytes:,} are needed; free some space or {hint}")


def normal_mode(path: str | Path, folder: bool = False) -> None:
    """Give a file (or folder) made private by mkstemp / mkdtemp the mode a plain open()
    (or mkdir) would have: 0o666 (0o777) less the umask."""
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it becomes `path` only if the block
    succeeds (a crash or error leaves no half-written file), with a normal file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        normal_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# `atomic_dir`'s temporary folders: .<name>.partial-<pid>-<random> (being written) and
# .<name>.old-<pid>-<random> (the folder being replaced, for an instant).
_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[a-z0-9_]+$")
_PROCESS_START = time.time()


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; it becomes `path` only if the block
    succeeds: an error leaves nothing behind (a failed write, such as a full or read-only
    disk, is a BonsaiError), and a killed process leaves a `.partial` folder that the next
    `atomic_dir` in the same place removes (`remove_stale_temp_dirs`).

    An existing `path` is an error unless `overwrite`; then it is replaced, and removed only
    once the new folder is in place. Whether it may be replaced is the caller's to check
    (`layout.check_destination`).
    """
    path = Path(path).expanduser().absolute()
    existing_folder(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(path.parent)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{pid}-", dir=path.parent))
    try:
        normal_mode(tmp, folder=True)
        yield tmp
        if path.exists() and overwrite:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{pid}-", dir=path.parent))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / path.name, path)  # the previous folder, as it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        elif path.exists():
            raise BonsaiError(f"{path} appeared while it was being written; nothing replaced")
        else:
            os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk: nothing was left behind
        raise BonsaiError(f"cannot write {path} ({e.strerror or e}); nothing was "
                          "written: free some space or choose another folder") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def existing_folder(dst: Path, *, overwrite: bool) -> bool:
    """Whether `dst` exists; if it does, it must be a folder and `overwrite` given (else a
    BonsaiError saying so)."""
    if not dst.exists() and not dst.is_symlink():
        return False
    if not overwrite:
        raise BonsaiError(f"{dst} already exists; choose another folder or pass "
                          "overwrite=True (--overwrite) to replace it")
    if not dst.is_dir():
        raise BonsaiError(f"{dst} is a file, not a folder; remove it first")
    return True


def remove_stale_temp_dirs(folder: Path) -> list[Path]:
    """Remove `atomic_dir` leftovers in `folder` of processes that are gone: only our own
    naming, only folders (not links) older than this process whose process no longer runs.
    A stale `.old` folder whose replacement never arrived is put back, not removed (it is
    the only copy). Returns what was removed or put back."""
    done = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _TEMP_DIR.match(entry.name)
        if (m is None or entry.is_symlink() or not entry.is_dir()
                or entry.stat().st_mtime >= _PROCESS_START or _process_alive(int(m["pid"]))):
            continue
        target, kept = folder / m["name"], entry / m["name"]
        if m["kind"] == "old" and kept.is_dir() and not target.exists():
            os.replace(kept, target)
        shutil.rmtree(entry, ignore_errors=True)
        done.append(entry)
    return done


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def resolve_model(model: str | Path) -> str:
    """An alias -> its repo id; an existing folder or a repo id (owner/name) as is.

    Anything else is a BonsaiError that says what was expected (with a "did you mean" for a
    mistyped alias).
    """
    name = str(model)
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BonsaiError(
                f"{name} is a file, not a model folder; give the folder holding model_index.json"
            )
        return str(path)
    if name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name:
        raise BonsaiError(f"folder {name} does not exist; check the path")
    if name.count("/") != 1 or not all(name.split("/")):
        close = difflib.get_close_matches(name, list(MODEL_ALIASES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise BonsaiError(
            f"unknown model {name!r}; {hint}use an alias ({', '.join(MODEL_ALIASES)}), "
            "a Hugging Face repo id (owner/name) or a local folder"
        )
    return name


def resolve_model_path(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    allow_patterns: Iterable[str] | None = None,
) -> Path:
    """An alias or a Hugging Face repo id downloaded to (or found in) the cache; a local
    folder as is.

    Respects HF_HUB_OFFLINE and the local cache; offline and not cached is a clear error.
    """
    name = resolve_model(path_or_repo_id)
    if Path(name).exists():
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(
            snapshot_download(
                name, revision=revision,
                allow_patterns=list(allow_patterns) if allow_patterns else None,
            )
        )
    except LocalEntryNotFoundError as e:
        raise BonsaiError(
            f"{name} is not in the local Hugging Face cache and cannot be downloaded "
            f"(offline or HF_HUB_OFFLINE=1); connect and run `bonsai-mlx download {name}`"
        ) from e
    except GatedRepoError as e:
        raise BonsaiError(
            f"{name} is gated: accept its licence on huggingface.co and log in "
            "(`hf auth login`)"
        ) from e
    except RepositoryNotFoundError as e:
        raise BonsaiError(f"no Hugging Face repo named {name}; check the id") from e


def folder_files(folder: str | Path) -> Iterator[tuple[str, Path]]:
    """Every file below a model folder, sorted, with its component: the top-level folder it
    lies in, or TOP_LEVEL. Hidden files and folders (.cache, .git) are left out."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if path.is_file() and not any(part.startswith(".") for part in parts):
            yield (parts[0] if len(parts) > 1 else TOP_LEVEL), path


def folder_bytes(folder: str | Path, *, weights_only: bool = False) -> dict[str, int]:
    """Bytes on disk per component of a model folder (see `folder_files`); `weights_only`
    counts the safetensors files alone."""
    sizes: dict[str, int] = {}
    for component, path in folder_files(folder):
        if not weights_only or path.suffix == ".safetensors":
            sizes[component] = sizes.get(component, 0) + path.stat().st_size
    return sizes


def human_bytes(n: float) -> str:
    """Bytes in decimal units: `512 B`, `1.50 kB`, ..., `3.89 GB`."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def checkpoint_float_dtype(folder: str | Path) -> mx.Dtype:
    """The float dtype holding most bytes in a folder's safetensors (headers only): the
    dtype to save a lossless copy in."""
    sizes: dict[str, int] = {}
    for f in safetensors_files(folder):
        for k, info in read_safetensors_header(f).items():
            name = SAFETENSORS_DTYPE_NAMES.get(info["dtype"]) if k != "__metadata__" else None
            if name in DTYPES:
                start, stop = info["data_offsets"]
                sizes[name] = sizes.get(name, 0) + stop - start
    if not sizes:
        raise BonsaiError(f"{folder} holds no floating-point tensors")
    return DTYPES[max(sizes, key=sizes.get)]
