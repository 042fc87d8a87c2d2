"""Miniature FLUX.2 [klein] pipelines for the conversion and payload tests, built from the tiny
fixtures (tokenizer + 28-layer Qwen3 of tests/fixtures/text_encoder, VAE and scheduler of
tests/fixtures/pipeline/distilled) and a small transformer whose packed layers take
binary / ternary values per group of 128:

- `write_unpacked`: a diffusers Flux2KleinPipeline folder with FP16 weights (as Bonsai's
  `*-unpacked` repos);
- `write_bonsai_pack`: the published MLX pack layout (`transformer-packed-mflux/` MLX affine
  1-bit by `mx.quantize`, or 2-bit ternary as codes 0/1/2 with scale = s, bias = -s;
  `text_encoder-mlx-4bit/` by mlx-lm's own quantisation; `vae/`);
- `write_dense_twin`: the dense pipeline with the pack's dequantised weights (transformer
  and text encoder), to compare images with.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

from bonsai_mlx.models.transformer import (
    Flux2Transformer,
    Flux2TransformerConfig,
    packed_layer_paths,
)

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

FIXTURES = Path(__file__).parent / "fixtures"
TEXT_ENCODER = FIXTURES / "text_encoder" / "text_encoder"
TOKENIZER = FIXTURES / "text_encoder" / "tokenizer"
PIPELINE = FIXTURES / "pipeline" / "distilled"

# inner dim 128 (every packed K is a whole number of groups), text 3 x 64 (Qwen3 hidden 64),
# 128 input channels (VAE latent 32 x 2 x 2)
CONFIG = dict(in_channels=128, joint_attention_dim=192, attention_head_dim=16,
              num_attention_heads=8, num_layers=1, num_single_layers=2,
              axes_dims_rope=(4, 4, 4, 4), timestep_guidance_channels=32, rope_theta=2000.0)
PATHS = packed_layer_paths(1, 2)
SKIP_PATTERNS = ["x_embedder", "context_embedder", "proj_out", "norm_out",
                 "time_guidance_embed", "modulation", "norm_q", "norm_k"]


def dense_transformer_weights(fmt: str | None, seed: int) -> dict[str, np.ndarray]:
    """float16 weights; the packed layers binary- or ternary-valued per group (fmt None:
    ordinary random weights, as any checkpoint not trained for it)."""
    rng = np.random.default_rng(seed)
    model = Flux2Transformer(Flux2TransformerConfig(**CONFIG), dtype="float32")
    params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for p in PATHS:
        n, k = params[f"{p}.weight"].shape
        if fmt is None:
            params[f"{p}.weight"] = rng.standard_normal((n, k)) * 0.06
            continue
        values = [-1, 1] if fmt == "binary" else [-1, 0, 1]
        q = rng.choice(values, size=(n, k // 128, 128))
        s = rng.uniform(0.03, 0.09, size=(n, k // 128, 1))
        params[f"{p}.weight"] = (q * s).reshape(n, k)
    return {k: v.astype(np.float16) for k, v in params.items()}


def _copy_common(root: Path) -> None:
    root.mkdir(parents=True)
    shutil.copytree(PIPELINE / "scheduler", root / "scheduler")
    shutil.copytree(PIPELINE / "vae", root / "vae")
    shutil.copytree(TOKENIZER, root / "tokenizer")


def _write_transformer(folder: Path, tensors: dict) -> None:
    folder.mkdir()
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.safetensors"),
                        {k: mx.array(v) if isinstance(v, np.ndarray) else v
                         for k, v in tensors.items()}, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(
        dict(CONFIG, _class_name="Flux2Transformer2DModel")))


def write_unpacked(root: Path, weights: dict[str, np.ndarray]) -> Path:
    """A diffusers Flux2KleinPipeline folder (FP16 transformer, the fixture's Qwen3)."""
    _copy_common(root)
    shutil.copy(PIPELINE / "model_index.json", root / "model_index.json")
    shutil.copytree(TEXT_ENCODER, root / "text_encoder")
    _write_transformer(root / "transformer", weights)
    return root


def pack_2bit_codes(codes: np.ndarray) -> np.ndarray:
    """MLX affine 2-bit word layout: 16 codes per uint32, LSB first."""
    c = codes.astype(np.uint32).reshape(codes.shape[0], -1, 16)
    return (c << (2 * np.arange(16, dtype=np.uint32))).sum(-1).astype(np.uint32)


def mlx_lm_4bit(dst: Path, bits: int = 4) -> Path:
    """The fixture's Qwen3 quantised by mlx-lm itself (as `mlx_lm.convert -q` does)."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(TEXT_ENCODER)
    with contextlib.redirect_stdout(io.StringIO()):
        model, config = quantize_model(model, config, group_size=64, bits=bits)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    return dst


def write_bonsai_pack(root: Path, weights: dict[str, np.ndarray], bits: int) -> Path:
    """The published Bonsai MLX pack layout, 1-bit (binary) or 2-bit (ternary)."""
    _copy_common(root)
    index = json.loads((PIPELINE / "model_index.json").read_text())
    index.pop("is_distilled")  # the published packs' model_index.json has no such key
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "manifest.json").write_text(json.dumps({"files": []}))
    mlx_lm_4bit(root / "text_encoder-mlx-4bit")
    tensors = {}
    for k, v in weights.items():
        layer = k.removesuffix(".weight")
        if layer not in PATHS:
            tensors[k] = mx.array(v)
        elif bits == 1:
            tensors[k], tensors[f"{layer}.scales"], tensors[f"{layer}.biases"] = mx.quantize(
                mx.array(v), group_size=128, bits=1)
        else:
            w = v.astype(np.float32).reshape(v.shape[0], -1, 128)
            s = np.abs(w).max(-1)
            tensors[k] = mx.array(pack_2bit_codes((np.sign(w) + 1).reshape(v.shape)))
            tensors[f"{layer}.scales"] = mx.array(s.astype(np.float16))
            tensors[f"{layer}.biases"] = mx.array((-s).astype(np.float16))
    folder = root / "transformer-packed-mflux"
    _write_transformer(folder, tensors)
    (folder / "quantization_config.json").write_text(json.dumps(
        {"bits": bits, "group_size": 128, "skip_patterns": SKIP_PATTERNS}))
    (folder / "checkpoint_manifest.json").write_text(json.dumps({"files": 1}))
    return root


def write_dense_twin(root: Path, pack: Path, weights: dict[str, np.ndarray]) -> Path:
    """The dense pipeline holding the pack's dequantised weights, in float32 (exact): the
    binary / ternary transformer weights as they are and the 4-bit text encoder decoded as
    scale * code + bias."""
    _copy_common(root)
    shutil.copy(PIPELINE / "model_index.json", root / "model_index.json")
    src = pack / "text_encoder-mlx-4bit"
    config = json.loads((src / "config.json").read_text())
    q = config.pop("quantization")
    config.pop("quantization_config", None)
    tensors = dict(mx.load(str(src / "model.safetensors")))
    dense = {}
    for k, v in tensors.items():
        layer, _, leaf = k.rpartition(".")
        if leaf in ("scales", "biases"):
            continue
        if f"{layer}.scales" in tensors:
            v = mx.dequantize(v, tensors[f"{layer}.scales"].astype(mx.float32),
                              tensors[f"{layer}.biases"].astype(mx.float32),
                              group_size=q["group_size"], bits=q["bits"])
        dense[k] = v.astype(mx.float32)
    (root / "text_encoder").mkdir()
    mx.save_safetensors(str(root / "text_encoder" / "model.safetensors"), dense)
    (root / "text_encoder" / "config.json").write_text(json.dumps(config))
    _write_transformer(root / "transformer",
                       {k: v.astype(np.float32) for k, v in weights.items()})
    return root


def generate(pipe, seed: int = 0) -> np.ndarray:
    return pipe.generate("a bonsai tree", width=64, height=64, steps=2, seed=seed,
                         output_type="np")


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in a folder's safetensors (headers only)."""
    from bonsai_mlx.weights import read_safetensors_header, safetensors_files

    out = {}
    for f in safetensors_files(folder):
        for k, info in read_safetensors_header(f).items():
            if k != "__metadata__":
                out[k] = info["data_offsets"][1] - info["data_offsets"][0]
    return out
