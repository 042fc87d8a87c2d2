"""Packed binary / ternary formats, reference matmuls, layers, and MLX affine import."""

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.kernels import reference
from bonsai_mlx.models.transformer import PACKED_LAYERS, packed_layer_paths
from bonsai_mlx.quant import (
    BinaryLinear,
    TernaryLinear,
    binary_from_affine,
    pack_binary,
    pack_ternary,
    quantize_binary,
    quantize_model,
    quantize_ternary,
    ternary_from_affine,
    unpack_binary,
    unpack_ternary,
    use_packed_layers,
)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from bonsai_packs import pack_2bit_codes  # MLX affine 2-bit words, written out independently
from hypothesis import given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=40, deadline=None)


def signs(rng, n, k):
    return rng.choice(np.array([-1, 1], np.int8), size=(n, k))


def trits(rng, n, k):
    return rng.choice(np.array([-1, 0, 1], np.int8), size=(n, k))


def group_scales(rng, n, k):
    """float16-representable positive scales, one per group of 128: (n, k/128)."""
    return rng.uniform(0.01, 0.5, size=(n, k // 128)).astype(np.float16).astype(np.float32)


def dense(q, s):
    """The weight q * s with one s per group of 128 (the formats' definition)."""
    n, k = q.shape
    return (q.reshape(n, -1, 128) * s[..., None]).reshape(n, k).astype(np.float32)


# ------------------------------------------------------------------ byte layout


def test_binary_bit_order_is_lsb_first_bit_one_is_plus():
    q = -np.ones((2, 64), np.int8)
    q[0, 5] = 1  # word 0, bit 5
    q[1, 32 + 31] = 1  # word 1, bit 31
    packed = pack_binary(q)
    assert packed.dtype == np.uint32 and packed.shape == (2, 2)
    assert packed.tolist() == [[1 << 5, 0], [0, 1 << 31]]


def test_ternary_bytes_are_base3_lsd_first_and_padded_with_zero_trits():
    q = np.array([[-1, 0, 1, 1, -1, 0, 1]], np.int8)  # K = 7: second byte has 3 pad trits
    packed = pack_ternary(q)
    t = q[0] + 1
    first = sum(int(t[i]) * 3**i for i in range(5))
    second = int(t[5]) + 3 * int(t[6]) + 9 * 1 + 27 * 1 + 81 * 1
    assert packed.dtype == np.uint8 and packed.tolist() == [[first, second]]


@SETTINGS
@given(n=st.integers(1, 6), words=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_binary_roundtrip_is_exact(n, words, seed):
    rng = np.random.default_rng(seed)
    q = signs(rng, n, 32 * words)
    packed = pack_binary(q)
    assert np.array_equal(unpack_binary(packed), q)
    # MLX side: same bytes, same values
    assert np.array_equal(np.array(pack_binary(mx.array(q))), packed)
    assert np.array_equal(np.array(unpack_binary(mx.array(packed))), q)
    # any word pattern survives unpack -> pack
    raw = rng.integers(0, 2**32, size=(n, words), dtype=np.uint32)
    assert np.array_equal(pack_binary(unpack_binary(raw)), raw)


@SETTINGS
@given(n=st.integers(1, 6), k=st.integers(1, 400), seed=st.integers(0, 2**31))
def test_ternary_roundtrip_is_exact(n, k, seed):
    rng = np.random.default_rng(seed)
    q = trits(rng, n, k)
    packed = pack_ternary(q)
    assert packed.shape == (n, -(-k // 5))
    assert packed.max() < 243
    assert np.array_equal(unpack_ternary(packed, k), q)
    assert np.array_equal(np.array(pack_ternary(mx.array(q))), packed)
    assert np.array_equal(np.array(unpack_ternary(mx.array(packed), k)), q)


# ------------------------------------------------------------------ reference matmul


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
@pytest.mark.parametrize("block", [None, 3 * 256])  # None: one block; else several row blocks
def test_reference_matmul_equals_dense_matmul(fmt, block, monkeypatch):
    if block:
        monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", block)
    rng = np.random.default_rng(1)
    n, k = 10, 256
    q = signs(rng, n, k) if fmt == "binary" else trits(rng, n, k)
    s = group_scales(rng, n, k)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    expected = x.astype(np.float64) @ dense(q, s).astype(np.float64).T
    scales = mx.array(s.astype(np.float16))
    if fmt == "binary":
        packed = mx.array(pack_binary(q))
        y = reference.binary_matmul(mx.array(x), packed, scales)
        w = reference.dequantize_binary(packed, scales, mx.float32)
    else:
        packed = mx.array(pack_ternary(q))
        y = reference.ternary_matmul(mx.array(x), packed, scales)
        w = reference.dequantize_ternary(packed, scales, k, mx.float32)
    assert np.array_equal(np.array(w), dense(q, s))
    assert y.shape == (2, 3, n) and y.dtype == mx.float32
    np.testing.assert_allclose(np.array(y), expected, rtol=1e-5, atol=1e-5)


def test_reference_matmul_keeps_input_dtype():
    rng = np.random.default_rng(2)
    q, s = signs(rng, 4, 128), group_scales(rng, 4, 128)
    x = mx.array(rng.standard_normal((3, 128)).astype(np.float32)).astype(mx.bfloat16)
    y = reference.binary_matmul(x, mx.array(pack_binary(q)), mx.array(s.astype(np.float16)))
    assert y.dtype == mx.bfloat16
    expected = np.array(x.astype(mx.float32)) @ dense(q, s).T
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), expected, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------ dense -> packed


def test_binary_valued_weights_pack_losslessly():
    rng = np.random.default_rng(3)
    w = dense(signs(rng, 8, 256), group_scales(rng, 8, 256))
    layer = BinaryLinear.from_weight(mx.array(w).astype(mx.float16), lossless=True)
    assert np.array_equal(np.array(layer.dequantize()), w)


def test_ternary_valued_weights_pack_losslessly():
    rng = np.random.default_rng(4)
    w = dense(trits(rng, 8, 384), group_scales(rng, 8, 384))
    layer = TernaryLinear.from_weight(mx.array(w), lossless=True)
    assert np.array_equal(np.array(layer.dequantize()), w)


def test_absmean_quantisation_matches_its_definition():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    g = w.reshape(4, 2, 128)
    s = np.abs(g).mean(-1).astype(np.float16).astype(np.float32)  # (4, 2)

    packed, scales = quantize_binary(w)
    assert np.array_equal(scales.astype(np.float32), s)
    assert np.array_equal(unpack_binary(packed), np.where(w >= 0, 1, -1))

    packed, scales = quantize_ternary(w)
    q = np.round(np.clip(g / s[..., None], -1, 1)).reshape(4, 256)
    assert np.array_equal(scales.astype(np.float32), s)
    assert np.array_equal(unpack_ternary(packed, 256), q)
    assert set(np.unique(q)) == {-1, 0, 1}


def test_lossless_request_on_dense_weights_is_an_error():
    w = np.random.default_rng(6).standard_normal((4, 128)).astype(np.float32)
    with pytest.raises(BonsaiError, match="not binary-valued"):
        quantize_binary(w, lossless=True, name="blk.to_q")
    with pytest.raises(BonsaiError, match="blk.to_q: not ternary-valued"):
        quantize_ternary(w, lossless=True, name="blk.to_q")


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_input_dim_not_multiple_of_128_is_an_error(fmt):
    w = np.ones((4, 192), np.float32)
    quantize = quantize_binary if fmt == "binary" else quantize_ternary
    with pytest.raises(BonsaiError, match="proj: input dimension 192 is not a multiple"):
        quantize(w, name="proj")
    cls = BinaryLinear if fmt == "binary" else TernaryLinear
    with pytest.raises(BonsaiError, match="multiple of the group size 128"):
        cls(192, 4)


# ------------------------------------------------------------------ MLX affine import


def test_mlx_1bit_import_reuses_words_and_matches_quantized_linear():
    rng = np.random.default_rng(7)
    n, k = 16, 384
    w = mx.array(dense(signs(rng, n, k), group_scales(rng, n, k)))
    wq, scales, biases = mx.quantize(w, group_size=128, bits=1)
    # The MLX 1-bit convention the converter relies on: scale = 2s, bias = -s.
    assert mx.array_equal(biases, -scales / 2)

    layer = BinaryLinear.from_affine(wq, scales, biases, name="blocks.0.to_q")
    assert np.array_equal(np.array(layer.weight), np.array(wq))  # bit-exact reuse
    assert np.array_equal(np.array(layer.dequantize()), np.array(w))

    stock = nn.QuantizedLinear(k, n, bias=False, group_size=128, bits=1)
    stock.update({"weight": wq, "scales": scales, "biases": biases})
    x = mx.array(rng.standard_normal((3, k)).astype(np.float32))
    np.testing.assert_allclose(np.array(layer(x)), np.array(stock(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(stock(x)), np.array(x @ w.T), rtol=1e-5, atol=1e-5)


def test_mlx_1bit_one_sided_and_negative_scale_groups_import_exactly():
    rng = np.random.default_rng(8)
    q = signs(rng, 4, 256)
    q[0, :128] = 1  # a group of only +s: mx.quantize stores all bits 0 with bias +s
    q[1, 128:] = -1
    w = mx.array(dense(q, group_scales(rng, 4, 256)))
    wq, scales, biases = mx.quantize(w, group_size=128, bits=1)
    layer = BinaryLinear.from_affine(wq, scales, biases)
    assert np.array_equal(np.array(layer.dequantize()), np.array(w))
    # a negative scale flips what a bit means: scale = -2s, bias = +s
    w = mx.array(dense(signs(rng, 4, 256), group_scales(rng, 4, 256)))
    wq, scales, biases = mx.quantize(-w, group_size=128, bits=1)
    flipped = mx.bitwise_invert(wq)
    layer = BinaryLinear.from_affine(flipped, -scales, -biases)
    assert np.array_equal(np.array(layer.dequantize()),
                          np.array(mx.dequantize(flipped, -scales, -biases, group_size=128,
                                                 bits=1)))
    assert np.array_equal(np.array(layer.dequantize()), -np.array(w))


def bonsai_2bit_triple(q: np.ndarray, s: np.ndarray):
    """A Bonsai-style 2-bit ternary triple: codes q + 1, scale s, bias -s."""
    return (mx.array(pack_2bit_codes(q + 1)), mx.array(s.astype(np.float16)),
            mx.array((-s).astype(np.float16)))


def test_mlx_2bit_ternary_import_is_exact_and_matches_quantized_linear():
    rng = np.random.default_rng(9)
    n, k = 12, 256
    q, s = trits(rng, n, k), group_scales(rng, n, k)
    wq, scales, biases = bonsai_2bit_triple(q, s)
    # the hand-built triple really is what MLX decodes to the ternary weight
    w = dense(q, s)
    assert np.array_equal(np.array(mx.dequantize(wq, scales, biases, group_size=128, bits=2)), w)

    layer = TernaryLinear.from_affine(wq, scales, biases, name="blocks.0.ff.linear_in")
    assert np.array_equal(np.array(layer.weight), pack_ternary(q))
    assert np.array_equal(np.array(layer.dequantize()), w)

    stock = nn.QuantizedLinear(k, n, bias=False, group_size=128, bits=2)
    stock.update({"weight": wq, "scales": scales, "biases": biases})
    x = mx.array(rng.standard_normal((5, k)).astype(np.float32))
    np.testing.assert_allclose(np.array(layer(x)), np.array(stock(x)), rtol=1e-5, atol=1e-5)


def test_mlx_quantize_2bit_of_ternary_weights_is_not_ternary_and_is_rejected():
    # mx.quantize(bits=2) keeps 0 exact and so maps {-s, 0, s} to codes of {s, 0, -s/2}:
    # such a pack is not ternary, and the import must say where.
    rng = np.random.default_rng(10)
    w = mx.array(dense(trits(rng, 4, 256), group_scales(rng, 4, 256)))
    wq, scales, biases = mx.quantize(w, group_size=128, bits=2)
    with pytest.raises(BonsaiError, match=r"layer\.x: group 0 of row 0 is not ternary"):
        ternary_from_affine(wq, scales, biases, name="layer.x")


def test_corrupted_ternary_group_is_named():
    rng = np.random.default_rng(11)
    q, s = trits(rng, 3, 256), group_scales(rng, 3, 256)
    codes = q + 1
    codes[2, 130] = 3  # code 3 decodes to 2s
    wq = mx.array(pack_2bit_codes(codes))
    _, scales, biases = bonsai_2bit_triple(q, s)
    with pytest.raises(BonsaiError, match="attn.to_out: group 1 of row 2 is not ternary"):
        ternary_from_affine(wq, scales, biases, name="attn.to_out")


def test_1bit_bias_not_minus_half_scale_is_an_error():
    rng = np.random.default_rng(12)
    w = mx.array(dense(signs(rng, 3, 256), group_scales(rng, 3, 256)))
    wq, scales, biases = mx.quantize(w, group_size=128, bits=1)
    biases = np.array(biases)
    biases[1, 1] *= 0.5
    with pytest.raises(BonsaiError, match="ff.linear_out: group 1 of row 1 is not binary"):
        binary_from_affine(wq, scales, mx.array(biases), name="ff.linear_out")


def test_affine_group_size_other_than_128_is_an_error():
    w = mx.ones((2, 256))
    wq, scales, biases = mx.quantize(w, group_size=64, bits=1)
    with pytest.raises(BonsaiError, match="group size 64"):
        binary_from_affine(wq, scales, biases, group_size=64, name="l")


# ------------------------------------------------------------------ whole models


def test_packed_layer_paths_are_the_100_bonsai_layers():
    assert len(PACKED_LAYERS) == 100 == len(set(PACKED_LAYERS))
    assert sum(p.startswith("transformer_blocks.") for p in PACKED_LAYERS) == 60
    for name in ["transformer_blocks.0.attn.to_q", "transformer_blocks.4.attn.to_out.0",
                 "transformer_blocks.2.attn.to_add_out",
                 "transformer_blocks.1.ff_context.linear_out",
                 "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
                 "single_transformer_blocks.19.attn.to_out"]:
        assert name in PACKED_LAYERS
    assert packed_layer_paths(1, 1)[-1] == "single_transformer_blocks.0.attn.to_out"


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        for n in ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                  "to_add_out"]:
            setattr(self, n, nn.Linear(d, d, bias=False))
        self.to_out = [nn.Linear(d, d, bias=False)]


class _FF(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.linear_in = nn.Linear(d, 2 * d, bias=False)
        self.linear_out = nn.Linear(d, d, bias=False)


class _Double(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn, self.ff, self.ff_context = _Attn(d), _FF(d), _FF(d)


class _SingleAttn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.to_qkv_mlp_proj = nn.Linear(d, 3 * d, bias=False)
        self.to_out = nn.Linear(2 * d, d, bias=False)


class _Single(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = _SingleAttn(d)


class TinyFlux(nn.Module):
    """Just the layer names of the FLUX.2 transformer, with a dense layer left alone."""

    def __init__(self, d=128):
        super().__init__()
        self.proj_out = nn.Linear(d, 16, bias=False)
        self.transformer_blocks = [_Double(d) for _ in range(2)]
        self.single_transformer_blocks = [_Single(d) for _ in range(3)]

    def packable_layers(self):  # as Flux2Transformer lists them
        return packed_layer_paths(2, 3)


@pytest.mark.parametrize("fmt,cls,values", [("binary", BinaryLinear, signs),
                                            ("ternary", TernaryLinear, trits)])
def test_quantize_model_packs_exactly_and_loads_back(fmt, cls, values, tmp_path):
    rng = np.random.default_rng(13)
    model = TinyFlux()
    paths = packed_layer_paths(2, 3)
    originals = {}
    for p in paths:
        layer = model
        for part in p.split("."):
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        n, k = layer.weight.shape
        layer.weight = mx.array(dense(values(rng, n, k), group_scales(rng, n, k)))
        originals[p] = np.array(layer.weight)
    assert quantize_model(model, fmt) is True
    assert isinstance(model.transformer_blocks[1].attn.to_out[0], cls)
    assert isinstance(model.proj_out, nn.Linear)
    w = model.single_transformer_blocks[2].attn.to_out.dequantize()
    assert np.array_equal(np.array(w), originals["single_transformer_blocks.2.attn.to_out"])

    path = tmp_path / "packed.safetensors"
    model.save_weights(str(path))
    fresh = use_packed_layers(TinyFlux(), fmt)
    fresh.load_weights(str(path), strict=True)
    x = mx.array(rng.standard_normal((2, 128)).astype(np.float32))
    a = model.transformer_blocks[0].ff.linear_in(x)
    b = fresh.transformer_blocks[0].ff.linear_in(x)
    assert np.array_equal(np.array(a), np.array(b))


def test_quantize_model_warns_for_dense_weights():
    model = TinyFlux()
    with pytest.warns(UserWarning, match="absmean"):
        assert quantize_model(model, "ternary") is False
    with pytest.raises(BonsaiError, match="not binary-valued"):
        quantize_model(TinyFlux(), "binary", lossless=True)
