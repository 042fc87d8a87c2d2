"""The FLUX.2 [klein] models: transformer, text encoder, VAE."""

from bonsai_mlx.models.text_encoder import PromptEncoder
from bonsai_mlx.models.transformer import Flux2Transformer, Flux2TransformerConfig
from bonsai_mlx.models.vae import VAE

__all__ = ["VAE", "Flux2Transformer", "Flux2TransformerConfig", "PromptEncoder"]
