"""LoRA files: where they come from, which format they are in, and the one mapping of
their layer names onto the transformer's (diffusers) module names.

Only safetensors are read (never pickle), from a file, a folder or a Hugging Face repo.
The formats are those diffusers 0.42 reads for FLUX.2 (`Flux2LoraLoaderMixin`):

- `diffusers` (PEFT): `transformer.<module>.lora_A.weight` / `.lora_B.weight` (bare
  `<module>` names too). Alpha from the file's `lora_adapter_metadata` (`lora_alpha`,
  `alpha_pattern`, `use_rslora`; PEFT's `adapter_config.json` beside the file in a folder),
  otherwise alpha = rank.
- `bfl` (Black Forest Labs / ai-toolkit): `diffusion_model.double_blocks.0.img_attn.qkv.
  lora_A.weight`, ... (also under PEFT's `base_model.model.`); a fused qkv adapter becomes
  three adapters sharing A, its B split in three, as diffusers converts it. Expanded
  diffusers block names under the same prefix are accepted too.
- `kohya`: `lora_unet_<BFL or diffusers name, dots as _>.lora_down.weight` /
  `.lora_up.weight` / `.alpha` (default alpha = rank).

Any layer may carry an `.alpha` tensor. Each adapter is applied as `scaling * B (A x)` with
`scaling = alpha / rank` (PEFT's `alpha / sqrt(rank)` with `use_rslora`). Text-encoder
tensors are ignored with a warning; LoKr, LoHa and DoRA files are refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from bonsai_mlx.checks import flag, integer, number, shown
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.transformer import (
    DOUBLE_BLOCK_LINEARS,
    SINGLE_BLOCK_LINEARS,
    bfl_module_names,
    bfl_module_to_diffusers,
)
from bonsai_mlx.weights import (
    MODEL_ALIASES,
    load_safetensors,
    read_json,
    read_safetensors_header,
    resolve_model_path,
)

import mlx.core as mx

# Preferred file names in a folder or repo: diffusers' save_lora_weights, PEFT's save_pretrained.
DEFAULT_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig JSON in __metadata__
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_",
                         "lora_te2_", "lora_te3_")
PREFIXES = {  # key prefix -> format
    "transformer.": "diffusers",
    "diffusion_model.": "bfl",
    "base_model.model.": "bfl",
    "lora_unet_": "kohya",
}
# Diffusers' top-level linear layers of Flux2Transformer2DModel (the blocks' are in quant.model).
TOP_LINEARS = (
    "x_embedder", "context_embedder", "proj_out", "norm_out.linear",
    "time_guidance_embed.timestep_embedder.linear_1",
    "time_guidance_embed.timestep_embedder.linear_2",
    "time_guidance_embed.guidance_embedder.linear_1",
    "time_guidance_embed.guidance_embedder.linear_2",
    "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
    "single_stream_modulation.linear",
)
# Parts of a single block's fused to_qkv_mlp_proj that a file may target on their own.
SINGLE_BLOCK_PARTS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.proj_mlp")

_TENSOR = re.compile(r"(?P<module>.+)\.(?:(?P<kind>lora_A|lora_B|lora_down|lora_up)\.weight"
                     r"|(?P<alpha>alpha))")
_UNSUPPORTED = (  # (marker in a key, what it is)
    (".lokr_", "LoKr"), ("lycoris_", "LyCORIS (LoKr)"), (".hada_", "LoHa"),
    ("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"),
    (".lora_B.bias", "LoRA with bias"), (".lora_up.bias", "LoRA with bias"),
)


@dataclass
class LoraLayer:
    """One adapter on one transformer layer: `scaling * B (A x)` added to its output."""

    module: str  # diffusers module name, e.g. transformer_blocks.0.attn.to_q
    down: mx.array  # A: (rank, in)
    up: mx.array  # B: (out, rank)
    scaling: float  # alpha / rank
    key: str  # the file's name for this layer (messages)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    """A parsed LoRA file: its layers in diffusers names, and what was left out."""

    source: str  # the file (or repo/file) read
    name: str  # default adapter name: the file's stem
    formats: list[str]
    layers: list[LoraLayer]
    text_encoder_keys: list[str] = field(default_factory=list)
    unknown_keys: list[str] = field(default_factory=list)  # names of no known layer

    @property
    def format(self) -> str:
        return " + ".join(self.formats)

    def summary(self) -> dict:
        """What the file holds, for `bonsai-mlx info`: format, ranks, layers, sizes."""
        arrays = {id(x): x for layer in self.layers for x in (layer.down, layer.up)}.values()
        return {
            "file": self.source, "format": self.format,
            "ranks": sorted({layer.rank for layer in self.layers}),
            "file_layers": len({layer.key for layer in self.layers}),
            "layers": [{"module": layer.module, "rank": layer.rank, "scaling": layer.scaling,
                        "in": int(layer.down.shape[1]), "out": int(layer.up.shape[0])}
                       for layer in self.layers],
            "parameters": sum(x.size for x in arrays), "bytes": sum(x.nbytes for x in arrays),
            "dtypes": sorted({str(x.dtype).removeprefix("mlx.core.") for x in arrays}),
            "text_encoder_tensors": len(self.text_encoder_keys),
            "unknown_tensors": self.unknown_keys,
        }


# ---- reading --------------------------------------------------------------------------


def read_lora(source: str | Path, weight_name: str | None = None,
              revision: str | None = None) -> LoraFile:
    """Read a LoRA: a .safetensors file, a folder holding one, or a Hugging Face repo id
    (`owner/name`, or `owner/name/file.safetensors`; only that file is downloaded)."""
    path = lora_path(source, weight_name, revision)
    header = read_safetensors_header(path)
    config = _adapter_config(path, header.get("__metadata__"))
    return parse_lora(load_safetensors(path), config, str(path), name=_default_name(source, path))


def _default_name(source: str | Path, path: Path) -> str:
    """The file's stem; for diffusers' and PEFT's standard file names, the folder's or the
    repo's name instead."""
    local = Path(source).expanduser()
    if path.name not in DEFAULT_WEIGHT_NAMES or local.is_file():
        return path.stem
    return local.resolve().name if local.is_dir() else str(source).split("/")[1]  # owner/name


def lora_path(source: str | Path, weight_name: str | None = None,
              revision: str | None = None) -> Path:
    """The local .safetensors file of a LoRA source (downloaded from the Hub if needed)."""
    path = Path(source).expanduser()
    if weight_name is not None and Path(weight_name).name != weight_name:
        raise BonsaiError(f"weight_name {weight_name!r} must be a file name, not a path")
    if path.is_file():
        return _check_suffix(path)
    if path.is_dir():
        name = weight_name or _pick_file([p.name for p in path.iterdir() if p.is_file()], path)
        return _check_suffix(path / name, must_exist=True)
    _check_regular(path)
    text = str(source)
    head, colon, tail = text.rpartition(":")
    if colon and Path(head).expanduser().exists():  # `--lora PATH:SCALE` with a bad SCALE
        raise BonsaiError(f"LoRA {source} does not exist; {head} does: if {tail!r} is meant "
                          "as its scale (PATH:SCALE), the scale must be a number")
    parts = text.split("/")
    if text.endswith(".safetensors") and len(parts) == 3 and weight_name is None:
        text, weight_name = "/".join(parts[:2]), parts[2]  # owner/name/file.safetensors
    if (text in MODEL_ALIASES or text.startswith((".", "/", "~")) or len(text.split("/")) != 2
            or not all(text.split("/"))):
        raise BonsaiError(f"LoRA {source} does not exist; give a .safetensors file, a folder "
                          "holding one, or a Hugging Face repo id (owner/name)")
    return _hub_file(text, weight_name, revision)


def _check_suffix(path: Path, must_exist: bool = False) -> Path:
    if path.suffix != ".safetensors":
        raise BonsaiError(f"{path}: only .safetensors LoRA files are read (never pickle); "
                          "convert it to safetensors first")
    if must_exist and not path.is_file():
        _check_regular(path)
        raise BonsaiError(f"{path} does not exist")
    return path


def _check_regular(path: Path) -> None:
    """Refuse a path that exists but is no file or folder (a FIFO, a device, a socket):
    reading one would block or never end."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise BonsaiError(f"LoRA {path} is not a regular file (a FIFO, device or socket); "
                          "give a .safetensors file, a folder holding one, or a repo id")


def _pick_file(names: list[str], where: str | Path) -> str:
    """The LoRA file among a folder's or repo's files (weight_name decides when several)."""
    files = sorted(n for n in names if n.endswith(".safetensors"))
    for preferred in DEFAULT_WEIGHT_NAMES:
        if preferred in files:
            return preferred
    if len(files) == 1:
        return files[0]
    if not files:
        raise BonsaiError(f"{where} holds no .safetensors file (only safetensors are read)")
    hint = ("give the file's path" if Path(str(where)).is_dir()
            else f"--lora {where}/FILE.safetensors")
    raise BonsaiError(f"{where} holds several .safetensors files ({', '.join(files[:8])}); "
                      f"choose one with weight_name= (CLI: {hint})")


def _hub_file(repo_id: str, weight_name: str | None, revision: str | None) -> Path:
    if weight_name is None:
        weight_name = _pick_file(_hub_listing(repo_id, revision), repo_id)
    # PEFT's adapter_config.json (JSON) carries the alpha of a PEFT-saved repo
    folder = resolve_model_path(repo_id, revision=revision,
                                allow_patterns=[weight_name, "adapter_config.json"])
    return _check_suffix(folder / weight_name, must_exist=True)


def _hub_listing(repo_id: str, revision: str | None) -> list[str]:
    """The repo's file names: asked from the Hub, or read from the cache when offline."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().list_repo_files(repo_id, revision=revision)
        except Exception:  # offline or not found: the cache (or the download) says more
            pass
    folder = resolve_model_path(repo_id, revision=revision, allow_patterns=["*.safetensors"])
    return [p.name for p in folder.iterdir()]


def _adapter_config(path: Path, metadata) -> dict:
    """diffusers' LoraConfig from the file's metadata (keys under `transformer.`), else
    PEFT's adapter_config.json beside the file, else {}; checked (`check_lora_config`)."""
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise BonsaiError(f"{path}: __metadata__ is {shown(metadata)}, not an object of "
                          "strings; the file is malformed (re-save it)")
    raw = metadata.get(METADATA_KEY)
    if raw is None or raw == "":
        beside = path.parent / "adapter_config.json"
        return check_lora_config(read_json(beside), beside) if beside.is_file() else {}
    where = f"{path}: {METADATA_KEY} metadata"
    if not isinstance(raw, str):  # safetensors metadata values are strings
        raise BonsaiError(f"{where} is {shown(raw)}, not a JSON string; re-save the file")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BonsaiError(f"{path}: unreadable {METADATA_KEY} metadata ({e})") from None
    if not isinstance(config, dict):
        raise BonsaiError(f"{where} is {shown(config)}, not a JSON object")
    if any(k.startswith("transformer.") for k in config):
        config = {k.removeprefix("transformer."): v for k, v in config.items()
                  if k.startswith("transformer.")}
    return check_lora_config(config, where)


def check_lora_config(config: dict, where: str | Path) -> dict:
    """The LoraConfig entries bonsai-mlx reads, checked: `lora_alpha` a finite number,
    `alpha_pattern` {regex: number}, `rank_pattern` {regex: integer >= 1}, `use_rslora` a flag."""
    if not isinstance(config, dict):
        raise BonsaiError(f"{where}: the LoRA config must be an object, not {shown(config)}")
    if config.get("lora_alpha") is not None:
        number(config["lora_alpha"], f"{where}: lora_alpha")
    if config.get("use_rslora") is not None:
        flag(config["use_rslora"], f"{where}: use_rslora")
    for key, check in (("alpha_pattern", lambda v, name: number(v, name)),
                       ("rank_pattern", lambda v, name: integer(v, name, low=1))):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise BonsaiError(f"{where}: {key} must be an object of layer patterns, not "
                              f"{shown(patterns)}")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise BonsaiError(f"{where}: {key} pattern {pattern!r} is no regular "
                                  f"expression ({e})") from None
            check(value, f"{where}: {key}[{pattern!r}]")
    return config


# ---- parsing --------------------------------------------------------------------------


def parse_lora(tensors: dict[str, mx.array], config: dict | None = None,
               source: str = "LoRA", *, name: str = "lora") -> LoraFile:
    """File tensors -> layers in diffusers module names (see the module docstring)."""
    config = check_lora_config(config or {}, f"{source} config")
    for marker, what in _UNSUPPORTED:
        bad = [k for k in tensors if marker in k]
        if bad:
            raise BonsaiError(f"{source} is a {what} file ({bad[0]}); bonsai-mlx applies LoRA "
                              f"adapters only, {what} is not supported yet")
    text_encoder = sorted(k for k in tensors if k.startswith(TEXT_ENCODER_PREFIXES))
    groups: dict[str, dict[str, mx.array]] = {}
    keys: dict[str, list[str]] = {}  # the file's keys of each layer
    unknown, formats = [], set()
    for key in sorted(set(tensors) - set(text_encoder)):
        m = _TENSOR.fullmatch(key)
        if m is None:
            unknown.append(key)
            continue
        part = m.group("kind") or "alpha"
        part = {"lora_down": "lora_A", "lora_up": "lora_B"}.get(part, part)
        groups.setdefault(m.group("module"), {})[part] = tensors[key]
        keys.setdefault(m.group("module"), []).append(key)
    layers = []
    for stem, group in groups.items():
        fmt, targets = _targets(stem)
        if targets is None:
            unknown.extend(keys[stem])
            continue
        formats.add(fmt)
        layers.extend(_layers(stem, group, targets, config, source))
    if not layers and not text_encoder:
        raise BonsaiError(f"{source} holds no LoRA layers bonsai-mlx knows (e.g. "
                          f"{(unknown or ['no tensors'])[0]}); is it a FLUX.2 LoRA?")
    return LoraFile(source, name, sorted(formats), layers, text_encoder, sorted(unknown))


def _targets(stem: str) -> tuple[str, list[tuple[str, bool]] | None]:
    """A file's layer name -> (format, [(diffusers module, swap halves), ...]); several
    modules for a fused qkv (B split in as many parts); None for a kohya name that is no
    layer's. Diffusers names pass as they are: the model decides whether it has them."""
    fmt, name = _split_prefix(stem)
    if fmt == "kohya":
        name = _kohya_name(name)
        if name is None:
            return fmt, None
    if fmt != "diffusers":
        name = re.sub(r"^sformer_blocks\.", "transformer_blocks.", name)  # an export's typo
        mapped = bfl_module_to_diffusers(name)
        if mapped is not None:
            names, swap = mapped
            return fmt, [(n, swap) for n in names]
    return fmt, [(name, False)]  # diffusers names: the model says whether it has them


def _split_prefix(stem: str) -> tuple[str, str]:
    """A file's layer name -> (format, the name without its format's prefix)."""
    fmt, prefix = next(((f, p) for p, f in PREFIXES.items() if stem.startswith(p)),
                       ("diffusers", ""))
    return fmt, stem[len(prefix):]


def _underscored(names) -> dict[str, str]:
    return {n.replace(".", "_"): n for n in names}


# kohya writes module names with "_" for "."; the names it may use, back to dotted form
_KOHYA_TOP = _underscored([n for n in bfl_module_names() if "{i}" not in n] + list(TOP_LINEARS))
_KOHYA_BLOCK = {
    "double_blocks": _underscored(n.split("{i}.")[1] for n in bfl_module_names()
                                  if n.startswith("double_blocks")),
    "single_blocks": _underscored(n.split("{i}.")[1] for n in bfl_module_names()
                                  if n.startswith("single_blocks")),
    "transformer_blocks": _underscored(DOUBLE_BLOCK_LINEARS),
    "single_transformer_blocks": _underscored(SINGLE_BLOCK_LINEARS + SINGLE_BLOCK_PARTS),
}


def _kohya_name(name: str) -> str | None:
    m = re.fullmatch(r"(double_blocks|single_blocks|single_transformer_blocks|"
                     r"transformer_blocks)_(\d+)_(.+)", name)
    if m is None:
        return _KOHYA_TOP.get(name)
    sub = _KOHYA_BLOCK[m.group(1)].get(m.group(3))
    return None if sub is None else f"{m.group(1)}.{m.group(2)}.{sub}"


def _layers(stem, group, targets, config, source) -> list[LoraLayer]:
    down, up = group.get("lora_A"), group.get("lora_B")
    if down is None or up is None:
        missing = "lora_B / lora_up" if up is None else "lora_A / lora_down"
        raise BonsaiError(f"{source}: {stem} has no {missing} tensor; the file is incomplete")
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise BonsaiError(f"{source}: {stem} has A {tuple(down.shape)} and B "
                          f"{tuple(up.shape)}; a LoRA needs A (rank, in) and B (out, rank)")
    rank = down.shape[0]
    if rank == 0:
        raise BonsaiError(f"{source}: {stem} has rank 0 (A {tuple(down.shape)}); the file "
                          "holds no adapter for it")
    alpha = _alpha(group.get("alpha"), (targets[0][0], _split_prefix(stem)[1]), config, rank,
                   stem, source)
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if up.shape[0] % len(targets):
        raise BonsaiError(f"{source}: {stem} B has {up.shape[0]} rows, not {len(targets)} "
                          "equal parts (a fused qkv)")
    out = []
    for (module, swap), part in zip(targets, mx.split(up, len(targets), axis=0), strict=True):
        if swap:
            shift, scale = mx.split(part, 2, axis=0)
            part = mx.concatenate([scale, shift], axis=0)
        out.append(LoraLayer(module, down, part, scaling, stem))
    return out


def _alpha(tensor, names: tuple[str, ...], config: dict, rank: int, stem: str,
           source: str) -> float:
    r"""The `.alpha` tensor, else the config's alpha for this layer, else the rank (scaling 1).
    An `alpha_pattern` key matches as in PEFT (`(.*\.)?(pattern)$`), against the diffusers
    module name or the file's own name (BFL or kohya, its prefix stripped): PEFT writes the
    names of the model it trained, which may be either."""
    if tensor is not None:
        if tensor.size != 1:
            raise BonsaiError(f"{source}: {stem}.alpha has {tensor.size} values, not one")
        return number(tensor.astype(mx.float32).item(), f"{source}: {stem}.alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if any(re.match(rf"(.*\.)?({pattern})$", name) for name in names):
            return float(value)
    alpha = config.get("lora_alpha")
    return float(alpha) if alpha is not None else float(rank)
