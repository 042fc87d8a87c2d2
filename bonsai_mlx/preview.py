"""Live previews: a cheap RGB picture of FLUX.2 latents while they are being denoised.

A preview is an affine map from each latent pixel's channels to RGB: the normalised,
patchified latents (B, 128, h, w) of the pipeline are un-normalised and unpatchified to
(B, 2h, 2w, 32), and each of those latent pixels, which the VAE decodes into an 8x8 block
of the image, becomes one RGB pixel. The map is fitted once per VAE by least squares
against that VAE's own decoder (`fit_matrix`): random smooth latent fields are decoded and
the decoded images, averaged over 8x8 blocks, are the targets. The result, 33 x 3 numbers,
is cached on disk keyed by a hash of the decoder's weights (`decoder_fingerprint`), so each
VAE is fitted once per machine.

Why this and not decoding a smaller latent: with the full-size FLUX.2 VAE (random weights,
float32, this project's shared 2-core CPU under load) a 1024x1024 preview costs 10 ms, the
fingerprint 0.23 s, and the one-time fit 80 s (6 decodes of 128x128); decoding the latent
pooled 4x (a 256x256 picture) costs 26-35 s at every step (benchmarks/RESULTS.md), about
3000 times more, and still differs from the full decode. On an Apple GPU the fit takes a
fraction of a second. A trained decoder's colours follow its latents smoothly, which is
what makes an affine map a good preview (tests/test_preview.py bounds its error on such a
decoder); the tiny random test VAEs decode latents into texture noise that no cheap preview
follows (an affine map explains 4% of their block means' variance; pooled-latent decodes
do worse than a constant colour).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx.kernels.device import cache_folder
from bonsai_mlx.models.vae import VAE
from bonsai_mlx.weights import atomic_path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

FIT_VERSION = 1  # part of the cache key: change it when the fitting procedure changes
FIT_LATENT_SIZE = 16  # latent pixels per side of each fitting sample (128 image pixels)
FIT_SAMPLES = 6
FIT_SCALES = (1, 2, 4)  # smoothness of the random fields: latent pixels per random value
FIT_BORDER = 2  # latent pixels left out at each edge (the decoder's zero padding)


@dataclass
class LatentPreview:
    """An affine latent -> RGB map for one VAE. `matrix` (latent_channels + 1, 3) maps
    un-normalised latent pixels (plus a constant 1) to RGB in the decoder's [-1, 1]."""

    matrix: np.ndarray
    mean: np.ndarray  # (128,) the VAE's latent BatchNorm mean and std, to un-normalise
    std: np.ndarray
    patch: tuple[int, int] = (2, 2)

    @classmethod
    def for_vae(cls, vae: VAE, cache_dir: str | Path | None = None) -> LatentPreview:
        """The preview of `vae`: read from the cache, or fitted and cached."""
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = folder / f"{decoder_fingerprint(vae)}.json"
        matrix = _read_cached(path, vae.config.latent_channels)
        if matrix is None:
            matrix = fit_matrix(vae)
            try:
                with atomic_path(path) as tmp:
                    tmp.write_text(json.dumps({"version": FIT_VERSION,
                                               "matrix": matrix.tolist()}))
            except OSError:
                pass  # a read-only cache only costs a refit next time
        return cls.with_matrix(vae, matrix)

    @classmethod
    def with_matrix(cls, vae: VAE, matrix: np.ndarray) -> LatentPreview:
        std = np.sqrt(np.array(vae.bn.running_var, np.float32) + vae.config.batch_norm_eps)
        return cls(np.asarray(matrix, np.float32), np.array(vae.bn.running_mean, np.float32),
                   std, tuple(vae.config.patch_size))

    def __call__(self, latents: mx.array | np.ndarray) -> np.ndarray:
        """Normalised latents (B, 128, h, w), the callback's layout -> float32 RGB
        (B, 2h, 2w, 3) in [0, 1]."""
        p = np.asarray(latents, np.float32).transpose(0, 2, 3, 1)  # (B, h, w, 128)
        z = unpatchify(p * self.std + self.mean, self.patch)  # (B, 2h, 2w, 32)
        rgb = z @ self.matrix[:-1] + self.matrix[-1]
        return np.clip(rgb * 0.5 + 0.5, 0.0, 1.0)


def unpatchify(p: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """(B, h, w, C * py * px) -> (B, h * py, w * px, C); channel c * py * px + y * px + x,
    as `VAE.denormalize_latents`."""
    b, h, w, n = p.shape
    py, px = patch
    z = p.reshape(b, h, w, n // (py * px), py, px).transpose(0, 1, 4, 2, 5, 3)
    return z.reshape(b, h * py, w * px, n // (py * px))


def fit_matrix(vae: VAE, seed: int = 0) -> np.ndarray:
    """Least-squares (latent_channels + 1, 3) map from latent pixels to the 8x8 block means
    of the VAE's decode, on random smooth normalised latents (natural images' latents are
    spatially smooth; the pipeline's latents are normalised to about unit variance)."""
    rng = np.random.default_rng(seed)
    n, f = FIT_LATENT_SIZE, vae.scale_factor
    py, px = vae.config.patch_size
    channels = vae.bn.running_mean.shape[0]
    inputs, targets = [], []
    for i in range(FIT_SAMPLES):
        s = FIT_SCALES[i % len(FIT_SCALES)]
        coarse = rng.standard_normal((1, n // py // s, n // px // s, channels), np.float32)
        p = np.repeat(np.repeat(coarse, s, axis=1), s, axis=2)  # (1, n/py, n/px, 128)
        z = vae.denormalize_latents(mx.array(p))  # (1, n, n, 32)
        image = np.array(vae.decode(z, tiled=False).astype(mx.float32))
        blocks = image.reshape(1, n, f, n, f, 3).mean(axis=(2, 4))
        keep = (slice(None), slice(FIT_BORDER, n - FIT_BORDER), slice(FIT_BORDER, n - FIT_BORDER))
        inputs.append(np.array(z.astype(mx.float32))[keep].reshape(-1, z.shape[-1]))
        targets.append(blocks[keep].reshape(-1, 3))
    x = np.concatenate(inputs)
    x = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    matrix, *_ = np.linalg.lstsq(x.astype(np.float64), np.concatenate(targets), rcond=None)
    return matrix.astype(np.float32)


def decoder_fingerprint(vae: VAE) -> str:
    """A hash of everything a preview depends on: the config, the compute dtype and the
    bytes of every decoder-side weight (the encoder, loaded or not, is left out)."""
    h = hashlib.sha256(f"v{FIT_VERSION} {vae.config} {vae.dtype}".encode())
    for name, value in sorted(tree_flatten(vae.parameters())):
        if name.startswith(("encoder.", "quant_conv.")):
            continue
        value = mx.contiguous(value)
        mx.eval(value)
        h.update(f"{name} {value.shape} {value.dtype}".encode())
        h.update(memoryview(value))
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    """$BONSAI_PREVIEW_CACHE, else $XDG_CACHE_HOME/bonsai-mlx/previews (~/.cache/...)."""
    return cache_folder("previews", "BONSAI_PREVIEW_CACHE")


def _read_cached(path: Path, latent_channels: int) -> np.ndarray | None:
    try:
        data = json.loads(path.read_text())
        matrix = np.asarray(data["matrix"], np.float32)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: fitted again
    if data.get("version") != FIT_VERSION or matrix.shape != (latent_channels + 1, 3):
        return None
    return matrix
