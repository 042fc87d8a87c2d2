"""Synthetic models: FLUX.2 [klein] 4B's exact shapes with random weights in the release's
formats, built in memory (no download; the same speed and memory as real weights).

The transformer holds `BinaryLinear` / `TernaryLinear` layers with random packed arrays (or
dense ones for "bf16"), the Qwen3 encoder is quantized to 4 bits (its first 27 layers, all
that prompt encoding runs), and the VAE decoder is complete. `tiny=True` swaps in miniature
configs for a smoke run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from bonsai_mlx.checks import check_prompts
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.text_encoder import (
    DEFAULT_OUT_LAYERS,
    QUANTIZE_GROUP_SIZE,
    QWEN3_4B,
    Qwen3Encoder,
    qwen3_args,
    should_dequantize,
)
from bonsai_mlx.models.transformer import Flux2Transformer, Flux2TransformerConfig
from bonsai_mlx.models.vae import SMALL_DECODER_CHANNELS, VAE, VAEConfig
from bonsai_mlx.models.vae_layers import Encoder
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.quant import use_packed_layers
from bonsai_mlx.quant.model import get_module
from bonsai_mlx.scheduler import SchedulerConfig
from bonsai_mlx.weights import parse_dtype

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

SYNTHETIC_KINDS = ("binary", "ternary", "bf16")
TEXT_BITS = 4  # the Bonsai `text_encoder-mlx-4bit/` pack (group QUANTIZE_GROUP_SIZE)

# Miniatures for `tiny=True`: every packed layer's input size a multiple of 128.
TINY_TRANSFORMER = {
    "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 32,
    "num_attention_heads": 4, "joint_attention_dim": 3 * 64, "axes_dims_rope": (8, 8, 8, 8),
}
TINY_QWEN3 = {
    **QWEN3_4B, "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
}
TINY_OUT_LAYERS = (1, 2, 3)
TINY_TEXT_TOKENS = 32
TINY_VAE = {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 32}


def _random_uint32(shape: Sequence[int], key) -> mx.array:
    """Uniformly random 32-bit words (`randint` over the full range leaves low bits zero)."""
    k1, k2 = mx.random.split(key)
    hi = mx.random.randint(0, 1 << 16, shape, key=k1).astype(mx.uint32)
    lo = mx.random.randint(0, 1 << 16, shape, key=k2).astype(mx.uint32)
    return (hi << 16) | lo


def _random_like_packed(layer, rng_key) -> None:
    """Fill a BinaryLinear / TernaryLinear with random packed weights and scales.

    Scales make the weights' standard deviation about that of `nn.Linear`'s default init
    (1/sqrt(3K)), so activations stay in range through all the blocks.
    """
    k1, k2 = mx.random.split(rng_key)
    n, k = layer.output_dims, layer.input_dims
    if layer.format == "binary":
        layer.weight = _random_uint32(layer.weight.shape, k1)
        std = 1.0
    else:  # 243 byte values hold 5 trits each
        layer.weight = mx.random.randint(0, 243, layer.weight.shape, key=k1).astype(mx.uint8)
        std = math.sqrt(2 / 3)
    s = 1.0 / (std * math.sqrt(3 * k))
    layer.scales = (s * mx.random.uniform(0.75, 1.25, (n, k // 128), key=k2)).astype(mx.float16)


def synthetic_transformer(kind: str, dtype: mx.Dtype, tiny: bool = False,
                          seed: int = 0) -> Flux2Transformer:
    """The Klein 4B transformer (or a miniature) with random weights; `kind` 'binary' or
    'ternary' swaps its 100 packed layers for BinaryLinear / TernaryLinear with random
    packed arrays. The dense float weights are never materialised for packed layers."""
    config = Flux2TransformerConfig(**(TINY_TRANSFORMER if tiny else {}))
    mx.random.seed(seed)
    model = Flux2Transformer(config, dtype)  # lazy: nothing computed yet
    if kind in ("binary", "ternary"):
        use_packed_layers(model, kind)
        key = mx.random.key(seed)
        for path in model.packable_layers():
            key, sub = mx.random.split(key)
            _random_like_packed(get_module(model, path), sub)
    _eval_in_parts(model)
    return model


def _eval_in_parts(model: nn.Module) -> None:
    """Evaluate the parameters child by child (each block of a list on its own), so only
    one block's float32 random init is transient at a time."""
    for child in model.children().values():
        for m in child if isinstance(child, list) else [child]:
            mx.eval(m.parameters())
    mx.eval(model.parameters())
    model.eval()


def _quantized_random(module: nn.Module, dtype: mx.Dtype, key) -> None:
    """Replace an affine-quantized module's weight / scales / biases by random ones of the
    same shapes: codes uniform, w = scale * q + bias spread like a trained 4-bit layer."""
    k1, k2 = mx.random.split(key)
    module.weight = _random_uint32(module.weight.shape, k1)
    k_in = module.scales.shape[-1] * module.group_size
    levels = 2**module.bits - 1
    s = mx.random.uniform(0.75, 1.25, module.scales.shape, key=k2) * (
        2.0 / (levels * math.sqrt(k_in))
    )
    module.scales = s.astype(dtype)
    module.biases = (-s * levels / 2).astype(dtype)


class SyntheticPromptEncoder:
    """Qwen3-4B's first 27 layers, 4-bit, random weights: `encode(prompt)` runs the real
    `Qwen3Encoder` on token ids derived from the prompt's bytes (no tokenizer download).

    Duck-types `PromptEncoder.encode`. Unlike the real one it keeps its weights loaded and
    caches nothing, so each call costs the encoder forward and not a reload from disk.
    `run=False` builds nothing (the footprint is computed from the shapes) and `encode`
    returns zeros of the right shape (`--skip-encode`: time only the transformer and VAE).
    """

    def __init__(self, dtype: mx.Dtype, tiny: bool = False, seed: int = 0, run: bool = True):
        config = TINY_QWEN3 if tiny else QWEN3_4B
        self.out_layers = TINY_OUT_LAYERS if tiny else DEFAULT_OUT_LAYERS
        self.max_sequence_length = TINY_TEXT_TOKENS if tiny else 512
        self.dtype = dtype
        self.runs = run
        self.config = dict(config)
        args = qwen3_args(dict(config), "synthetic Qwen3 config")
        self.hidden_size = args.hidden_size
        full_layers = args.num_hidden_layers
        args.num_hidden_layers = max(self.out_layers)
        mx.random.seed(seed)
        model = Qwen3Encoder(args)  # lazy: nothing computed until evaluated
        model.set_dtype(dtype)
        nn.quantize(model, group_size=QUANTIZE_GROUP_SIZE, bits=TEXT_BITS)
        # On disk the pack holds all layers (and the final norm): count what is not built.
        self.footprint_bytes = (
            shipped_bytes(model)
            + (full_layers - len(model.model.layers)) * shipped_bytes(model.model.layers[0])
            + args.hidden_size * 2
        )
        self.model = None
        if not run:
            return
        key = mx.random.key(seed + 1)
        for _, m in model.named_modules():
            if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
                key, sub = mx.random.split(key)
                _quantized_random(m, dtype, sub)
        mx.eval(model.model.embed_tokens.parameters())
        _eval_in_parts(model.model)
        self.model = model

    def encode(self, prompt: str | Sequence[str]) -> mx.array:
        prompts = check_prompts(prompt)
        n = self.max_sequence_length
        if self.model is None:
            shape = (len(prompts), n, len(self.out_layers) * self.hidden_size)
            return mx.zeros(shape, self.dtype)
        vocab = self.model.args.vocab_size
        rows, masks = [], []
        for p in prompts:
            ids = [b % vocab for b in p.encode("utf-8")][:n]
            rows.append(ids + [0] * (n - len(ids)))
            masks.append([1] * len(ids) + [0] * (n - len(ids)))
        # as PromptEncoder does: one dequantized layer at a time on the CPU
        embeds = self.model(mx.array(rows), mx.array(masks), self.out_layers,
                            dequantize=should_dequantize()).astype(self.dtype)
        mx.eval(embeds)
        return embeds


def synthetic_vae(dtype: mx.Dtype, tiny: bool = False, seed: int = 0,
                  small: bool = False) -> VAE:
    """FLUX.2's VAE decoder (or a miniature) with random weights in `dtype`; `small`: the
    FLUX.2 small decoder's channels (the miniature's cannot shrink: 32 groups of 32)."""
    mx.random.seed(seed)
    config = VAEConfig(**(TINY_VAE if tiny else {}))
    if small:
        config.decoder_block_out_channels = (config.block_out_channels if tiny
                                             else SMALL_DECODER_CHANNELS)
    vae = VAE(config, dtype)  # statistics 0 and 1, float32
    mx.eval(vae.parameters())
    vae.eval()
    return vae


def shipped_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters as the release stores them: float tensors in 16 bits
    (bf16 / fp16, whatever the compute dtype), packed and quantized codes as they are.
    Works on unevaluated arrays (only shapes and dtypes are read)."""
    return sum(v.size * 2 if mx.issubdtype(v.dtype, mx.floating) else v.nbytes
               for _, v in tree_flatten(module.parameters()))


SYNTHETIC_SCHEDULER = {"use_dynamic_shifting": True, "shift": 3.0}  # Klein's scheduler


def synthetic_pipeline(kind: str, dtype: str | mx.Dtype = "bfloat16", tiny: bool = False,
                       encode: bool = True,
                       small_decoder: bool = False) -> tuple[Pipeline, dict[str, int]]:
    """A `Pipeline` of synthetic Klein 4B components (or miniatures): the transformer in
    `kind` ('binary', 'ternary' or 'bf16' = all dense in `dtype`), the 4-bit Qwen3 encoder
    (zeros instead when `encode` is False) and the VAE (with the small decoder's shapes when
    `small_decoder`). Returns (pipeline, footprint bytes per component as the release would
    store them)."""
    if kind not in SYNTHETIC_KINDS:
        raise BonsaiError(f"synthetic must be one of {', '.join(SYNTHETIC_KINDS)}, not {kind!r}")
    dtype = parse_dtype(dtype)
    transformer = synthetic_transformer(kind, dtype, tiny)
    vae = synthetic_vae(dtype, tiny, small=small_decoder)
    prompt_encoder = SyntheticPromptEncoder(dtype, tiny, run=encode)
    pipe = Pipeline(transformer, vae, prompt_encoder, SchedulerConfig(**SYNTHETIC_SCHEDULER),
                    is_distilled=True)
    footprint = {
        "transformer": shipped_bytes(transformer),
        "text_encoder": prompt_encoder.footprint_bytes,
        "vae": _vae_file_bytes(vae),
    }
    return pipe, footprint


def _vae_file_bytes(vae) -> int:
    """Bytes of the VAE as shipped: the decoder we hold plus the encoder and quant_conv
    that the file also carries (computed from the config, never built)."""
    encoder = Encoder(vae.config)  # lazy init: shapes only, nothing computed
    n = 2 * vae.config.latent_channels
    extra = sum(v.size for _, v in tree_flatten(encoder.parameters())) + n * n + n
    return shipped_bytes(vae) + extra * 2

