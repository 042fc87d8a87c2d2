"""Prompt encoding against diffusers' Flux2KleinPipeline on a tiny random Qwen3.

Fixtures: scripts/fixtures/make_text_encoder.py (28-layer Qwen3, hidden 64, tiny BPE
tokenizer; references from `Flux2KleinPipeline._get_qwen3_prompt_embeds` in float32).
"""

import json
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models import text_encoder as te
from bonsai_mlx.models.text_encoder import PromptEncoder
from bonsai_mlx.weights import load_weights, read_json, save_safetensors, write_json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

FIXTURE = Path(__file__).parent / "fixtures" / "text_encoder"
TEXT_ENCODER = FIXTURE / "text_encoder"
TOKENIZER = FIXTURE / "tokenizer"
CASES = json.loads((FIXTURE / "prompts.json").read_text(encoding="utf-8"))
SHORT, NON_ASCII, EMPTY, LONG = CASES["default"]["prompts"]
BOUND = 1e-4  # max abs error <= BOUND * max|ref| in float32

# Most tests use 24 tokens for speed, which truncates; the warning has its own tests.
pytestmark = pytest.mark.filterwarnings("ignore:prompt .* tokens dropped:UserWarning")


@pytest.fixture(scope="module")
def reference() -> dict[str, mx.array]:
    return mx.load(str(FIXTURE / "reference.safetensors"))


def encoder(**kwargs) -> PromptEncoder:
    kwargs.setdefault("dtype", "float32")
    return PromptEncoder.from_pretrained(TEXT_ENCODER, TOKENIZER, **kwargs)


def case_encoder(name: str, **kwargs) -> PromptEncoder:
    case = CASES[name]
    return encoder(out_layers=case["layers"], max_sequence_length=case["max_sequence_length"],
                   **kwargs)


def relative_error(out: mx.array, ref: mx.array) -> float:
    assert out.shape == ref.shape
    return (mx.abs(out - ref).max() / mx.abs(ref).max()).item()


@pytest.mark.parametrize("name", list(CASES))
def test_tokens_match_transformers(name, reference):
    ids, mask = case_encoder(name).tokenize(CASES[name]["prompts"])
    np.testing.assert_array_equal(np.array(ids), np.array(reference[f"{name}.input_ids"]))
    np.testing.assert_array_equal(np.array(mask), np.array(reference[f"{name}.attention_mask"]))


@pytest.mark.parametrize("name", list(CASES))
def test_encode_matches_diffusers_reference(name, reference):
    """Short, non-ASCII, empty and truncated prompts at 512 tokens (padded rows included),
    truncation at 24 tokens, and other layers (0 = embeddings, 28 = after the final norm)."""
    with pytest.warns(UserWarning, match="tokens dropped"):
        out = case_encoder(name).encode(CASES[name]["prompts"])
    ref = reference[f"{name}.prompt_embeds"]
    assert out.dtype == mx.float32
    assert relative_error(out, ref) <= BOUND


def test_empty_prompt_alone_matches_its_row_of_the_batch(reference):
    enc = encoder(max_sequence_length=512)
    ref = reference["default.prompt_embeds"]
    out = enc.encode(EMPTY)
    assert out.shape == (1, 512, 3 * 64)
    assert relative_error(out, ref[2:3]) <= BOUND


def test_truncation_warns_how_many_tokens_were_dropped():
    dropped = CASES["default"]["dropped_tokens"][3]
    enc = encoder()
    with pytest.warns(UserWarning, match=f"truncated to 512, {dropped} tokens dropped"):
        enc.tokenize([LONG])


def test_prompt_that_fits_does_not_warn(recwarn):
    encoder().tokenize([SHORT, EMPTY])
    assert not [w for w in recwarn if "dropped" in str(w.message)]


def test_encoder_weights_are_released_after_encode(monkeypatch):
    loaded = []

    def load_and_watch(*args):
        model = load(*args)
        loaded.append(weakref.ref(model))
        return model

    load = te.load_qwen3_encoder
    monkeypatch.setattr(te, "load_qwen3_encoder", load_and_watch)
    enc = encoder(max_sequence_length=24)
    mx.clear_cache()
    before = mx.get_active_memory()
    out = enc.encode(SHORT)
    after = mx.get_active_memory()
    assert enc.model is None and loaded[0]() is None
    weights_bytes = sum(v.nbytes for v in load_weights(TEXT_ENCODER).values()) * 2  # as f32
    assert after - before <= out.nbytes + weights_bytes // 10

    kept = encoder(max_sequence_length=24, keep_loaded=True)
    kept.encode(SHORT)
    assert kept.model is not None
    kept.encode(NON_ASCII)
    assert kept.loads == 1


def test_memory_cache_skips_the_model(monkeypatch):
    enc = encoder(max_sequence_length=24)
    first = enc.encode([SHORT, NON_ASCII])
    assert enc.loads == 1

    def fail(*args):
        raise AssertionError("the cached prompt must not load the model")

    monkeypatch.setattr(te, "load_qwen3_encoder", fail)
    again = enc.encode([NON_ASCII, SHORT, SHORT])
    assert again.shape == (3, 24, 192)
    np.testing.assert_array_equal(np.array(again[0]), np.array(first[1]))
    np.testing.assert_array_equal(np.array(again[2]), np.array(first[0]))


def test_memory_cache_evicts_the_least_recently_used():
    enc = encoder(max_sequence_length=24, cache_size=2)
    enc.encode("a")
    enc.encode("b")
    enc.encode("a")  # a is now the most recent
    enc.encode("c")  # evicts b
    assert enc.loads == 3
    enc.encode("a")
    assert enc.loads == 3
    enc.encode("b")
    assert enc.loads == 4


def test_disk_cache_survives_a_new_encoder(tmp_path, reference):
    first = encoder(max_sequence_length=24, cache_dir=tmp_path)
    out = first.encode(SHORT)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    second = encoder(max_sequence_length=24, cache_dir=tmp_path)
    again = second.encode(SHORT)
    assert second.loads == 0
    np.testing.assert_array_equal(np.array(again), np.array(out))
    assert relative_error(again, reference["truncate_24.prompt_embeds"][:1]) <= BOUND

    other_length = encoder(max_sequence_length=32, cache_dir=tmp_path)
    other_length.encode(SHORT)
    assert other_length.loads == 1
    other_layers = encoder(max_sequence_length=24, out_layers=(1, 2), cache_dir=tmp_path)
    other_layers.encode(SHORT)
    assert other_layers.loads == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_disk_cache_ignores_a_corrupt_entry(tmp_path):
    first = encoder(max_sequence_length=24, cache_dir=tmp_path)
    out = first.encode(SHORT)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"not a safetensors file")
    second = encoder(max_sequence_length=24, cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="is unusable"):
        np.testing.assert_array_equal(np.array(second.encode(SHORT)), np.array(out))
    assert second.loads == 1


def test_only_the_layers_used_are_needed(tmp_path):
    """Layers past the deepest requested one, the final norm and lm_head are never read."""
    cut = tmp_path / "text_encoder"
    cut.mkdir()
    shutil.copy(TEXT_ENCODER / "config.json", cut / "config.json")
    weights = load_weights(TEXT_ENCODER)
    keep = {k: v for k, v in weights.items()
            if k.startswith("model.embed_tokens.") or k.startswith(("model.layers.0.",
                                                                     "model.layers.1."))}
    save_safetensors(cut / "model.safetensors", keep)

    enc = PromptEncoder.from_pretrained(cut, TOKENIZER, dtype="float32", out_layers=(1, 2),
                                        max_sequence_length=24, keep_loaded=True)
    assert enc.encode(SHORT).shape == (1, 24, 128)
    assert len(enc.model.model.layers) == 2 and "norm" not in enc.model.model

    deep = PromptEncoder.from_pretrained(cut, TOKENIZER, dtype="float32",
                                         max_sequence_length=24)
    # Layers 2..26: 25 x 11 tensors; not the final norm, not layer 27 or lm_head.
    with pytest.raises(BonsaiError, match=r"missing \(275\): model\.layers\.10\."):
        deep.encode(SHORT)


def test_skipped_layers_are_never_read_from_disk():
    """mx.load is lazy: building 1 layer of 28 touches about 1/28 of the weights."""
    import gc
    import statistics

    def peak(n: int) -> int:
        gc.collect()  # arrays of earlier tests freed now, not while this one measures
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        model = te.load_qwen3_encoder(TEXT_ENCODER, n, "float32")
        del model
        return mx.get_peak_memory() - before

    # the median of three: memory another thread frees or takes meanwhile moves one sample
    peaks = {n: statistics.median(peak(n) for _ in range(3)) for n in (1, 27)}
    assert peaks[1] < peaks[27] / 5, peaks


def mlx_lm_quantized_copy(dst: Path, bits: int) -> Path:
    """The tiny encoder converted with mlx-lm's own tools (as `mlx_lm.convert -q` does)."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    model, config = load_model(TEXT_ENCODER)
    model, config = quantize_model(model, config, group_size=64, bits=bits)
    save_model(dst, model)
    save_config(config, dst / "config.json")
    return dst


def as_float32(model: nn.Module) -> nn.Module:
    model.update(tree_map(
        lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x,
        model.parameters(),
    ))
    return model


def test_mlx_lm_4bit_layout_loads_and_runs(tmp_path):
    from mlx_lm.utils import dequantize_model, load_model, save_config, save_model

    quantized = mlx_lm_quantized_copy(tmp_path / "text_encoder-mlx-4bit", bits=4)
    config = read_json(quantized / "config.json")
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert "model.layers.0.self_attn.q_proj.scales" in load_weights(quantized)

    enc = PromptEncoder.from_pretrained(quantized, TOKENIZER, dtype="float32",
                                        max_sequence_length=24, keep_loaded=True)
    out = enc.encode([SHORT, NON_ASCII])
    assert isinstance(enc.model.model.layers[26].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(enc.model.model.embed_tokens, nn.QuantizedEmbedding)

    # The same weights dequantized by mlx-lm (in float32), through the float path.
    model, config = load_model(quantized)
    config.pop("quantization")
    config.pop("quantization_config")
    dequantized = tmp_path / "dequantized"
    save_model(dequantized, dequantize_model(as_float32(model)))
    save_config(config, dequantized / "config.json")
    dense = PromptEncoder.from_pretrained(dequantized, TOKENIZER, dtype="float32",
                                          max_sequence_length=24).encode([SHORT, NON_ASCII])
    assert relative_error(out, dense) <= BOUND

    # mlx-lm's own Qwen3 on the 24 unpadded tokens: its output (after the final norm) is
    # hidden state 28.
    ids, _ = enc.tokenize([SHORT])
    model, _ = load_model(quantized)
    theirs = as_float32(model).model(ids)
    last = PromptEncoder.from_pretrained(quantized, TOKENIZER, dtype="float32",
                                         out_layers=(28,), max_sequence_length=24)
    assert relative_error(last.encode(SHORT), theirs) <= BOUND


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_bits_at_load_equals_mlx_lm_convert(tmp_path, bits):
    enc = encoder(dtype="bfloat16", max_sequence_length=24, quantize_bits=bits,
                  keep_loaded=True)
    out = enc.encode([SHORT, NON_ASCII])
    q_proj = enc.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear) and q_proj.bits == bits

    converted = mlx_lm_quantized_copy(tmp_path / f"q{bits}", bits=bits)
    ref = PromptEncoder.from_pretrained(converted, TOKENIZER, dtype="bfloat16",
                                        max_sequence_length=24).encode([SHORT, NON_ASCII])
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)),
                                  np.array(ref.astype(mx.float32)))

    with pytest.raises(BonsaiError, match="quantize_bits"):
        encoder(quantize_bits=3)


def test_quantized_checkpoint_refuses_other_bits(tmp_path):
    quantized = mlx_lm_quantized_copy(tmp_path / "q4", bits=4)
    enc = PromptEncoder.from_pretrained(quantized, TOKENIZER, quantize_bits=8,
                                        max_sequence_length=24)
    with pytest.raises(BonsaiError, match="already quantized to 4 bits"):
        enc.encode(SHORT)


def test_bfloat16_is_the_default_dtype(reference):
    enc = PromptEncoder.from_pretrained(TEXT_ENCODER, TOKENIZER, max_sequence_length=24)
    out = enc.encode(SHORT)
    assert out.dtype == mx.bfloat16
    assert relative_error(out.astype(mx.float32), reference["truncate_24.prompt_embeds"][:1]) < 0.05


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(BonsaiError, match=str(tmp_path / "nowhere")):
        PromptEncoder.from_pretrained(tmp_path / "nowhere", TOKENIZER)
    with pytest.raises(BonsaiError, match="out_layers"):
        encoder(out_layers=(9, 29))
    with pytest.raises(BonsaiError, match="no_tokenizer"):
        PromptEncoder.from_pretrained(TEXT_ENCODER, tmp_path / "no_tokenizer")

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    write_json(wrong / "config.json", {**read_json(TEXT_ENCODER / "config.json"),
                                       "model_type": "llama"})
    with pytest.raises(BonsaiError, match="model_type"):
        PromptEncoder.from_pretrained(wrong, TOKENIZER)

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(TEXT_ENCODER / "config.json", empty / "config.json")
    with pytest.raises(BonsaiError, match=str(empty)):
        PromptEncoder.from_pretrained(empty, TOKENIZER, max_sequence_length=24).encode("x")

    with pytest.raises(BonsaiError, match="prompt"):
        encoder().encode([])


# ---- dequantized layers (MLX's CPU backend) -------------------------------------------


@pytest.fixture(scope="module")
def quantized_4bit(tmp_path_factory) -> Path:
    return mlx_lm_quantized_copy(tmp_path_factory.mktemp("q4") / "text_encoder-mlx-4bit", 4)


def count_quantized_matmuls(monkeypatch) -> list:
    calls = []
    quantized_matmul = mx.quantized_matmul

    def counting(*args, **kwargs):
        calls.append(1)
        return quantized_matmul(*args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", counting)
    return calls


def test_dequantized_layers_equal_quantized_matmul(quantized_4bit, monkeypatch):
    """The 4-bit mlx-lm layout, each layer dequantized to float32 and run with plain matmuls,
    gives the quantized_matmul path's embeddings to float32 rounding (27 layers deep)."""
    calls = count_quantized_matmuls(monkeypatch)
    kwargs = dict(dtype="float32", max_sequence_length=24, keep_loaded=True)
    quantized = PromptEncoder.from_pretrained(quantized_4bit, TOKENIZER, dequantize=False,
                                              **kwargs)
    ref = quantized.encode([SHORT, NON_ASCII, EMPTY])
    assert len(calls) == 27 * 7  # 7 linears per layer
    calls.clear()

    dequantized = PromptEncoder.from_pretrained(quantized_4bit, TOKENIZER, dequantize=True,
                                                **kwargs)
    out = dequantized.encode([SHORT, NON_ASCII, EMPTY])
    assert not calls
    assert relative_error(out, ref) <= 1e-5
    # The model keeps its quantized layers: only the run used float ones.
    assert isinstance(dequantized.model.model.layers[26].mlp.down_proj, nn.QuantizedLinear)


def test_dequantized_run_holds_one_layer_of_float_weights(quantized_4bit):
    enc = PromptEncoder.from_pretrained(quantized_4bit, TOKENIZER, dtype="float32",
                                        max_sequence_length=24, keep_loaded=True,
                                        dequantize=True)
    enc.encode("warm up")  # loads the weights
    layer = enc.model.model.layers[0]
    with te.dequantized_linears(layer):
        layer_bytes = sum(v.nbytes for _, v in tree_flatten(layer.parameters()))
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    enc.encode(SHORT)
    grown = mx.get_peak_memory() - before
    assert grown < 2 * layer_bytes  # all 27 float layers would be 27 x layer_bytes


def test_dequantized_linears_are_put_back_after_an_error(quantized_4bit):
    model = te.load_qwen3_encoder(quantized_4bit, 1, "float32")
    layer = model.model.layers[0]
    with pytest.raises(RuntimeError), te.dequantized_linears(layer):
        assert isinstance(layer.self_attn.q_proj, te.DequantizedLinear)
        raise RuntimeError
    assert isinstance(layer.self_attn.q_proj, nn.QuantizedLinear)
    assert not any(isinstance(m, te.DequantizedLinear) for _, m in layer.named_modules())


def test_dequantize_auto_is_on_for_the_cpu_only(monkeypatch):
    monkeypatch.delenv(te.DEQUANTIZE_ENV, raising=False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert te.should_dequantize("auto") is True
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert te.should_dequantize("auto") is False  # Apple GPUs keep quantized_matmul
    assert te.should_dequantize(True) is True
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert te.should_dequantize(False) is False

    monkeypatch.setenv(te.DEQUANTIZE_ENV, "0")
    assert te.should_dequantize("auto") is False
    assert te.should_dequantize(True) is True  # an explicit choice beats the environment
    monkeypatch.setenv(te.DEQUANTIZE_ENV, "true")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert te.should_dequantize("auto") is True
    monkeypatch.setenv(te.DEQUANTIZE_ENV, "maybe")
    with pytest.raises(BonsaiError, match=te.DEQUANTIZE_ENV):
        te.should_dequantize("auto")
    with pytest.raises(BonsaiError, match="dequantize"):
        encoder(dequantize="yes")


def test_mlx_lm_is_imported_only_when_the_model_is_built():
    """mlx-lm imports transformers (seconds): importing bonsai_mlx and making a
    PromptEncoder must not."""
    code = (
        "import sys, bonsai_mlx.pipeline\n"
        "from bonsai_mlx.models.text_encoder import PromptEncoder\n"
        f"PromptEncoder({str(TEXT_ENCODER)!r}, {str(TOKENIZER)!r})\n"
        "print(sorted(m for m in ('mlx_lm', 'transformers', 'torch') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_dequantized_bfloat16_encoder_computes_in_float32(quantized_4bit, monkeypatch):
    """bfloat16 matmuls are slow on the CPU: the dequantized layers run in float32 and the
    embeddings come back in bfloat16, no further from float32 than the quantized path."""
    prompts = [SHORT, NON_ASCII, EMPTY]
    ref = PromptEncoder.from_pretrained(quantized_4bit, TOKENIZER, dtype="float32",
                                        max_sequence_length=24, dequantize=False).encode(prompts)
    kwargs = dict(dtype="bfloat16", max_sequence_length=24, keep_loaded=True)
    quantized = PromptEncoder.from_pretrained(quantized_4bit, TOKENIZER, dequantize=False,
                                              **kwargs).encode(prompts)
    calls = count_quantized_matmuls(monkeypatch)
    enc = PromptEncoder.from_pretrained(quantized_4bit, TOKENIZER, dequantize=True, **kwargs)
    out = enc.encode(prompts)
    assert not calls and out.dtype == mx.bfloat16
    error = relative_error(out.astype(mx.float32), ref)
    assert error <= relative_error(quantized.astype(mx.float32), ref) and error < 0.05

    ids, mask = enc.tokenize([SHORT])
    assert enc.model(ids, mask, (9, 18, 27), dequantize=True).dtype == mx.float32
    assert enc.model(ids, mask, (9, 18, 27), dequantize=False).dtype == mx.bfloat16
