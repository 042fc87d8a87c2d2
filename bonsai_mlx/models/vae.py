"""The FLUX.2 autoencoder (diffusers' `AutoencoderKLFlux2`) in MLX, NHWC throughout.

The parameter tree uses diffusers' names (`decoder.up_blocks.0.resnets.1.conv2.weight`), so a
diffusers `vae/` folder loads after one change: convolution weights go from PyTorch's
(O, I, kH, kW) to MLX's (O, kH, kW, I). Black Forest Labs' `ae.safetensors` names are mapped
onto diffusers' in `sanitize`.

Text-to-image only decodes, so the encoder is read from disk the first time `encode` runs.

The layers are in `vae_layers.py`; decoding and encoding run them layer by layer, and above
AUTO_TILE_PIXELS tile by tile, in `vae_tiling.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from bonsai_mlx.checks import BaseConfig, flag, integer, number, shown
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models import vae_tiling
from bonsai_mlx.models.vae_layers import Decoder, Encoder, LatentBatchNorm
from bonsai_mlx.models.vae_tiling import callables, run_layers
from bonsai_mlx.weights import (
    check_weights,
    load_into,
    load_weights,
    parse_dtype,
    read_json,
    resolve_model_path,
    save_safetensors,
    write_json,
)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# Hub VAEs by short name (Pipeline.from_pretrained's vae=, the CLI's --vae).
VAE_ALIASES = {"small": "black-forest-labs/FLUX.2-small-decoder"}
SMALL_DECODER_CHANNELS = (96, 192, 384, 384)  # its decoder_block_out_channels (config.json)
# The files read from a Hub repo: a pipeline's vae/, or a VAE repo's top-level files.
HUB_FILES = ["vae/*", "config.json", "diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.safetensors.index.json"]
# Upper bounds on config.json's sizes, far above every FLUX.2 VAE (layers_per_block 2,
# channels up to 512, 4 blocks, 32 latent channels, 2x2 patches): a larger value is a broken
# or hostile config, refused before any layer is built.
MAX_LAYERS_PER_BLOCK = 16
MAX_CHANNELS = 8192  # every channel count and norm_num_groups
MAX_BLOCKS = 8  # entries of block_out_channels (the image is 2**(blocks - 1) latent pixels)
MAX_PATCH = 16
# Config fields that only the decoder uses: a decoder may differ from its encoder in these.
DECODER_ONLY_FIELDS = ("decoder_block_out_channels", "out_channels", "use_post_quant_conv")

# Above this many output pixels, decode/encode tile by default (2048x2048 tiles, 1024x1024
# does not). Tiles cut the peak memory of the full-resolution layers to about two whole
# activations of one layer plus one tile's temporaries (see `vae_tiling.py`).
AUTO_TILE_PIXELS = 1536 * 1536


@dataclass
class VAEConfig(BaseConfig):
    """diffusers' `AutoencoderKLFlux2` config.json (unknown keys are ignored)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = field(default=(2, 2))

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels",
                     "norm_num_groups"):
            high = MAX_LAYERS_PER_BLOCK if name == "layers_per_block" else MAX_CHANNELS
            setattr(self, name, integer(getattr(self, name), name, low=1, high=high))
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            setattr(self, name, flag(getattr(self, name), name))
        self.batch_norm_eps = number(self.batch_norm_eps, "batch_norm_eps", positive=True)
        for name in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            value = getattr(self, name)
            if value is None and name == "decoder_block_out_channels":
                continue
            if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_BLOCKS:
                raise BonsaiError(f"{name} must be a non-empty list of at most {MAX_BLOCKS} "
                                  f"integers, not {shown(value)}")
            high = MAX_PATCH if name == "patch_size" else MAX_CHANNELS
            setattr(self, name, tuple(integer(v, name, low=1, high=high) for v in value))
        if len(self.patch_size) != 2:
            raise BonsaiError(f"patch_size must be two integers, not {list(self.patch_size)}")
        for name in ("block_out_channels", "decoder_block_out_channels"):
            odd = [c for c in getattr(self, name) or () if c % self.norm_num_groups]
            if odd:  # every GroupNorm splits its channels into norm_num_groups groups
                raise BonsaiError(f"{name} {odd[0]} does not split into norm_num_groups "
                                  f"{self.norm_num_groups}")

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for FLUX.2)."""
        return 2 ** (len(self.block_out_channels) - 1)


ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # what only `encode` needs
WEIGHT_STEMS = ("diffusion_pytorch_model", "ae")  # diffusers' and Black Forest Labs' files


def _encoder_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    return {f"{name}.{k}": v.shape for name, module in _encoder_modules(cfg).items()
            for k, v in tree_flatten(module.parameters())}


def _encoder_modules(cfg: VAEConfig) -> dict[str, nn.Module]:
    """What `encode` adds to a VAE, by attribute name: the encoder and its quant_conv."""
    modules = {"encoder": Encoder(cfg)}
    if cfg.use_quant_conv:
        n = 2 * cfg.latent_channels
        modules["quant_conv"] = nn.Conv2d(n, n, 1)
    return modules


class VAE(nn.Module):
    """FLUX.2 autoencoder: `decode`, `encode`, `normalize_latents`, `denormalize_latents`.

    Holds the decoder, `post_quant_conv` and the latent BatchNorm statistics; the encoder
    and `quant_conv` are read from the weight files on the first `encode` (see
    `encoder_loaded`).
    """

    def __init__(self, config: VAEConfig, dtype: str | mx.Dtype = mx.float32):
        super().__init__()
        self.config = config
        self.dtype = parse_dtype(dtype)
        self.decoder = Decoder(config)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.bn = LatentBatchNorm(math.prod(config.patch_size) * config.latent_channels)
        self.set_dtype(self.dtype)
        self.bn.set_dtype(mx.float32)  # the latent statistics stay float32
        self.source: Path | None = None  # the checkpoint the encoder is read from
        self.decoder_source: Path | None = None  # the checkpoint the decoder was read from

    @property
    def scale_factor(self) -> int:
        return self.config.scale_factor

    @property
    def encoder_loaded(self) -> bool:
        return "encoder" in self

    # ---- loading --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | mx.Dtype = "bfloat16", *,
                        encoder: str | Path | None = None) -> VAE:
        """Load a diffusers `vae/` folder or a Black Forest Labs `ae.safetensors` file.

        `path` is a folder (diffusers `config.json` + safetensors, a folder holding
        `ae.safetensors`, or a pipeline folder / Hub repo id with a `vae/` subfolder), a
        single `.safetensors` file or an alias (`small`: FLUX.2's small decoder). Without a
        config.json the config is inferred from tensor shapes (GroupNorm groups: 32, as in
        FLUX.2). Only the decoder is read now; the encoder's tensors are checked, and read
        by the first `encode`.

        `encoder`: encode images with that VAE's encoder instead (the same kinds of path):
        a swapped decoder, such as the small one, keeps the pipeline's encoder. The two
        configs must agree on everything but the decoder's channels.
        """
        path = _checkpoint_path(path)
        weights = _read_weights(path)
        vae = cls(_read_config(path, weights), dtype)
        own_encoder = {k: v for k, v in weights.items() if k.startswith(ENCODER_PREFIXES)}
        if encoder is not None:
            vae._use_encoder_of(encoder)
        elif own_encoder:
            check_weights(own_encoder, _encoder_shapes(vae.config), path)
            vae.source = path
        # mx.load is lazy: the encoder's tensors are never read from disk here
        load_into(vae, {k: v for k, v in weights.items() if k not in own_encoder}, path)
        vae.decoder_source = path
        return vae

    def _use_encoder_of(self, path: str | Path) -> None:
        """Encode with the encoder (and quant_conv) of the VAE at `path`."""
        source = _checkpoint_path(path)
        weights = _read_weights(source)
        config = _read_config(source, weights)
        mismatch = [f"{f.name} {getattr(config, f.name)} vs {getattr(self.config, f.name)}"
                    for f in fields(VAEConfig) if f.name not in DECODER_ONLY_FIELDS
                    and getattr(config, f.name) != getattr(self.config, f.name)]
        if mismatch:
            raise BonsaiError(
                f"the VAE decoder does not fit the encoder of {source} ({'; '.join(mismatch)}); "
                "use a decoder made for this model's VAE")
        encoder = {k: v for k, v in weights.items() if k.startswith(ENCODER_PREFIXES)}
        if encoder:  # else that VAE cannot encode either
            check_weights(encoder, _encoder_shapes(config), source)
            self.source = source

    def load_encoder(self) -> None:
        """Read the encoder and `quant_conv` from the weight files (done by `encode`)."""
        if self.encoder_loaded:
            return
        if self.source is None:
            raise BonsaiError(
                "this VAE was loaded without encoder weights, so it cannot encode images; "
                "load a checkpoint that includes the encoder"
            )
        weights = _read_weights(self.source)
        for name, module in _encoder_modules(self.config).items():
            module.set_dtype(self.dtype)
            prefix = f"{name}."
            load_into(module, {k.removeprefix(prefix): v for k, v in weights.items()
                               if k.startswith(prefix)}, self.source)
            setattr(self, name, module)

    def unload_encoder(self) -> None:
        """Drop the encoder's weights (the next `encode` reads them again)."""
        for name in ("encoder", "quant_conv"):
            if name in self:
                del self[name]

    # ---- latents --------------------------------------------------------------------

    def normalize_latents(self, z: mx.array) -> mx.array:
        """(B, h, w, C) latents -> patchify 2x2 + BatchNorm -> (B, h/2, w/2, 4C).

        Channel index c*4 + py*2 + px, as diffusers' `_patchify_latents`.
        """
        B, h, w, C = z.shape
        py, px = self.config.patch_size
        if h % py or w % px:
            raise BonsaiError(f"latent size {h}x{w} is not a multiple of the patch {py}x{px}")
        p = z.reshape(B, h // py, py, w // px, px, C).transpose(0, 1, 3, 5, 2, 4)
        p = p.reshape(B, h // py, w // px, C * py * px).astype(mx.float32)
        std = mx.sqrt(self.bn.running_var + self.config.batch_norm_eps)
        return ((p - self.bn.running_mean) / std).astype(z.dtype)

    def denormalize_latents(self, p: mx.array) -> mx.array:
        """The inverse of `normalize_latents`: (B, h, w, 4C) -> (B, 2h, 2w, C)."""
        B, h, w, n = p.shape
        py, px = self.config.patch_size
        std = mx.sqrt(self.bn.running_var + self.config.batch_norm_eps)
        z = (p.astype(mx.float32) * std + self.bn.running_mean).astype(p.dtype)
        z = z.reshape(B, h, w, n // (py * px), py, px).transpose(0, 1, 4, 2, 5, 3)
        return z.reshape(B, h * py, w * px, n // (py * px))

    # ---- decode / encode ------------------------------------------------------------

    def decode(
        self, z: mx.array, *, tiled: bool | None = None, tile_size: int = 1024,
        tile_stats: str = "exact",
    ) -> mx.array:
        """(B, h, w, latent_channels) un-normalised latents -> (B, h*f, w*f, 3), f = 8.

        Output is about [-1, 1] (not clamped, as diffusers). `tiled=None` tiles above
        AUTO_TILE_PIXELS output pixels; `tile_size` is in image pixels; see `decode_tiled`.
        """
        self._check_input(z, self.config.latent_channels, "latents", 1)
        f = self.scale_factor
        if tiled is None:
            tiled = z.shape[1] * z.shape[2] * f * f > AUTO_TILE_PIXELS
        if tiled:
            return self.decode_tiled(z, tile_size=tile_size, tile_stats=tile_stats)
        decoder = self.decoder
        layers = [*decoder.latent_layers(), *callables(decoder.upsampling_layers())]
        return run_layers(layers, self.post_quant(z))

    def encode(
        self, x: mx.array, *, tiled: bool | None = None, tile_size: int = 1024,
        tile_stats: str = "exact",
    ) -> mx.array:
        """(B, H, W, 3) image in [-1, 1] -> mean latent (B, H/f, W/f, latent_channels).

        Loads the encoder on first use. Tiling as in `decode`.
        """
        f = self.scale_factor
        self._check_input(x, self.config.in_channels, "image", f)
        self.load_encoder()
        if tiled is None:
            tiled = x.shape[1] * x.shape[2] > AUTO_TILE_PIXELS
        if tiled:
            return self.encode_tiled(x, tile_size=tile_size, tile_stats=tile_stats)
        encoder = self.encoder
        layers = [*callables(encoder.downsampling_layers()), *encoder.latent_layers()]
        return self.moments_to_mean(run_layers(layers, x.astype(self.dtype)))

    def post_quant(self, z: mx.array) -> mx.array:
        """Latents in the compute dtype, through `post_quant_conv` when there is one."""
        z = z.astype(self.dtype)
        return self.post_quant_conv(z) if "post_quant_conv" in self else z

    def moments_to_mean(self, h: mx.array) -> mx.array:
        """The encoder's moments (through `quant_conv`) -> the mean latent."""
        if "quant_conv" in self:
            h = self.quant_conv(h)
        return h[..., : self.config.latent_channels]  # the rest is log-variance

    def decode_tiled(self, z: mx.array, *, tile_size: int = 1024,
                     tile_stats: str = "exact") -> mx.array:
        """`decode` with the full-resolution part of the decoder run tile by tile.

        Everything at latent resolution (conv_in, mid-block attention over the whole image,
        the first up block's resnets) runs untiled; it is small. The up blocks and conv_out
        run on tiles of about `tile_size` image pixels that partition the image, each with
        the neighbouring context its convolutions read (so there are no seams and nothing
        to blend). Every GroupNorm in the tiled part uses one set of statistics for the
        whole image:
        - `tile_stats="exact"` (default): the tiles advance layer by layer and each norm's
          statistics are summed over all tiles first; equal to `decode(z, tiled=False)` up
          to float rounding. Peak memory: two whole activations of one layer plus a tile's
          temporaries (an upsampled activation is never whole). About 2x the time.
        - `tile_stats="estimate"`: statistics of an untiled decode of the latent
          average-pooled to at most 64 latent pixels (or one tile) a side, then one tiled
          pass (as pkuliyi2015's Tiled VAE): lowest memory (about one tile), approximate.
        """
        self._check_input(z, self.config.latent_channels, "latents", 1)
        return vae_tiling.decode_tiled(self, z, tile_size=tile_size, tile_stats=tile_stats)

    def encode_tiled(self, x: mx.array, *, tile_size: int = 1024,
                     tile_stats: str = "exact") -> mx.array:
        """`encode` with the encoder's full-resolution part run tile by tile.

        As `decode_tiled`, mirrored: conv_in and the down blocks run on tiles with their
        context and shared GroupNorm statistics (`tile_stats` as there; "estimate" pools
        the image to at most 512 pixels a side); the latent-resolution rest (last down
        block, mid block, conv_out) runs untiled.
        """
        self._check_input(x, self.config.in_channels, "image", self.scale_factor)
        self.load_encoder()
        return vae_tiling.encode_tiled(self, x, tile_size=tile_size, tile_stats=tile_stats)

    @staticmethod
    def _check_input(x: mx.array, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise BonsaiError(
                f"{what} should be NHWC (B, H, W, {channels}), got shape {tuple(x.shape)}"
            )
        if x.shape[1] % multiple or x.shape[2] % multiple:
            raise BonsaiError(
                f"{what} size {x.shape[1]}x{x.shape[2]} must be a multiple of {multiple}"
            )


# ---- saving a swapped decoder --------------------------------------------------------


def save_vae_with_decoder(
    folder: Path, decoder_from: str | Path, encoder_from: str | Path,
    dtype: mx.Dtype | None = None,
) -> None:
    """Write one diffusers `vae/` folder from the decoder side (decoder, post_quant_conv,
    latent statistics, config) of `decoder_from` and the encoder and quant_conv of
    `encoder_from`, as `VAE.from_pretrained(decoder_from, encoder=encoder_from)` combines
    them: diffusers names, PyTorch's (O, I, kH, kW) convolutions, float tensors in `dtype`
    (None: as stored). Each file is written atomically."""
    dec_source, enc_source = _checkpoint_path(decoder_from), _checkpoint_path(encoder_from)
    tensors = {k: v for k, v in _read_weights(dec_source).items()
               if not k.startswith(ENCODER_PREFIXES)}
    tensors.update({k: v for k, v in _read_weights(enc_source).items()
                    if k.startswith(ENCODER_PREFIXES)})

    def stored(v: mx.array) -> mx.array:
        v = v.transpose(0, 3, 1, 2) if v.ndim == 4 else v  # undo sanitize's MLX layout
        return v.astype(dtype) if dtype is not None and mx.issubdtype(v.dtype, mx.floating) else v

    tensors = {k: stored(v) for k, v in tensors.items()}
    tensors["bn.num_batches_tracked"] = mx.array(0, dtype=mx.int64)  # diffusers' buffer
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors,
                     metadata={"format": "pt"})
    config_file = dec_source / "config.json"
    if dec_source.is_dir() and config_file.is_file():
        config = read_json(config_file)
    else:
        config = {"_class_name": "AutoencoderKLFlux2",
                  **asdict(_read_config(dec_source, _read_weights(dec_source)))}
    write_json(folder / "config.json", config)


# ---- weight names -------------------------------------------------------------------


_BFL_PREFIXES = ("first_stage_model.", "vae.", "ae.")


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Checkpoint names -> this module's names; conv weights -> MLX (O, kH, kW, I).

    Accepts diffusers names unchanged and Black Forest Labs' names (`encoder.down.0.block.1`,
    `nin_shortcut`, `mid.block_1`, `mid.attn_1.q` 1x1 convs, `decoder.up.3` = first up block,
    `norm_out`, `encoder.quant_conv`, `decoder.post_quant_conv`).
    """
    weights = {k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}
    for prefix in _BFL_PREFIXES:
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix):]: v for k, v in weights.items()}
    if any(re.match(r"(encoder\.down|decoder\.up|(en|de)coder\.mid)\.", k) for k in weights):
        weights = _bfl_to_diffusers(weights)
    return {k: v.transpose(0, 2, 3, 1) if v.ndim == 4 else v for k, v in weights.items()}


def _bfl_to_diffusers(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    ups = [int(m.group(1)) for k in weights if (m := re.match(r"decoder\.up\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    out = {}
    for k, v in weights.items():
        new = k
        if m := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)", k):
            new = f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down\.(\d+)\.downsample\.(.*)", k):
            new = f"encoder.down_blocks.{m[1]}.downsamplers.0.{m[2]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)", k):
            new = f"decoder.up_blocks.{n_up - 1 - int(m[1])}.resnets.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.upsample\.(.*)", k):
            new = f"decoder.up_blocks.{n_up - 1 - int(m[1])}.upsamplers.0.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid\.block_(\d)\.(.*)", k):
            new = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(.*)", k):
            new = f"{m[1]}.mid_block.attentions.0.{attn[m[2]]}.{m[3]}"
            if v.ndim == 4:  # 1x1 conv -> linear
                v = v[:, :, 0, 0]
        elif m := re.match(r"(encoder|decoder)\.norm_out\.(.*)", k):
            new = f"{m[1]}.conv_norm_out.{m[2]}"
        elif m := re.match(r"(?:encoder\.)?(quant_conv\..*)", k):
            new = m[1]
        elif m := re.match(r"(?:decoder\.)?(post_quant_conv\..*)", k):
            new = m[1]
        out[new.replace("nin_shortcut", "conv_shortcut")] = v
    return out


def _checkpoint_path(path: str | Path) -> Path:
    """A local file or folder as is (a pipeline folder stands for its `vae/`); anything else
    is an alias or a Hub repo id, whose `vae/` (or, for a VAE repo, its top-level files) is
    downloaded."""
    path = VAE_ALIASES.get(str(path), path)
    local = Path(path).expanduser()
    path = local if local.exists() else resolve_model_path(path, allow_patterns=HUB_FILES)
    if path.is_dir() and (path / "vae").is_dir() and not any(path.glob("*.safetensors")):
        path = path / "vae"  # a whole pipeline folder or Hub repo
    return path


def _read_weights(path: Path) -> dict[str, mx.array]:
    return sanitize(load_weights(path, WEIGHT_STEMS))


def _read_config(path: Path, weights: dict[str, mx.array]) -> VAEConfig:
    """The folder's config.json, else inferred from the tensor shapes."""
    config_file = path / "config.json"
    if path.is_dir() and config_file.is_file():
        return VAEConfig.from_dict(read_json(config_file), str(config_file))
    return infer_config(weights, path)


def infer_config(weights: dict[str, mx.array], source: str | Path) -> VAEConfig:
    """A config from (sanitized) tensor shapes, for checkpoints without config.json."""

    def count(pattern: str) -> int:
        return len({m[1] for k in weights if (m := re.match(pattern, k))})

    try:
        n_up = count(r"decoder\.up_blocks\.(\d+)\.")
        dec = [weights[f"decoder.up_blocks.{i}.resnets.0.conv1.weight"].shape[0]
               for i in range(n_up)][::-1]
        n_down = count(r"encoder\.down_blocks\.(\d+)\.")
        enc = [weights[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
               for i in range(n_down)]
        latent = weights["decoder.conv_in.weight"].shape[-1]
        out_ch = weights["decoder.conv_out.weight"].shape[0]
        in_ch = weights["encoder.conv_in.weight"].shape[-1] if enc else 3
        layers = count(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.") - 1
        bn = weights["bn.running_mean"].shape[0]
    except KeyError as e:
        raise BonsaiError(
            f"{source}: cannot infer the VAE config, tensor {e} is missing; "
            "is this a FLUX.2 VAE checkpoint?"
        ) from None
    if n_up == 0 or bn % latent or bn // latent != 4:
        raise BonsaiError(f"{source} does not look like a FLUX.2 VAE (32-channel, 2x2 patches)")
    try:
        return VAEConfig(
            in_channels=in_ch,
            out_channels=out_ch,
            block_out_channels=tuple(enc or dec),
            decoder_block_out_channels=tuple(dec) if enc and dec != enc else None,
            layers_per_block=layers,
            latent_channels=latent,
            use_quant_conv="quant_conv.weight" in weights,
            use_post_quant_conv="post_quant_conv.weight" in weights,
            mid_block_add_attention="decoder.mid_block.attentions.0.to_q.weight" in weights,
        )
    except BonsaiError as e:  # e.g. a small VAE whose channels do not split into 32 groups
        raise BonsaiError(f"{source} has no config.json and the config inferred from its "
                          f"weights does not fit them ({e}); add the VAE's config.json") from None
