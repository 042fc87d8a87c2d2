"""Deployment payload of full-size FLUX.2 [klein] 4B and 9B per component: the published
Bonsai MLX packs (4B) and the published 16-bit checkpoints (9B) against what `bonsai-mlx
convert` writes (issues 10 and 19), and the bytes the FLUX.2 small decoder saves.

Byte counts are exact tensor bytes from the full-size shapes (nothing is downloaded and no
weight is materialised: the models are built lazily in MLX and only shapes are read), plus
an estimated safetensors header per file:

- transformer: scripts/footprint.py's tensors (binary / ternary packed, dense layers 16-bit
  or MLX affine 8-bit) and the published MLX affine 1-/2-bit packs;
- text encoder: Qwen3-4B (mlx-lm's model, config of Qwen/Qwen3-4B) quantised as mlx-lm does
  (affine, group 64, bfloat16 scales and biases, tied embedding): the published
  `text_encoder-mlx-4bit/` holds all 36 layers and the final norm; ours keeps the 27 layers
  FLUX.2 reads (hidden states 9, 18, 27), at 4 bits (default), 3 or 8. The 9B's Qwen3-8B
  (its own lm_head) is published in bfloat16, all 36 layers;
- VAE: FLUX.2's AutoencoderKLFlux2 (encoder + decoder) in float16, as both store it; the
  decoder alone is what text-to-image loads. The small decoder (decoder channels 96, 192,
  384, 384 instead of 128, 256, 512, 512; the same encoder) is what `--vae small` writes.

    python scripts/payload.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout too
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bonsai_mlx.models.text_encoder import (  # noqa: E402
    DEFAULT_OUT_LAYERS,
    QUANTIZE_GROUP_SIZE,
    QWEN3_4B,
    QWEN3_8B,
    Qwen3Encoder,
)
from bonsai_mlx.models.transformer import KLEIN_4B, KLEIN_9B  # noqa: E402
from bonsai_mlx.models.vae import SMALL_DECODER_CHANNELS, VAE, VAEConfig  # noqa: E402
from bonsai_mlx.models.vae_layers import Encoder  # noqa: E402

import footprint  # noqa: E402
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import qwen3  # noqa: E402

PUBLISHED_GB = {"transformer binary": 0.97, "transformer ternary": 1.43, "text encoder": 2.28,
                "vae": 0.17, "binary": 3.42, "ternary": 3.88}
GOALS = {"binary": 2.9e9, "ternary": 3.2e9}
SMALL_DECODER = VAEConfig(decoder_block_out_channels=SMALL_DECODER_CHANNELS)


def _header_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """A safetensors header for these tensors, estimated as footprint.py does (an upper
    bound of the offsets' digits): 8 + JSON length."""
    header = {k: {"dtype": "BF16", "shape": list(s), "data_offsets": [0, 10**10]}
              for k, s in shapes.items()}
    return 8 + len(json.dumps(header))


def _module_bytes(model: nn.Module) -> tuple[int, dict[str, tuple[int, ...]]]:
    params = dict(tree_flatten(model.parameters()))
    return sum(v.nbytes for v in params.values()), {k: v.shape for k, v in params.items()}


def text_encoder_bytes(config: dict = QWEN3_4B, layers: int | None = None, bits: int = 4,
                       dtype: mx.Dtype = mx.bfloat16) -> dict[str, int]:
    """Tensor bytes of a Qwen3 as mlx-lm stores it: `layers` None = the whole model (final
    norm included), else the first `layers` layers as bonsai-mlx saves them (no final norm,
    no lm_head). bits 16 = unquantised `dtype`. Returns tensor bytes and the file size
    (tensors + estimated header)."""
    args = qwen3.ModelArgs.from_dict(config)
    if layers is None:
        model = qwen3.Model(args)
    else:
        args.num_hidden_layers = layers
        model = Qwen3Encoder(args, final_norm=False)
    model.set_dtype(dtype)  # lazy: nothing is computed, only shapes are read
    if bits != 16:
        nn.quantize(model, QUANTIZE_GROUP_SIZE, bits, class_predicate=lambda _, m: (
            hasattr(m, "to_quantized") and m.weight.shape[-1] % QUANTIZE_GROUP_SIZE == 0))
    tensors, shapes = _module_bytes(model)
    return {"tensors": tensors, "file": tensors + _header_bytes(shapes)}


def vae_bytes(config: VAEConfig | None = None, dtype: mx.Dtype = mx.float16) -> dict[str, int]:
    """Tensor bytes of the FLUX.2 VAE: `decoder` (what text-to-image loads: decoder,
    post_quant_conv, latent BatchNorm statistics), `encoder` (encoder + quant_conv) and the
    file (both + estimated header)."""
    config = config or VAEConfig()
    vae = VAE(config)
    vae.set_dtype(dtype)
    encoder = Encoder(config)
    encoder.set_dtype(dtype)
    dec, dec_shapes = _module_bytes(vae)
    enc, enc_shapes = _module_bytes(encoder)
    if config.use_quant_conv:
        n = 2 * config.latent_channels
        enc += (n * n + n) * dtype.size
        enc_shapes.update({"quant_conv.weight": (n, n, 1, 1), "quant_conv.bias": (n,)})
    shapes = {**dec_shapes, **{f"encoder.{k}": s for k, s in enc_shapes.items()}}
    # diffusers also stores the BatchNorm's `num_batches_tracked` (one int64, never used)
    shapes["bn.num_batches_tracked"] = ()
    return {"decoder": dec, "encoder": enc, "tensors": dec + enc + 8,
            "file": dec + enc + 8 + _header_bytes(shapes)}


def transformer_bytes(fmt: str, dense_bits: int = 16, config=KLEIN_4B) -> int:
    """Our packed transformer file (scripts/footprint.py's tensors + estimated header)."""
    spec = footprint.tensors(fmt, dense_bits, config)
    tensors = sum(footprint.nbytes(s, d) for s, d, _ in spec.values())
    return tensors + _header_bytes({k: s for k, (s, _, _) in spec.items()})


def published_transformer_bytes(bits: int, config=KLEIN_4B) -> int:
    """The published MLX affine pack from the same shapes (tensors + estimated header);
    bits 16: the dense bfloat16 checkpoint."""
    shapes = footprint.shapes(config)
    if bits == 16:
        return sum(footprint.nbytes(s, mx.bfloat16) for s in shapes.values()) + _header_bytes(
            shapes)
    shapes = dict(shapes)
    for path in footprint.packed_paths(config):
        n, k = footprint.packed_shape(path, config)
        shapes[f"{path}.weight"] = (n, k * bits // 32)
        shapes[f"{path}.scales"] = shapes[f"{path}.biases"] = (n, k // footprint.GROUP_SIZE)
    return sum(footprint.affine_bytes(bits, config).values()) + _header_bytes(shapes)


def payload_table(text_encoder_bits: int = 4) -> list[dict]:
    """One row per (format, variant): bytes per component and the total."""
    full_te = text_encoder_bytes(QWEN3_4B, None, 4)["file"]
    vae = vae_bytes()["file"]
    rows = []
    for fmt, bits in (("binary", 1), ("ternary", 2)):
        rows.append({"format": fmt, "variant": "published MLX pack",
                     "transformer": published_transformer_bytes(bits),
                     "text_encoder": full_te, "vae": vae})
        for dense_bits in (16, 8):
            for te_bits in (4, 3, 8):
                te = text_encoder_bytes(QWEN3_4B, max(DEFAULT_OUT_LAYERS), te_bits)["file"]
                rows.append({"format": fmt,
                             "variant": f"bonsai-mlx, dense {dense_bits}-bit, "
                                        f"text encoder {te_bits}-bit",
                             "transformer": transformer_bytes(fmt, dense_bits),
                             "text_encoder": te, "vae": vae})
    for r in rows:
        r["total"] = r["transformer"] + r["text_encoder"] + r["vae"]
    return rows


def payload_table_9b() -> list[dict]:
    """FLUX.2 [klein] 9B: the published 16-bit checkpoint, and `bonsai-mlx convert` of it
    (packed transformer, Qwen3-8B trimmed to 27 layers at 4 bits), with either decoder."""
    vae, small = vae_bytes()["file"], vae_bytes(SMALL_DECODER)["file"]
    te = text_encoder_bytes(QWEN3_8B, max(DEFAULT_OUT_LAYERS), 4)["file"]
    rows = [{"format": "bf16", "variant": "published (diffusers, bfloat16)",
             "transformer": published_transformer_bytes(16, KLEIN_9B),
             "text_encoder": text_encoder_bytes(QWEN3_8B, None, 16)["file"], "vae": vae}]
    for fmt in ("binary", "ternary"):
        for dense_bits in (16, 8):
            for name, v in (("", vae), (", small decoder", small)):
                rows.append({"format": fmt,
                             "variant": f"bonsai-mlx, dense {dense_bits}-bit, text encoder "
                                        f"4-bit{name}",
                             "transformer": transformer_bytes(fmt, dense_bits, KLEIN_9B),
                             "text_encoder": te, "vae": v})
    for r in rows:
        r["total"] = r["transformer"] + r["text_encoder"] + r["vae"]
    return rows


def _print_rows(rows: list[dict], goals: dict) -> None:
    head = (f"{'format':<9}{'variant':<62}{'transformer':>12}{'text enc.':>10}{'VAE':>7}"
            f"{'total':>8}{'goal':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        goal = "" if r["format"] not in goals or r["variant"].startswith("published") else (
            "ok" if r["total"] <= goals[r["format"]] else "MISS")
        print(f"{r['format']:<9}{r['variant']:<62}{r['transformer'] / 1e9:>12.3f}"
              f"{r['text_encoder'] / 1e9:>10.3f}{r['vae'] / 1e9:>7.3f}{r['total'] / 1e9:>8.3f}"
              f"{goal:>7}")


def main() -> None:
    rows = payload_table()
    v, small = vae_bytes(), vae_bytes(SMALL_DECODER)
    print("FLUX.2 [klein] 4B deployment payload, decimal GB (1 GB = 1e9 bytes); tensor bytes "
          "from full-size shapes + estimated safetensors headers; tokenizer and configs "
          "(~0.01 GB, the same everywhere) not counted")
    _print_rows(rows, GOALS)
    te_full = text_encoder_bytes(QWEN3_4B, None, 4)["tensors"]
    te_cut = text_encoder_bytes(QWEN3_4B, max(DEFAULT_OUT_LAYERS), 4)["tensors"]
    print(f"published (whitepaper): transformer {PUBLISHED_GB['transformer binary']} / "
          f"{PUBLISHED_GB['transformer ternary']}, text encoder {PUBLISHED_GB['text encoder']}, "
          f"VAE {PUBLISHED_GB['vae']}, payload {PUBLISHED_GB['binary']} / "
          f"{PUBLISHED_GB['ternary']} GB")
    print(f"text encoder 4-bit: 36 layers + final norm {te_full:,} B -> 27 layers "
          f"{te_cut:,} B (-{(te_full - te_cut) / 1e9:.3f} GB); goals: binary <= "
          f"{GOALS['binary'] / 1e9} GB, ternary <= {GOALS['ternary'] / 1e9} GB")
    print(f"VAE float16: decoder (loaded for text-to-image) {v['decoder']:,} B, encoder "
          f"(loaded only to encode images) {v['encoder']:,} B")
    print()
    print("FLUX.2 [klein] 9B (and base 9B, 9B KV: the same shapes), decimal GB")
    _print_rows(payload_table_9b(), {})
    print(f"small decoder (--vae small), float16: decoder {small['decoder']:,} B instead of "
          f"{v['decoder']:,} B (-{(v['decoder'] - small['decoder']) / 1e9:.3f} GB, "
          f"{small['decoder'] / v['decoder']:.0%}); VAE file {small['file']:,} B instead of "
          f"{v['file']:,} B")


if __name__ == "__main__":
    main()
