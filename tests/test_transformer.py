"""Flux2Transformer against diffusers' Flux2Transformer2DModel (fixtures from
scripts/fixtures/make_transformer.py: two tiny random models, saved in diffusers' and in
Black Forest Labs' single-file layout, with diffusers' float32 outputs)."""

import shutil
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models import Flux2Transformer, Flux2TransformerConfig
from bonsai_mlx.models.transformer import ContextMemo, infer_config, sanitize
from bonsai_mlx.weights import load_weights, read_json, save_safetensors

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

HERE = Path(__file__).parent / "fixtures" / "transformer"
LAYOUTS = {
    "tiny_a": ["transformer", "bfl/flux-2-tiny-a.safetensors"],  # BFL: prefixed, no config
    "tiny_b": ["transformer", "bfl/flux-2-tiny-b.safetensors"],  # sharded; BFL bare + config
}
CASES = [(name, layout) for name, layouts in LAYOUTS.items() for layout in layouts]

# Bounds on max |ours - diffusers float32| / max |diffusers float32|.
FLOAT32_BOUND = 1e-4
FLOAT16_BOUND = 5e-3
BFLOAT16_BOUND = 3e-2  # bf16 keeps 8 mantissa bits: ~4e-3 per rounding, a few layers deep


def reference(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(HERE / name / "reference.npz"))


def run(model: Flux2Transformer, ref: dict, **overrides) -> np.ndarray:
    args = {k: ref[k] for k in ("hidden_states", "encoder_hidden_states", "timestep",
                                "img_ids", "txt_ids")}
    args["guidance"] = ref.get("guidance")
    args.update(overrides)
    out = model(**args)
    return np.array(out.astype(mx.float32))


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def tiny_a() -> Flux2Transformer:
    return Flux2Transformer.from_pretrained(HERE / "tiny_a" / "transformer", dtype="float32")


@pytest.mark.parametrize("name,layout", CASES)
def test_float32_matches_diffusers(name, layout):
    ref = reference(name)
    model = Flux2Transformer.from_pretrained(HERE / name / layout, dtype="float32")
    out = run(model, ref)
    assert out.shape == ref["output"].shape
    assert rel_error(out, ref["output"]) <= FLOAT32_BOUND


@pytest.mark.parametrize("name,layout", CASES)
@pytest.mark.parametrize("dtype,bound", [("bfloat16", BFLOAT16_BOUND), ("float16", FLOAT16_BOUND)])
def test_half_precision_within_stated_bound(name, layout, dtype, bound):
    ref = reference(name)
    model = Flux2Transformer.from_pretrained(HERE / name / layout, dtype=dtype)
    assert model.dtype == getattr(mx, dtype)
    assert all(p.dtype == model.dtype for _, p in tree_flatten(model.parameters()))
    out = model(ref["hidden_states"], ref["encoder_hidden_states"], ref["timestep"],
                ref["img_ids"], ref["txt_ids"], guidance=ref.get("guidance"))
    assert out.dtype == model.dtype
    assert rel_error(np.array(out.astype(mx.float32)), ref["output"]) <= bound


@pytest.mark.slow
def test_compiled_path_matches_diffusers(tiny_a):
    """mx.compile is used on GPUs only; force it here so the fused path is checked too."""
    model = Flux2Transformer.from_pretrained(HERE / "tiny_a" / "transformer", dtype="float32",
                                             compile=True)
    assert model.compiled and not tiny_a.compiled  # this machine's default: CPU, eager
    ref = reference("tiny_a")
    assert rel_error(run(model, ref), ref["output"]) <= FLOAT32_BOUND


def test_default_dtype_is_bfloat16():
    model = Flux2Transformer.from_pretrained(HERE / "tiny_a" / "transformer")
    assert model.dtype == mx.bfloat16


def test_model_root_folder_finds_transformer_subfolder(tiny_a):
    ref = reference("tiny_a")
    model = Flux2Transformer.from_pretrained(HERE / "tiny_a", dtype="float32")
    np.testing.assert_array_equal(run(model, ref), run(tiny_a, ref))


@pytest.mark.parametrize("name", LAYOUTS)
def test_bfl_single_file_gives_the_diffusers_weights(name):
    diffusers = load_weights(HERE / name / "transformer")
    bfl = sanitize(load_weights(HERE / name / LAYOUTS[name][1]))
    assert sorted(bfl) == sorted(diffusers)
    for k, v in diffusers.items():
        assert mx.array_equal(bfl[k], v), k


def test_sanitize_leaves_diffusers_names_alone():
    weights = load_weights(HERE / "tiny_b" / "transformer")
    out = Flux2Transformer.sanitize(weights)
    assert sorted(out) == sorted(weights)


def test_config_inferred_from_bfl_shapes_equals_diffusers_config():
    weights = sanitize(load_weights(HERE / "tiny_a" / LAYOUTS["tiny_a"][1]))
    inferred = infer_config(weights, "tiny_a")
    expected = Flux2TransformerConfig.from_dict(read_json(HERE / "tiny_a/transformer/config.json"))
    assert inferred == expected


def test_config_from_dict_ignores_unknown_keys_and_rejects_bad_rope_split():
    cfg = Flux2TransformerConfig.from_dict({"_class_name": "x", "_diffusers_version": "0",
                                            "num_layers": 3, "in_channels": 64})
    assert (cfg.num_layers, cfg.in_channels, cfg.out_channels) == (3, 64, 64)
    with pytest.raises(BonsaiError, match="axes_dims_rope"):
        Flux2TransformerConfig(attention_head_dim=128, axes_dims_rope=(32, 32, 32, 30))


def test_klein_4b_shapes_and_parameter_count():
    """Default config = Klein 4B; spec: 3,875,536,896 linear + 7,680 q/k-norm parameters."""
    model = Flux2Transformer(Flux2TransformerConfig())  # lazy: nothing is allocated
    params = dict(tree_flatten(model.parameters()))
    linear = sum(p.size for p in params.values() if p.ndim == 2)
    norms = sum(p.size for p in params.values() if p.ndim == 1)
    assert (linear, norms) == (3_875_536_896, 7_680)
    assert params["single_transformer_blocks.3.attn.to_qkv_mlp_proj.weight"].shape == (27648, 3072)
    assert params["transformer_blocks.0.attn.to_out.0.weight"].shape == (3072, 3072)
    assert params["transformer_blocks.4.ff.linear_in.weight"].shape == (18432, 3072)
    assert params["norm_out.linear.weight"].shape == (6144, 3072)


def test_the_100_packable_layers_are_plain_linears():
    model = Flux2Transformer(Flux2TransformerConfig())
    modules = dict(model.named_modules())
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.linear_in",
              "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
    paths = [f"transformer_blocks.{i}.{n}" for i in range(5) for n in double]
    paths += [f"single_transformer_blocks.{i}.attn.{n}" for i in range(20)
              for n in ("to_qkv_mlp_proj", "to_out")]
    assert len(paths) == 100
    for p in paths:
        assert type(modules[p]) is nn.Linear and "bias" not in modules[p], p


def test_swapped_linear_is_used(tiny_a):
    """The quant code swaps layers by path; the forward pass must go through the module."""
    ref = reference("tiny_a")
    model = Flux2Transformer.from_pretrained(HERE / "tiny_a" / "transformer", dtype="float32")
    layer = model.single_transformer_blocks[1].attn.to_out
    zero = nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias=False)
    zero.weight = mx.zeros_like(layer.weight)
    model.update_modules({"single_transformer_blocks": [{}, {"attn": {"to_out": zero}}]})
    assert rel_error(run(model, ref), run(tiny_a, ref)) > 1e-2


@pytest.mark.parametrize("name", LAYOUTS)
def test_2d_and_3d_ids_give_the_same_output(name):
    ref = reference(name)
    model = Flux2Transformer.from_pretrained(HERE / name / "transformer", dtype="float32")
    img, txt = ref["img_ids"], ref["txt_ids"]
    img2, txt2 = (img[0], txt[0]) if img.ndim == 3 else (img, txt)
    b = ref["hidden_states"].shape[0]
    img3, txt3 = np.broadcast_to(img2, (b, *img2.shape)), np.broadcast_to(txt2, (b, *txt2.shape))
    out2 = run(model, ref, img_ids=img2, txt_ids=txt2)
    out3 = run(model, ref, img_ids=img3, txt_ids=txt3)
    np.testing.assert_array_equal(out2, out3)
    assert rel_error(out2, ref["output"]) <= FLOAT32_BOUND


@pytest.mark.parametrize("name", LAYOUTS)
def test_rope_tables_match_diffusers(name):
    """diffusers' tables repeat each (cos, sin) for the pair (2j, 2j+1); ours hold it once."""
    ref = reference(name)
    cfg = Flux2TransformerConfig.from_dict(read_json(HERE / name / "transformer/config.json"))
    model = Flux2Transformer(cfg, dtype="float32")
    cos, sin = model.rope_tables(ref["img_ids"], ref["txt_ids"])
    np.testing.assert_array_equal(ref["rope_cos"][:, 0::2], ref["rope_cos"][:, 1::2])
    np.testing.assert_allclose(np.array(cos), ref["rope_cos"][:, 0::2], rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.array(sin), ref["rope_sin"][:, 0::2], rtol=0, atol=1e-7)


def test_precomputed_rope_equals_recomputed(tiny_a):
    ref = reference("tiny_a")
    rope = tiny_a.rope_tables(mx.array(ref["img_ids"]), mx.array(ref["txt_ids"]))
    with_rope = run(tiny_a, ref, img_ids=None, txt_ids=None, rope=rope)
    np.testing.assert_array_equal(with_rope, run(tiny_a, ref))


def test_rope_for_other_ids_is_rejected(tiny_a):
    ref = reference("tiny_a")
    rope = tiny_a.rope_tables(ref["img_ids"][:, :4], ref["txt_ids"])
    with pytest.raises(BonsaiError, match="RoPE tables cover"):
        run(tiny_a, ref, rope=rope)


def test_numpy_and_mlx_inputs_agree(tiny_a):
    ref = reference("tiny_a")
    as_mx = {k: mx.array(ref[k]) for k in ("hidden_states", "encoder_hidden_states",
                                           "timestep", "img_ids", "txt_ids")}
    np.testing.assert_array_equal(run(tiny_a, ref, **as_mx), run(tiny_a, ref))


def test_scalar_timestep_broadcasts_over_the_batch(tiny_a):
    ref = reference("tiny_a")
    t = float(ref["timestep"][0])
    out = run(tiny_a, ref, timestep=t)
    np.testing.assert_array_equal(out, run(tiny_a, ref, timestep=np.full(2, t, np.float32)))


@pytest.mark.parametrize("arg,value,match", [
    ("hidden_states", np.zeros((2, 20, 7), np.float32), "hidden_states must be"),
    ("encoder_hidden_states", np.zeros((2, 8, 25), np.float32), "encoder_hidden_states must be"),
    ("timestep", np.zeros(3, np.float32), "timestep must be"),
])
def test_wrong_input_shapes_are_clear_errors(tiny_a, arg, value, match):
    with pytest.raises(BonsaiError, match=match):
        run(tiny_a, reference("tiny_a"), **{arg: value})


def test_text_projection_reuse_never_returns_a_stale_result():
    ref = reference("tiny_a")
    model = Flux2Transformer.from_pretrained(HERE / "tiny_a" / "transformer", dtype="float32")
    memo = ContextMemo()  # one generation's
    c1 = mx.array(ref["encoder_hidden_states"])
    c2 = mx.array(np.ascontiguousarray(ref["encoder_hidden_states"][::-1]))  # batch swapped
    first = run(model, ref, encoder_hidden_states=c1, context_memo=memo)
    np.testing.assert_array_equal(run(model, ref, encoder_hidden_states=c1, context_memo=memo),
                                  first)
    second = run(model, ref, encoder_hidden_states=c2, context_memo=memo)
    np.testing.assert_array_equal(second, run(model, ref, encoder_hidden_states=np.array(c2)))
    assert rel_error(second, first) > 1e-2
    np.testing.assert_array_equal(run(model, ref, encoder_hidden_states=c1, context_memo=memo),
                                  first)  # CFG
    assert memo.get(c1) is not None


def test_folder_without_config_json_infers_it(tmp_path):
    ref = reference("tiny_a")
    shutil.copy(HERE / "tiny_a/transformer/diffusion_pytorch_model.safetensors", tmp_path)
    model = Flux2Transformer.from_pretrained(tmp_path, dtype="float32")
    assert rel_error(run(model, ref), ref["output"]) <= FLOAT32_BOUND


# -- loading errors -------------------------------------------------------------------------


def test_truncated_file_is_a_clear_error(tmp_path):
    src = HERE / "tiny_a" / LAYOUTS["tiny_a"][1]
    bad = tmp_path / "flux.safetensors"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(BonsaiError, match="truncated") as e:
        Flux2Transformer.from_pretrained(bad, dtype="float32")
    assert str(bad) in str(e.value)


def test_not_a_safetensors_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "flux.safetensors"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
    with pytest.raises(BonsaiError, match="not a safetensors file"):
        Flux2Transformer.from_pretrained(bad, dtype="float32")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(BonsaiError, match="does not exist"):
        Flux2Transformer.from_pretrained(tmp_path / "nope", dtype="float32")


def broken_folder(tmp_path: Path, edit) -> Path:
    folder = tmp_path / "transformer"
    folder.mkdir()
    shutil.copy(HERE / "tiny_a/transformer/config.json", folder / "config.json")
    weights = dict(load_weights(HERE / "tiny_a" / "transformer"))
    edit(weights)
    save_safetensors(folder / "diffusion_pytorch_model.safetensors", weights)
    return folder


def test_missing_extra_and_misshaped_tensors_are_all_listed(tmp_path):
    def edit(w):
        del w["transformer_blocks.1.attn.to_k.weight"]
        w["transformer_blocks.0.attn.lora_A.weight"] = mx.zeros((4, 4))
        w["proj_out.weight"] = mx.zeros((9, 32))

    folder = broken_folder(tmp_path, edit)
    with pytest.raises(BonsaiError) as e:
        Flux2Transformer.from_pretrained(folder, dtype="float32")
    msg = str(e.value)
    assert str(folder) in msg
    assert "missing (1): transformer_blocks.1.attn.to_k.weight" in msg
    assert "unexpected (1): transformer_blocks.0.attn.lora_A.weight" in msg
    assert "wrong shape (1): proj_out.weight: file (9, 32), model (8, 32)" in msg


@pytest.mark.parametrize("what", ["missing", "unexpected", "wrong shape"])
def test_each_kind_of_mismatch_alone_is_reported(tmp_path, what):
    def edit(w):
        if what == "missing":
            del w["norm_out.linear.weight"]
        elif what == "unexpected":
            w["extra.weight"] = mx.zeros((2,))
        else:
            w["transformer_blocks.0.attn.norm_q.weight"] = mx.ones((17,))

    with pytest.raises(BonsaiError, match=f"{what} \\(1\\)"):
        Flux2Transformer.from_pretrained(broken_folder(tmp_path, edit), dtype="float32")


def test_bfl_file_without_transformer_tensors_cannot_infer_config(tmp_path):
    f = tmp_path / "other.safetensors"
    save_safetensors(f, {"encoder.conv_in.weight": mx.zeros((4, 3, 3, 3))})
    with pytest.raises(BonsaiError, match="cannot infer the transformer config"):
        Flux2Transformer.from_pretrained(f, dtype="float32")


def test_unknown_dtype_is_rejected():
    with pytest.raises(BonsaiError, match="dtype"):
        Flux2Transformer.from_pretrained(HERE / "tiny_a" / "transformer", dtype="int8")
