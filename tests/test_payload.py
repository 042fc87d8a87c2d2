"""The smaller payload (issue 10): a text encoder trimmed to the layers FLUX.2 reads gives
bit-identical prompt embeddings and refuses deeper layers; converting a pack drops exactly the
removed layers' bytes with bit-identical images; text-to-image never loads the VAE encoder;
the full-size byte accounting (scripts/payload.py) matches real files and meets the goals."""

import importlib.util
import json
import sys
from pathlib import Path

from bonsai_mlx.convert import convert, payload
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.info import describe_folder
from bonsai_mlx.models.text_encoder import PromptEncoder, save_text_encoder
from bonsai_mlx.models.vae import VAE, VAEConfig
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.weights import load_weights, read_json

import mlx.core as mx
import numpy as np
import pytest
from bonsai_packs import (
    TEXT_ENCODER,
    TOKENIZER,
    dense_transformer_weights,
    generate,
    mlx_lm_4bit,
    tensor_bytes,
    write_bonsai_pack,
)
from mlx.utils import tree_flatten

PROMPTS = ["a bonsai tree in the mist", "", "Ünïcödé prompt, with punctuation!"]
SCRIPTS = Path(__file__).parents[1] / "scripts"


def encode(folder, out_layers=(9, 18, 27)):
    enc = PromptEncoder.from_pretrained(folder, TOKENIZER, dtype="float32",
                                        out_layers=out_layers, max_sequence_length=64)
    return np.array(enc.encode(PROMPTS))


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("payload")
    return write_bonsai_pack(root / "pack", dense_transformer_weights("binary", seed=3), 1)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_trimmed_text_encoder_gives_bit_identical_embeddings(bits, tmp_path):
    """Trimmed at `bits` from the float checkpoint == mlx-lm's own full `bits` conversion,
    and trimming that conversion changes nothing either."""
    full = mlx_lm_4bit(tmp_path / "full", bits=bits)
    trimmed = tmp_path / "trimmed"
    config = save_text_encoder(TEXT_ENCODER, trimmed, (9, 18, 27), bits=bits)
    assert config["num_hidden_layers"] == 27
    assert config["bonsai_mlx_truncated"] == {"source_num_hidden_layers": 28,
                                              "out_layers": [9, 18, 27]}
    assert config["quantization"]["bits"] == bits
    reference = encode(full)
    assert np.array_equal(encode(trimmed), reference)
    save_text_encoder(full, tmp_path / "trimmed-again", (9, 18, 27), bits=bits)
    assert np.array_equal(encode(tmp_path / "trimmed-again"), reference)
    # the kept tensors are mlx-lm's, bit for bit
    a, b = load_weights(trimmed), load_weights(full)
    assert set(a) < set(b)
    assert all(a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item() for k in a)


def test_trimmed_float_text_encoder_and_other_layer_sets(tmp_path):
    save_text_encoder(TEXT_ENCODER, tmp_path / "f", (9, 18, 27), bits=16)
    assert np.array_equal(encode(tmp_path / "f"), encode(TEXT_ENCODER))
    # a shallower set keeps fewer layers; asking for layer 28 of 28 keeps the final norm
    save_text_encoder(TEXT_ENCODER, tmp_path / "s", (2, 5), bits=16)
    assert read_json(tmp_path / "s" / "config.json")["num_hidden_layers"] == 5
    assert np.array_equal(encode(tmp_path / "s", (2, 5)), encode(TEXT_ENCODER, (2, 5)))
    save_text_encoder(TEXT_ENCODER, tmp_path / "n", (28,), bits=16)
    assert "bonsai_mlx_truncated" not in read_json(tmp_path / "n" / "config.json")
    assert np.array_equal(encode(tmp_path / "n", (28,)), encode(TEXT_ENCODER, (28,)))


def test_deeper_layer_than_stored_is_refused(tmp_path):
    save_text_encoder(TEXT_ENCODER, tmp_path / "te", (9, 18, 27), bits=4)
    with pytest.raises(BonsaiError, match=r"holds only the first 27 of Qwen3's 28 layers "
                                          r".*layer 28 is requested.*untruncated"):
        PromptEncoder.from_pretrained(tmp_path / "te", TOKENIZER, out_layers=(9, 18, 28))
    with pytest.raises(BonsaiError, match="text encoder bits must be 3, 4, 8 or 16"):
        save_text_encoder(TEXT_ENCODER, tmp_path / "x", bits=2)


def test_converted_pack_drops_exactly_the_removed_layers(pack, tmp_path):
    report = convert(pack, tmp_path / "out", None, echo=None)
    before = tensor_bytes(pack / "text_encoder-mlx-4bit")
    after = tensor_bytes(tmp_path / "out" / "text_encoder")
    removed = {k: n for k, n in before.items() if k.startswith(("model.layers.27.",
                                                                 "model.norm."))}
    assert removed and set(after) == set(before) - set(removed)
    assert sum(after.values()) == sum(before.values()) - sum(removed.values())
    # on disk: the weight file shrinks by those bytes and their header entries (and mlx-lm's
    # model.safetensors.index.json, not needed for one file, is not written)
    file_drop = ((pack / "text_encoder-mlx-4bit" / "model.safetensors").stat().st_size
                 - (tmp_path / "out" / "text_encoder" / "model.safetensors").stat().st_size)
    assert 0 <= file_drop - sum(removed.values()) < 4096
    assert report.before["text_encoder"] - report.after["text_encoder"] >= file_drop
    assert report.after == payload(tmp_path / "out")
    assert report.after["vae"] == report.before["vae"]  # encoder kept, bytes as stored
    image = generate(Pipeline.from_pretrained(pack, dtype="float32"))
    assert np.array_equal(generate(Pipeline.from_pretrained(tmp_path / "out",
                                                            dtype="float32")), image)

    formats = {c.name: c.format for c in describe_folder(tmp_path / "out")}  # bonsai-mlx info
    assert formats["transformer"].startswith("binary packed (bonsai-mlx)")
    assert formats["text_encoder"] == "MLX affine 4-bit, group 64"


def test_text_to_image_never_loads_the_vae_encoder(pack, monkeypatch):
    def refuse(self):
        raise AssertionError("text-to-image loaded the VAE encoder")

    mx.clear_cache()
    before = mx.get_active_memory()
    vae = VAE.from_pretrained(pack / "vae", dtype="float32")
    loaded = mx.get_active_memory() - before
    held = sum(v.nbytes for _, v in tree_flatten(vae.parameters()))
    file_tensors = tensor_bytes(pack / "vae")  # bfloat16 on disk, float32 in memory
    encoder = 2 * sum(n for k, n in file_tensors.items() if k.startswith(("encoder.",
                                                                            "quant_conv.")))
    decoder = 2 * sum(n for k, n in file_tensors.items() if k.startswith(("decoder.",
                                                                            "post_quant_conv.")))
    assert not vae.encoder_loaded and held < decoder + 4096
    assert loaded < decoder + encoder / 2  # the encoder's tensors are not in memory

    monkeypatch.setattr(VAE, "load_encoder", refuse)
    pipe = Pipeline.from_pretrained(pack, dtype="float32")
    assert np.isfinite(generate(pipe)).all()
    assert not pipe.vae.encoder_loaded


def load_script(name):
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def test_full_size_accounting_matches_real_files_and_meets_the_goals(tmp_path):
    payload_script = load_script("payload")
    # The arithmetic, applied to the tiny fixtures' shapes, gives their real tensor bytes.
    tiny = read_json(TEXT_ENCODER / "config.json")
    full = mlx_lm_4bit(tmp_path / "full", bits=4)
    assert payload_script.text_encoder_bytes(tiny, None, 4)["tensors"] == sum(
        tensor_bytes(full).values())
    save_text_encoder(TEXT_ENCODER, tmp_path / "cut", (9, 18, 27), bits=3)
    assert payload_script.text_encoder_bytes(tiny, 27, 3)["tensors"] == sum(
        tensor_bytes(tmp_path / "cut").values())
    vae_dir = Path(__file__).parent / "fixtures" / "pipeline" / "distilled" / "vae"
    config = VAEConfig.from_dict(json.loads((vae_dir / "config.json").read_text()))
    assert payload_script.vae_bytes(config, mx.bfloat16)["tensors"] == sum(
        tensor_bytes(vae_dir).values())

    rows = {(r["format"], r["variant"]): r for r in payload_script.payload_table()}
    for fmt, goal, published in (("binary", 2.9e9, 3.42e9), ("ternary", 3.2e9, 3.88e9)):
        ours = rows[(fmt, "bonsai-mlx, dense 16-bit, text encoder 4-bit")]
        theirs = rows[(fmt, "published MLX pack")]
        assert ours["total"] <= goal
        assert abs(theirs["total"] - published) < 0.05e9  # the published sizes, reproduced
    te = payload_script.text_encoder_bytes(payload_script.QWEN3_4B, None, 4)["tensors"]
    assert abs(te - 2.28e9) < 0.03e9


def test_9b_and_small_decoder_accounting():
    """scripts/payload.py's 9B rows against closed-form parameter counts of FLUX.2 [klein] 9B
    (8 double + 24 single blocks, width 4096 = 32 heads x 128, MLP 12288, joint 12288) and of
    Qwen3-8B (8.19 B parameters with its own lm_head: the model card's "8.2B")."""
    payload_script = load_script("payload")
    d, f, j, heads_dim = 4096, 12288, 12288, 128
    double = 8 * d * d + 2 * (2 * f * d + d * f) + 4 * heads_dim
    single = (3 * d + 2 * f) * d + d * (d + f) + 2 * heads_dim
    top = d * 128 + d * j + d * 256 + d * d + 2 * 6 * d * d + 3 * d * d + 2 * d * d + 128 * d
    params = top + 8 * double + 24 * single
    rows = payload_script.payload_table_9b()
    published = rows[0]
    assert published["variant"].startswith("published")
    assert 0 <= published["transformer"] - 2 * params < 1e6  # bf16 + the header estimate
    assert abs(2 * params - 18.16e9) < 0.01e9
    h, i, v, layers = 4096, 12288, 151936, 36
    layer = h * 32 * 128 + 2 * h * 8 * 128 + 32 * 128 * h + 3 * h * i + 2 * h + 2 * 128
    qwen3_8b = 2 * v * h + layers * layer + h
    assert 0 <= published["text_encoder"] - 2 * qwen3_8b < 1e6
    assert abs(qwen3_8b - 8.19e9) < 0.01e9
    ternary = next(r for r in rows if r["variant"] == "bonsai-mlx, dense 16-bit, text "
                   "encoder 4-bit" and r["format"] == "ternary")
    assert ternary["total"] < published["total"] / 5
    # the small decoder: only the decoder's channels change, the encoder is the same
    full, small = payload_script.vae_bytes(), payload_script.vae_bytes(
        payload_script.SMALL_DECODER)
    assert small["encoder"] == full["encoder"] and 0.5 < small["decoder"] / full["decoder"] < 0.6
