"""Loading packed transformers: miniature Bonsai MLX packs (1-bit, 2-bit ternary) built here in
the published `transformer-packed-mflux/` layout, and our own packed layout, into a tiny
Flux2Transformer; outputs must match the dense model with the same (dequantised) weights."""

import json

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.transformer import (
    Flux2Transformer,
    Flux2TransformerConfig,
    packed_layer_paths,
)
from bonsai_mlx.quant import (
    BinaryLinear,
    TernaryLinear,
    load_packed_transformer_weights,
    packed_layout,
    quantize_dense_layers,
    quantize_model,
    save_packed_transformer_weights,
)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from bonsai_packs import SKIP_PATTERNS, pack_2bit_codes
from mlx.utils import tree_flatten

# inner dim 128 so that every packed layer's K (128, 384, 512) is a whole number of groups
CONFIG = dict(in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=8, joint_attention_dim=24, timestep_guidance_channels=32,
              axes_dims_rope=(4, 4, 4, 4))
PATHS = packed_layer_paths(1, 2)


def build_dense(fmt: str, seed: int) -> Flux2Transformer:
    """A float32 tiny transformer, every weight float16-representable and the packed layers
    binary- or ternary-valued per group of 128 (what a Bonsai `*-unpacked` folder holds)."""
    rng = np.random.default_rng(seed)
    model = Flux2Transformer(Flux2TransformerConfig(**CONFIG), dtype="float32")
    params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    for p in PATHS:
        n, k = params[f"{p}.weight"].shape
        values = [-1, 1] if fmt == "binary" else [-1, 0, 1]
        q = rng.choice(values, size=(n, k // 128, 128))
        s = rng.uniform(0.02, 0.1, size=(n, k // 128, 1))
        params[f"{p}.weight"] = (q * s).reshape(n, k)
    model.load_weights([(k, mx.array(v.astype(np.float16).astype(np.float32)))
                        for k, v in params.items()])
    return model


def forward(model: Flux2Transformer) -> np.ndarray:
    rng = np.random.default_rng(0)
    img_ids = np.array([[0, h, w, 0] for h in range(2) for w in range(2)])
    txt_ids = np.array([[0, 0, 0, i] for i in range(3)])
    out = model(rng.standard_normal((1, 4, 8)).astype(np.float32),
                rng.standard_normal((1, 3, 24)).astype(np.float32),
                np.array([0.7], np.float32), img_ids, txt_ids)
    return np.array(out.astype(mx.float32))


def write_bonsai_pack(dense: Flux2Transformer, bits: int, root, corrupt=None):
    """The published layout: transformer-packed-mflux/ with FP16 dense tensors and an MLX
    affine triple per packed layer (1-bit by mx.quantize; 2-bit ternary as codes 0/1/2 with
    scale = s, bias = -s)."""
    folder = root / "transformer-packed-mflux"
    folder.mkdir(parents=True)
    tensors = {}
    for k, v in tree_flatten(dense.parameters()):
        layer = k.removesuffix(".weight")
        if layer not in PATHS:
            tensors[k] = v.astype(mx.float16)
        elif bits == 1:
            tensors[k], tensors[f"{layer}.scales"], tensors[f"{layer}.biases"] = mx.quantize(
                v.astype(mx.float16), group_size=128, bits=1)
        else:
            w = np.array(v).reshape(v.shape[0], -1, 128)
            s = np.abs(w).max(-1)  # (N, G)
            codes = (np.sign(w) + 1).astype(np.uint8).reshape(v.shape)
            if corrupt == layer:
                codes[0, 130] = 3
            tensors[k] = mx.array(pack_2bit_codes(codes))
            tensors[f"{layer}.scales"] = mx.array(s.astype(np.float16))
            tensors[f"{layer}.biases"] = mx.array((-s).astype(np.float16))
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), tensors)
    config = dict(CONFIG, _class_name="Flux2Transformer2DModel")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantization_config.json").write_text(json.dumps(
        {"bits": bits, "group_size": 128, "skip_patterns": SKIP_PATTERNS}))
    (folder / "checkpoint_manifest.json").write_text(json.dumps({"files": 1}))
    return folder, tensors


def fresh() -> Flux2Transformer:
    return Flux2Transformer(Flux2TransformerConfig(**CONFIG), dtype="float32")


def assert_close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("bits,fmt,cls", [(1, "binary", BinaryLinear),
                                          (2, "ternary", TernaryLinear)])
def test_bonsai_pack_converts_exactly_and_matches_dense(bits, fmt, cls, tmp_path):
    dense = build_dense(fmt, seed=bits)
    folder, tensors = write_bonsai_pack(dense, bits, tmp_path)
    assert packed_layout(folder) == "mlx-affine"
    model = load_packed_transformer_weights(fresh(), folder)
    for p in PATHS:
        layer = model
        for part in p.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        assert isinstance(layer, cls)
        assert np.array_equal(np.array(layer.dequantize()),
                              np.array(dict(tree_flatten(dense.parameters()))[f"{p}.weight"]))
    if bits == 1:  # the words are reused bit for bit
        w = model.transformer_blocks[0].attn.to_q.weight
        words = tensors["transformer_blocks.0.attn.to_q.weight"]
        assert np.array_equal(np.array(w), np.array(words))
    assert_close(forward(model), forward(dense))


@pytest.mark.parametrize("bits,fmt", [(1, "binary"), (2, "ternary")])
def test_affine_baseline_runs_stock_quantized_linear(bits, fmt, tmp_path):
    dense = build_dense(fmt, seed=10 + bits)
    folder, _ = write_bonsai_pack(dense, bits, tmp_path)
    model = load_packed_transformer_weights(fresh(), folder, affine_baseline=True)
    layer = model.single_transformer_blocks[1].attn.to_out
    assert isinstance(layer, nn.QuantizedLinear) and layer.bits == bits
    assert layer.scales.dtype == mx.float16  # kept as the file stores them
    assert_close(forward(model), forward(dense))


def test_corrupted_ternary_pack_names_layer_and_group(tmp_path):
    dense = build_dense("ternary", seed=3)
    bad = "single_transformer_blocks.1.attn.to_out"
    folder, _ = write_bonsai_pack(dense, 2, tmp_path, corrupt=bad)
    with pytest.raises(BonsaiError, match=rf"{bad}: group 1 of row 0 is not ternary"):
        load_packed_transformer_weights(fresh(), folder)


def test_bonsai_pack_config_and_file_errors(tmp_path):
    dense = build_dense("binary", seed=4)
    folder, tensors = write_bonsai_pack(dense, 1, tmp_path)
    qc = folder / "quantization_config.json"
    qc.write_text(json.dumps({"bits": 4, "group_size": 128}))
    with pytest.raises(BonsaiError, match="bits 4"):
        load_packed_transformer_weights(fresh(), folder)
    qc.write_text(json.dumps({"bits": 1, "group_size": 64}))
    with pytest.raises(BonsaiError, match="group_size 64"):
        load_packed_transformer_weights(fresh(), folder)
    qc.write_text(json.dumps({"bits": 1, "group_size": 128}))
    del tensors["transformer_blocks.0.ff.linear_in.biases"]
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), tensors)
    with pytest.raises(BonsaiError, match=r"transformer_blocks\.0\.ff\.linear_in\.biases is "
                                          "missing"):
        load_packed_transformer_weights(fresh(), folder)
    (folder / "quantization_config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(BonsaiError, match="neither a bonsai-mlx nor a Bonsai MLX"):
        load_packed_transformer_weights(fresh(), folder)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
@pytest.mark.parametrize("dense_bits", [16, 8])
def test_our_layout_saves_and_loads_back_identically(fmt, dense_bits, tmp_path):
    dense = build_dense(fmt, seed=5)
    reference = forward(dense)
    assert quantize_model(dense, fmt) is True
    if dense_bits == 8:
        quantize_dense_layers(dense)
    packed_out = forward(dense)
    if dense_bits == 16:
        assert_close(packed_out, reference)

    folder = tmp_path / "transformer"
    cfg = save_packed_transformer_weights(dense, folder)
    assert cfg["format"] == fmt and cfg["dense_bits"] == dense_bits
    assert cfg["packed_layers"] == PATHS
    assert packed_layout(folder) == "bonsai-mlx"
    saved = json.loads((folder / "quantization_config.json").read_text())
    assert saved == cfg and saved["group_size"] == 128

    model = load_packed_transformer_weights(fresh(), folder)
    assert np.array_equal(forward(model), packed_out)
    if dense_bits == 8:
        assert isinstance(model.proj_out, nn.QuantizedLinear)  # (K = 24 stays dense)
        assert isinstance(model.context_embedder, nn.Linear)


def test_our_layout_missing_tensor_is_reported(tmp_path):
    dense = build_dense("binary", seed=6)
    quantize_model(dense, "binary")
    folder = tmp_path / "transformer"
    save_packed_transformer_weights(dense, folder)
    f = folder / "diffusion_pytorch_model.safetensors"
    tensors = dict(mx.load(str(f)))
    del tensors["single_transformer_blocks.0.attn.to_out.scales"]
    mx.save_safetensors(str(f), tensors)
    with pytest.raises(BonsaiError, match="missing.*single_transformer_blocks.0.attn.to_out"):
        load_packed_transformer_weights(fresh(), folder)


def test_plain_module_with_the_same_layer_names_loads(tmp_path):
    """Without Flux2Transformer's own checked loader (any module with diffusers names)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.to_qkv_mlp_proj = nn.Linear(128, 256, bias=False)
            self.attn.to_out = nn.Linear(256, 128, bias=False)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_out = nn.Linear(128, 8, bias=False)
            self.transformer_blocks = []
            self.single_transformer_blocks = [Block()]

        def packable_layers(self):
            return packed_layer_paths(0, 1)

    rng = np.random.default_rng(7)
    src = Model()
    src.update({"single_transformer_blocks": [{"attn": {
        "to_qkv_mlp_proj": {"weight": mx.array(np.sign(rng.standard_normal((256, 128))) / 8)},
        "to_out": {"weight": mx.array(np.sign(rng.standard_normal((128, 256))) / 4)}}}]})
    x = mx.array(rng.standard_normal((2, 128)).astype(np.float32))
    quantize_model(src, "binary")
    save_packed_transformer_weights(src, tmp_path)
    model = load_packed_transformer_weights(Model(), tmp_path)
    blk, ref = model.single_transformer_blocks[0].attn, src.single_transformer_blocks[0].attn
    assert np.array_equal(np.array(blk.to_out(blk.to_qkv_mlp_proj(x))),
                          np.array(ref.to_out(ref.to_qkv_mlp_proj(x))))
    assert np.array_equal(np.array(model.proj_out.weight), np.array(src.proj_out.weight))
