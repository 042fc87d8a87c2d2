"""Whether a generation fits in memory, estimated before any model is loaded.

From the model folder's config.json files and safetensors headers only:

- weights: the transformer and the VAE decoder (resident throughout), float tensors counted
  in the compute dtype; the text encoder's layers the pipeline reads (resident while the
  prompt is encoded, released afterwards);
- one transformer step: the attention scores (heads x tokens^2, materialised by MLX's CPU
  attention; the fused GPU kernel for head sizes 64, 80 and 128 keeps none) and the
  block activations (tokens x inner dim x (4 + 2 x mlp_ratio));
- the VAE decode: pixels x the widest full-resolution channels x a scratch factor (the CPU's
  measured: Klein's VAE took 6.04 GB at 512x512 in float32, benchmarks/RESULTS.md; the GPU's
  assumed, activations only); tiled, two whole activations plus one tile's scratch. Encoding
  reference images is counted the same way.

The peak is the resident weights plus the largest of the three transients. `check_memory`
compares it with the memory available (Linux: MemAvailable and the cgroup limit; a GPU:
what MLX reports) and fails with the largest size that fits; BONSAI_NO_MEMORY_CHECK=1 skips
the check. An estimate, not a measurement: it is meant to refuse requests that cannot fit,
before minutes of loading, not to predict the peak to the byte.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import MULTIPLE
from bonsai_mlx.layout import LAYOUTS, detect_layout
from bonsai_mlx.models.text_encoder import DEFAULT_OUT_LAYERS
from bonsai_mlx.models.transformer import Flux2TransformerConfig
from bonsai_mlx.models.vae import AUTO_TILE_PIXELS, VAE, VAEConfig
from bonsai_mlx.weights import (
    DTYPES,
    SAFETENSORS_DTYPE_NAMES,
    parse_dtype,
    read_json,
    read_safetensors_header,
    safetensors_files,
)

import mlx.core as mx

NO_CHECK_ENV = "BONSAI_NO_MEMORY_CHECK"
TEXT_TOKENS = 512  # PromptEncoder's max_sequence_length
FUSED_HEAD_DIMS = (64, 80, 128)  # MLX's fused GPU attention: no scores in memory
# Peak bytes of an untiled VAE pass / (pixels x widest full-resolution channels x itemsize)
VAE_SCRATCH = {"cpu": 22.5, "gpu": 6.0}
VAE_TILE = VAE.decode.__kwdefaults__["tile_size"]  # pixels a side of one decode tile


@dataclass(frozen=True)
class ModelSizes:
    """What an estimate needs from a model folder, read once."""

    transformer: Flux2TransformerConfig
    vae: VAEConfig
    weights: int  # transformer + VAE decoder, in the compute dtype
    text_encoder: int  # the text encoder layers the pipeline reads
    vae_encoder: int  # loaded only to encode input images


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes: resident `weights` plus the largest transient (text encoder while encoding,
    one transformer step, the VAE)."""

    weights: int
    text_encoder: int
    transformer_step: int
    vae: int
    tiled_vae: bool

    @property
    def total(self) -> int:
        return self.weights + max(self.text_encoder, self.transformer_step, self.vae)


def _tensor_bytes(folder: Path, itemsize: int, keep=lambda name: True) -> int:
    """Bytes of the tensors `keep` accepts once loaded: float ones in the compute dtype."""
    total = 0
    for f in safetensors_files(folder):
        for name, info in read_safetensors_header(f).items():
            if name == "__metadata__" or not keep(name):
                continue
            start, stop = info["data_offsets"]
            dtype = DTYPES.get(SAFETENSORS_DTYPE_NAMES.get(info["dtype"], ""))
            total += (stop - start) * itemsize // dtype.size if dtype else stop - start
    return total


def read_model_sizes(root: str | Path, dtype: str | mx.Dtype = "auto") -> ModelSizes:
    """Configs and weight bytes of a model folder (any layout), from headers only."""
    root = Path(root)
    dirs = LAYOUTS[detect_layout(root)]
    itemsize = parse_dtype(dtype).size
    transformer_dir, vae_dir = root / dirs["transformer"], root / "vae"
    config_file = transformer_dir / "config.json"
    transformer = Flux2TransformerConfig.from_dict(read_json(config_file), config_file)
    vae_config = vae_dir / "config.json"  # without one (BFL's ae.safetensors): Klein's VAE
    vae = (VAEConfig.from_dict(read_json(vae_config), vae_config) if vae_config.is_file()
           else VAEConfig())
    deepest = max(DEFAULT_OUT_LAYERS)
    layer = re.compile(r"(?:^|\.)layers\.(\d+)\.")

    def read_by_pipeline(name: str) -> bool:  # layers past the deepest read are never loaded
        m = layer.search(name)
        return not name.startswith("lm_head") and (m is None or int(m.group(1)) < deepest)

    def encoder_part(name: str) -> bool:
        return name.startswith(("encoder.", "quant_conv."))

    return ModelSizes(
        transformer=transformer,
        vae=vae,
        weights=_tensor_bytes(transformer_dir, itemsize)
        + _tensor_bytes(vae_dir, itemsize, lambda n: not encoder_part(n)),
        text_encoder=_tensor_bytes(root / dirs["text_encoder"], itemsize, read_by_pipeline),
        vae_encoder=_tensor_bytes(vae_dir, itemsize, encoder_part),
    )


def estimate_memory(
    sizes: ModelSizes,
    width: int,
    height: int,
    *,
    dtype: str | mx.Dtype = "auto",
    tiled_vae: bool | None = None,
    reference_sizes: tuple[tuple[int, int], ...] = (),
    gpu: bool | None = None,
) -> MemoryEstimate:
    """Peak memory of generating one `width` x `height` image with `sizes`' model.

    `reference_sizes`: (width, height) of each editing reference image as the pipeline
    encodes it (at most 1 MP); `gpu` defaults to MLX's default device.
    """
    itemsize = parse_dtype(dtype).size
    if gpu is None:
        gpu = mx.default_device().type == mx.DeviceType.gpu
    cfg, vae = sizes.transformer, sizes.vae
    tokens = (width // MULTIPLE) * (height // MULTIPLE) + TEXT_TOKENS + sum(
        (w // MULTIPLE) * (h // MULTIPLE) for w, h in reference_sizes)
    fused = gpu and cfg.attention_head_dim in FUSED_HEAD_DIMS
    scores = 0 if fused else cfg.num_attention_heads * tokens * tokens * itemsize
    activations = tokens * cfg.inner_dim * int(4 + 2 * cfg.mlp_ratio) * itemsize

    scratch = VAE_SCRATCH["gpu" if gpu else "cpu"]
    channels = vae.decoder_block_out_channels or vae.block_out_channels
    wide = max(channels[:2])  # the upsampled block feeding full resolution, or the last
    pixels = width * height
    tiled = pixels > AUTO_TILE_PIXELS if tiled_vae is None else bool(tiled_vae)
    tile = min(pixels, VAE_TILE * VAE_TILE)
    decode = (2 * pixels * wide * itemsize + int(tile * wide * itemsize * scratch) if tiled
              else int(pixels * wide * itemsize * scratch))
    encode = max((int(w * h * vae.block_out_channels[0] * itemsize * scratch)
                  for w, h in reference_sizes), default=0)
    if reference_sizes:
        encode += sizes.vae_encoder
    return MemoryEstimate(sizes.weights, sizes.text_encoder, scores + activations,
                          max(decode, encode), tiled)


def available_memory() -> int | None:
    """Bytes this process may still use: on a GPU what MLX reports for it (CUDA's free
    memory, Metal's recommended working set), elsewhere Linux's MemAvailable (and the
    cgroup limit); None when unknown."""
    if mx.default_device().type == mx.DeviceType.gpu:
        info = mx.device_info()
        for key in ("free_memory", "max_recommended_working_set_size", "memory_size"):
            if isinstance(info.get(key), int):
                return info[key] - (mx.get_active_memory() if key != "free_memory" else 0)
        return None
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    if m is None:
        return None
    available = int(m.group(1)) * 1024
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def largest_fitting_size(sizes: ModelSizes, width: int, height: int, available: int,
                         **kwargs) -> tuple[int, int] | None:
    """The largest size of about the same aspect ratio, in steps of 16 pixels on the longer
    side, whose estimate fits in `available` bytes; None if even 16 pixels do not."""
    longest = max(width, height)
    for side in range(longest - MULTIPLE, 0, -MULTIPLE):
        w = max(MULTIPLE, round(width * side / longest / MULTIPLE) * MULTIPLE)
        h = max(MULTIPLE, round(height * side / longest / MULTIPLE) * MULTIPLE)
        if estimate_memory(sizes, w, h, **kwargs).total <= available:
            return w, h
    return None


def check_memory(
    root: str | Path,
    width: int,
    height: int,
    *,
    dtype: str | mx.Dtype = "auto",
    tiled_vae: bool | None = None,
    reference_sizes: tuple[tuple[int, int], ...] = (),
    available: int | None = None,
) -> MemoryEstimate | None:
    """Raise a BonsaiError, naming the largest size that fits and suggesting tiled
    decoding, when the estimate exceeds `available` (default: `available_memory()`).
    Returns the estimate (None when the check is off or the memory unknown)."""
    if os.environ.get(NO_CHECK_ENV, "").strip() not in ("", "0"):
        return None
    available = available_memory() if available is None else available
    if available is None:
        return None
    sizes = read_model_sizes(root, dtype)
    kwargs = dict(dtype=dtype, reference_sizes=tuple(reference_sizes))
    estimate = estimate_memory(sizes, width, height, tiled_vae=tiled_vae, **kwargs)
    if estimate.total <= available:
        return estimate
    parts = (f"weights {_gb(estimate.weights)}, text encoder {_gb(estimate.text_encoder)}, "
             f"transformer step {_gb(estimate.transformer_step)}, VAE {_gb(estimate.vae)}")
    fit = largest_fitting_size(sizes, width, height, available, tiled_vae=tiled_vae, **kwargs)
    advice = (f"the largest size that fits is {fit[0]}x{fit[1]}" if fit
              else "not even the smallest size fits with this model and dtype")
    tiled = estimate_memory(sizes, width, height, tiled_vae=True, **kwargs)
    if tiled.total < estimate.total:  # one tile as large as the image saves nothing
        fits = "fits" if tiled.total <= available else "does not fit either"
        advice += (f"; decoding in tiles (--tile-vae, tiled_vae=True) needs about "
                   f"{_gb(tiled.total)}, which {fits}")
    raise BonsaiError(
        f"{width}x{height} needs about {_gb(estimate.total)} ({parts}) but about "
        f"{_gb(available)} is available: {advice} ({NO_CHECK_ENV}=1 skips this check)"
    )
