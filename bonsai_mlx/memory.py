"""Whether a generation fits in memory, estimated before any model is loaded.

From the model folder's config.json files and safetensors headers only:

- weights: the transformer and the VAE decoder (resident throughout), float tensors counted
  in the compute dtype; the text encoder's layers the pipeline reads (resident while the
  prompt is encoded, released afterwards);
- one transformer step: the attention scores (heads x tokens^2, materialised by MLX's CPU
  attention; the fused GPU kernel for head sizes 64, 80 and 128 keeps none) and the
  block activations (tokens x inner dim x (4 + 2 x mlp_ratio));
- the VAE decode: untiled, pixels x the widest full-resolution channels x a scratch factor
  (the CPU's measured: Klein's VAE took 6.04 GB at 512x512 in float32, benchmarks/RESULTS.md;
  the GPU's read from MLX's Metal convolutions, not measured); tiled, two whole
  full-resolution activations plus the largest tile's scratch (measured on the CPU too).
  Encoding input images is counted the same way.

How the VAE runs is decided in one place, `choose_vae_tile`: untiled when that fits, else
in the largest tiles that fit. The pipeline asks it when it decodes or encodes, with the
memory available then; `check_memory` asks it before loading, with what the weights leave.
So tiling, which gives the same image, lets a small machine run what fits in any way.

The peak is the resident weights plus the largest of the three transients. `check_memory`
compares it with the memory available (Linux: MemAvailable and the cgroup limit; a GPU:
what MLX reports) and fails with the largest size that fits (`memory_shortfall` words it;
`bonsai-mlx serve` checks every request with it); BONSAI_NO_MEMORY_CHECK=1 skips the check.
An estimate, not a measurement: it is meant to refuse requests that cannot fit, before
minutes of loading, not to predict the peak to the byte.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx import _malloc
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import MULTIPLE
from bonsai_mlx.layout import LAYOUTS, detect_layout
from bonsai_mlx.models.text_encoder import DEFAULT_OUT_LAYERS
from bonsai_mlx.models.transformer import Flux2TransformerConfig
from bonsai_mlx.models.vae import AUTO_TILE_PIXELS, VAE, VAEConfig
from bonsai_mlx.models.vae_tiling import MIN_TILE_SIZE, TILE_MULTIPLE, largest_tile
from bonsai_mlx.request import GenerationRequest
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
# Peak bytes of a VAE layer pass / (pixels x its input channels x itemsize), the widest
# full-resolution layer's in an untiled pass, one tile's (with TILE_CONTEXT) in a tiled one.
# CPU: measured (benchmarks/RESULTS.md). GPU: not measured; read from MLX's Metal 3x3
# convolution (Winograd: the upsampled input, a padded copy, 64/36 x input and output
# transforms, the output: ~6.8 x for the last upsampler's).
VAE_SCRATCH = {"cpu": 22.5, "gpu": 7.0}
TILE_CONTEXT = 4  # pixels each side of a full-resolution tile reads from its neighbours
VAE_TILE = VAE.decode.__kwdefaults__["tile_size"]  # pixels a side of one decode tile


@dataclass(frozen=True)
class ModelSizes:
    """What an estimate needs from a model folder, read once."""

    transformer: Flux2TransformerConfig
    vae: VAEConfig
    weights: int  # transformer + VAE decoder, in the compute dtype
    text_encoder: int  # the text encoder layers the pipeline reads
    vae_encoder: int  # loaded only to encode input images

    def text_encoder_kept(self) -> ModelSizes:
        """These sizes when the text encoder stays loaded between prompts (`--no-offload`,
        `keep_text_encoder=True`): resident with the weights, no longer a transient."""
        return dataclasses.replace(self, weights=self.weights + self.text_encoder,
                                   text_encoder=0)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes: resident `weights` plus the largest transient (text encoder while encoding,
    one transformer step, the VAE)."""

    weights: int
    text_encoder: int
    transformer_step: int
    vae: int
    vae_tile_size: int | None  # how the image is decoded: None untiled, else in tiles

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


def vae_bytes(vae: VAEConfig, width: int, height: int, itemsize: int, *,
              tile_size: int | None, gpu: bool, encode: bool = False) -> int:
    """Peak bytes, above the weights, of decoding (`encode`: encoding) one `width` x `height`
    image: untiled (`tile_size` None), the widest full-resolution layer's scratch; in tiles
    of about `tile_size` pixels ("exact" statistics), two whole full-resolution activations
    plus the largest tile's scratch, or the untiled latent-resolution layers' if larger."""
    scratch = VAE_SCRATCH["gpu" if gpu else "cpu"]
    channels = vae.block_out_channels if encode else (
        vae.decoder_block_out_channels or vae.block_out_channels)
    # the widest input of a full-resolution layer: the decoder's last upsampler's channels
    wide = channels[0] if encode else max(channels[:2])
    pixels = width * height
    if tile_size is None:
        return int(pixels * wide * itemsize * scratch)
    th, tw = largest_tile(height, width, tile_size, vae.scale_factor)
    tile = (th + 2 * TILE_CONTEXT) * (tw + 2 * TILE_CONTEXT)
    latent = pixels // vae.scale_factor**2 * channels[-1] * scratch
    return int(max(latent, 2 * pixels * channels[0] + tile * wide * scratch) * itemsize)


def choose_vae_tile(vae: VAEConfig, width: int, height: int, *, dtype: str | mx.Dtype,
                    budget: int | None, tiled: bool | None = None,
                    tile_size: int | None = None, encode: bool = False,
                    gpu: bool | None = None) -> int | None:
    """How the VAE runs on a `width` x `height` image: None untiled, else the tile size.

    `tiled` False or a `tile_size` decide. Otherwise: untiled when its estimate fits in
    `budget` bytes (unless `tiled`), else the largest tile whose estimate fits, else the
    smallest tile. `budget` None (memory unknown): tiles of VAE_TILE when `tiled` or above
    AUTO_TILE_PIXELS, as `VAE.decode` chooses. `pipeline` and `check_memory` both decide
    here.
    """
    if tiled is False or tile_size is not None:
        return tile_size
    if budget is None:
        return VAE_TILE if tiled or width * height > AUTO_TILE_PIXELS else None
    gpu = _on_gpu() if gpu is None else gpu
    itemsize = parse_dtype(dtype).size

    def fits(tile: int | None) -> bool:
        return vae_bytes(vae, width, height, itemsize, tile_size=tile, gpu=gpu,
                         encode=encode) <= budget

    if not tiled and fits(None):
        return None
    tiles = tile_sizes(width, height)
    return next((t for t in tiles if fits(t)), tiles[-1])


def vae_tile_now(vae: VAE, request: GenerationRequest, width: int, height: int,
                 encode: bool = False) -> int | None:
    """`choose_vae_tile` for a loaded `vae` running a width x height image of `request`
    with the memory available now (the pipeline asks before each decode and encode)."""
    return choose_vae_tile(vae.config, width, height, dtype=vae.dtype,
                           budget=available_memory(), tiled=request.tiled_vae,
                           tile_size=request.vae_tile_size, encode=encode)


def tile_sizes(width: int, height: int) -> list[int]:
    """Tile sizes that split the image, largest first: for 2, 3, ... tiles along its longer
    side the smallest tile side that makes them, down to MIN_TILE_SIZE; the whole image as
    one tile when it is too small to split."""
    latent = -(-max(width, height) // TILE_MULTIPLE)
    sizes = [-(-latent // n) * TILE_MULTIPLE for n in range(2, latent + 1)]
    return list(dict.fromkeys(t for t in sizes if t >= MIN_TILE_SIZE)) or [
        latent * TILE_MULTIPLE]


def _on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def estimate_memory(
    sizes: ModelSizes,
    width: int,
    height: int,
    *,
    dtype: str | mx.Dtype = "auto",
    tiled_vae: bool | None = None,
    vae_tile_size: int | None = None,
    reference_sizes: tuple[tuple[int, int], ...] = (),
    gpu: bool | None = None,
    available: int | None = None,
) -> MemoryEstimate:
    """Peak memory of generating one `width` x `height` image with `sizes`' model.

    `reference_sizes`: (width, height) of each editing reference image as the pipeline
    encodes it (at most 1 MP); `gpu` defaults to MLX's default device. The VAE runs as
    `choose_vae_tile` decides with what `available` bytes leave beside the weights.
    """
    itemsize = parse_dtype(dtype).size
    gpu = _on_gpu() if gpu is None else gpu
    cfg = sizes.transformer
    tokens = (width // MULTIPLE) * (height // MULTIPLE) + TEXT_TOKENS + sum(
        (w // MULTIPLE) * (h // MULTIPLE) for w, h in reference_sizes)
    fused = gpu and cfg.attention_head_dim in FUSED_HEAD_DIMS
    scores = 0 if fused else cfg.num_attention_heads * tokens * tokens * itemsize
    activations = tokens * cfg.inner_dim * int(4 + 2 * cfg.mlp_ratio) * itemsize

    budget = None if available is None else available - sizes.weights
    plan = dict(dtype=dtype, tiled=tiled_vae, tile_size=vae_tile_size, gpu=gpu)
    tile = choose_vae_tile(sizes.vae, width, height, budget=budget, **plan)
    decode = vae_bytes(sizes.vae, width, height, itemsize, tile_size=tile, gpu=gpu)
    if budget is not None:  # the encoder is loaded while it encodes
        budget -= sizes.vae_encoder
    encode = max((vae_bytes(sizes.vae, w, h, itemsize, gpu=gpu, encode=True,
                            tile_size=choose_vae_tile(sizes.vae, w, h, budget=budget,
                                                      encode=True, **plan))
                  for w, h in reference_sizes), default=0)
    if reference_sizes:
        encode += sizes.vae_encoder
    return MemoryEstimate(sizes.weights, sizes.text_encoder, scores + activations,
                          max(decode, encode), tile)


def available_memory(include_own: bool = False) -> int | None:
    """Bytes this process may still use: on a GPU what MLX reports for it (CUDA's free
    memory, Metal's recommended working set), elsewhere Linux's MemAvailable (and the
    cgroup limit); None when unknown. Memory the process freed but keeps for reuse (MLX's
    buffer cache; on Linux what glibc keeps, `_malloc.free_bytes`) counts as available:
    the next arrays take it first. `include_own`: count MLX's live arrays too: a server
    that keeps the model loaded reuses that memory, and its estimate counts the weights
    again."""
    own = mx.get_active_memory() if include_own else 0
    if mx.default_device().type == mx.DeviceType.gpu:
        info = mx.device_info()
        if isinstance(info.get("free_memory"), int):  # CUDA: the device's, ours excluded
            return info["free_memory"] + mx.get_cache_memory() + own
        for key in ("max_recommended_working_set_size", "memory_size"):  # Metal
            if isinstance(info.get(key), int):  # a budget for the process: ours is in it
                return info[key] - (0 if include_own else mx.get_active_memory())
        return None
    available = _linux_available()
    if available is None:
        return None
    return available + mx.get_cache_memory() + _malloc.free_bytes() + own


def _linux_available(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """MemAvailable, or less under a container's memory limit (cgroup v2): the limit less
    what the container uses, its page cache not counted (the kernel drops clean pages of
    files read, such as the model's, before it would kill)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    if m is None:
        return None
    available = int(m.group(1)) * 1024
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            stat = (cgroup / "memory.stat").read_text()
            m = re.search(r"^inactive_file (\d+)$", stat, re.MULTILINE)
            used -= int(m.group(1)) if m else 0
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def largest_fitting_size(sizes: ModelSizes, width: int, height: int, available: int,
                         **kwargs) -> tuple[int, int] | None:
    """The largest size of about the same aspect ratio, in steps of 16 pixels on the longer
    side, whose estimate fits in `available` bytes (`estimate_memory`'s `kwargs`); None if
    even 16 pixels do not."""
    longest = max(width, height)
    for side in range(longest - MULTIPLE, 0, -MULTIPLE):
        w = max(MULTIPLE, round(width * side / longest / MULTIPLE) * MULTIPLE)
        h = max(MULTIPLE, round(height * side / longest / MULTIPLE) * MULTIPLE)
        if estimate_memory(sizes, w, h, available=available, **kwargs).total <= available:
            return w, h
    return None


def memory_shortfall(sizes: ModelSizes, width: int, height: int, available: int, *,
                     dtype: str | mx.Dtype = "auto", tiled_vae: bool | None = None,
                     vae_tile_size: int | None = None,
                     reference_sizes: tuple[tuple[int, int], ...] = ()) -> str | None:
    """None when generating `width` x `height` fits in `available` bytes; otherwise what it
    needs, part by part, and the largest size of about the same shape that fits (and what
    letting `choose_vae_tile` pick the tiling would need, when tiling was forced)."""
    kwargs = dict(dtype=dtype, reference_sizes=tuple(reference_sizes))
    forced = dict(tiled_vae=tiled_vae, vae_tile_size=vae_tile_size)
    estimate = estimate_memory(sizes, width, height, available=available, **forced, **kwargs)
    if estimate.total <= available:
        return None
    fit = largest_fitting_size(sizes, width, height, available, **forced, **kwargs)
    advice = (f"the largest size that fits is {fit[0]}x{fit[1]}" if fit
              else "not even the smallest size fits with this model and dtype")
    auto = estimate_memory(sizes, width, height, available=available, **kwargs)
    if auto.total < estimate.total:
        how = ("decoding in tiles (--tile-vae, tiled_vae=True)" if tiled_vae is False
               else "choosing the tile size automatically (no --vae-tile-size)")
        fits = "fits" if auto.total <= available else "does not fit either"
        advice += f"; {how} needs about {_gb(auto.total)}, which {fits}"
    return (f"{width}x{height} needs about {_gb(estimate.total)} ({_parts(estimate)}) but "
            f"about {_gb(available)} is available: {advice}")


def check_memory(
    root: str | Path,
    width: int,
    height: int,
    *,
    dtype: str | mx.Dtype = "auto",
    tiled_vae: bool | None = None,
    vae_tile_size: int | None = None,
    reference_sizes: tuple[tuple[int, int], ...] = (),
    available: int | None = None,
    keep_text_encoder: bool = False,
) -> MemoryEstimate | None:
    """Raise a BonsaiError, naming the largest size that fits, when the estimate exceeds
    `available` (default: `available_memory()`); the VAE tiled as `choose_vae_tile` picks,
    so unless tiling is forced off only a request that fits in no tiling is refused.
    `keep_text_encoder`: it stays loaded (see `ModelSizes.text_encoder_kept`). Returns the
    estimate (None when the check is off or the memory unknown)."""
    if memory_check_disabled():
        return None
    available = available_memory() if available is None else available
    if available is None:
        return None
    sizes = read_model_sizes(root, dtype)
    if keep_text_encoder:
        sizes = sizes.text_encoder_kept()
    options = dict(dtype=dtype, tiled_vae=tiled_vae, vae_tile_size=vae_tile_size,
                   reference_sizes=tuple(reference_sizes))
    estimate = estimate_memory(sizes, width, height, available=available, **options)
    if estimate.total <= available:
        return estimate
    problem = memory_shortfall(sizes, width, height, available, **options)
    raise BonsaiError(f"{problem} ({NO_CHECK_ENV}=1 skips this check)")


def memory_check_disabled() -> bool:
    """BONSAI_NO_MEMORY_CHECK=1: the way around an estimate that is wrong for a machine."""
    return os.environ.get(NO_CHECK_ENV, "").strip() not in ("", "0")


def _parts(estimate: MemoryEstimate) -> str:
    tiles = (f"in tiles of {estimate.vae_tile_size} px" if estimate.vae_tile_size
             else "untiled")
    return (f"weights {_gb(estimate.weights)}, text encoder {_gb(estimate.text_encoder)}, "
            f"transformer step {_gb(estimate.transformer_step)}, VAE {_gb(estimate.vae)} "
            f"{tiles}")
