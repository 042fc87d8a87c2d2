"""The FLUX.2 [klein] models: transformer, text encoder, VAE."""

from bonsai_mlx.models.transformer import Flux2Transformer, Flux2TransformerConfig

__all__ = ["Flux2Transformer", "Flux2TransformerConfig"]
