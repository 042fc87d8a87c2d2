"""LoRA adapters: parity with diffusers' `load_lora_weights` for every format (fixtures from
scripts/fixtures/make_lora.py), exact math of the adapter layer, packed layers against their
dense twins, and every user error."""

import json
import shutil
import warnings
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.lora import (
    LoRALinear,
    fuse_lora,
    load_lora,
    lora_infos,
    lora_path,
    parse_lora,
    read_lora,
    set_lora_scales,
)
from bonsai_mlx.models.transformer import Flux2Transformer, Flux2TransformerConfig
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.quant import (
    BinaryLinear,
    TernaryLinear,
    quantize_dense_layers,
    quantize_model,
)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from bonsai_packs import CONFIG as PACKED_CONFIG
from bonsai_packs import dense_transformer_weights
from mlx.utils import tree_flatten

FIXTURES = Path(__file__).parent / "fixtures"
LORAS = FIXTURES / "lora"
DISTILLED = FIXTURES / "pipeline" / "distilled"
META = json.loads((LORAS / "cases.json").read_text())
CASES = META["cases"]
# As tests/test_pipeline.py: float32 parity is ~2e-6 here; every LoRA moves the image by
# >= 0.2 (max abs) against the image without it.
TOLERANCE = 2e-4


@pytest.fixture(scope="module")
def arrays():
    return np.load(LORAS / "cases.npz")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(DISTILLED, dtype="float32")


@pytest.fixture
def clean(pipe):
    """The distilled pipeline, with every adapter removed again afterwards."""
    yield pipe
    pipe.unload_lora()


def generate(pipe, arrays, case: str) -> np.ndarray:
    return pipe.generate(META["prompt"], width=META["width"], height=META["height"],
                         steps=META["steps"], latents=arrays[f"{case}/latents"],
                         output_type="np")


def max_err(out: np.ndarray, ref: np.ndarray) -> float:
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max())


def load_case(pipe, case: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # text-encoder tensors: tested on their own
        for file, name, scale in CASES[case]["adapters"]:
            pipe.load_lora(LORAS / file, scale=scale, name=name)


# ---- parity with diffusers ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["diffusers", "bfl", "kohya", "subblocks", "two"])
def test_lora_matches_diffusers_load_lora_weights(clean, arrays, case):
    load_case(clean, case)
    out = generate(clean, arrays, case)
    assert max_err(out, arrays[f"{case}/image"]) < TOLERANCE
    assert max_err(out, arrays["none/image"]) > 100 * TOLERANCE  # the LoRA matters


def test_formats_are_detected(clean):
    found = {f: read_lora(LORAS / f).format for f in
             ("diffusers.safetensors", "bfl.safetensors", "kohya.safetensors")}
    assert found == {"diffusers.safetensors": "diffusers", "bfl.safetensors": "bfl",
                     "kohya.safetensors": "kohya"}


@pytest.mark.parametrize("old,new", [
    ("diffusion_model.", "base_model.model."),  # PEFT's prefix: diffusers reads it as BFL's
    ("lora_A.", "lora_down."),  # kohya's part names with BFL names (diffusers drops these)
])
def test_bfl_names_under_other_prefixes_and_part_names(clean, arrays, old, new):
    tensors = {k.replace(old, new).replace("lora_B.", "lora_up." if new == "lora_down." else
                                           "lora_B."): v
               for k, v in mx.load(str(LORAS / "bfl.safetensors")).items()}
    assert any(new in k for k in tensors)
    clean.load_lora(parse_lora(tensors, {}, "renamed"))
    assert max_err(generate(clean, arrays, "bfl"), arrays["bfl/image"]) < TOLERANCE


def test_set_lora_scales_matches_diffusers_set_adapters(clean, arrays):
    # diffusers' kohya case runs at 0.8; load at 1, generate (memoising the text projection
    # through a LoRA'd context_embedder), then rescale without reloading
    with pytest.warns(UserWarning, match="text-encoder"):
        name = clean.load_lora(LORAS / "kohya.safetensors")
    generate(clean, arrays, "kohya")
    clean.set_lora_scales({name: 0.8})
    assert max_err(generate(clean, arrays, "kohya"), arrays["kohya/image"]) < TOLERANCE


def test_scale_zero_equals_no_lora(clean, arrays):
    plain = generate(clean, arrays, "none")
    assert max_err(plain, arrays["none/image"]) < TOLERANCE
    load_case(clean, "two")
    generate(clean, arrays, "none")  # a generation with the adapters on, memo filled
    clean.set_lora_scales({"lora_d": 0.0, "lora_b": 0})
    assert np.array_equal(generate(clean, arrays, "none"), plain)


def test_unload_restores_the_original_bit_for_bit(clean, arrays):
    before = {p: m for p, m in clean.transformer.named_modules()}
    params = [(k, np.array(v)) for k, v in tree_flatten(clean.transformer.parameters())]
    plain = generate(clean, arrays, "none")
    load_case(clean, "two")
    assert set(clean.loras) == {"lora_d", "lora_b"}
    clean.unload_lora("lora_d")
    assert list(clean.loras) == ["lora_b"]
    clean.unload_lora("lora_b")
    assert clean.loras == {}
    after = {p: m for p, m in clean.transformer.named_modules()}
    assert not any(isinstance(m, LoRALinear) for m in after.values())
    assert after.keys() == before.keys() and all(after[p] is before[p] for p in before)
    now = tree_flatten(clean.transformer.parameters())
    assert [k for k, _ in now] == [k for k, _ in params]
    assert all(np.array_equal(np.array(v), w) for (_, v), (_, w) in zip(now, params, strict=True))
    assert np.array_equal(generate(clean, arrays, "none"), plain)


def test_rescaling_forgets_memoised_text_projections(clean):
    # the transformer memoises context_embedder(ctx) per ctx array; a LoRA on
    # context_embedder rescaled between calls with the same array must not reuse it
    model = clean.transformer
    cfg = model.config
    x, ctx = _random((1, 4, cfg.in_channels), 1), _random((1, 3, cfg.joint_attention_dim), 2)
    ids = np.zeros((4, 4), np.int32), np.zeros((3, 4), np.int32)
    plain = np.array(model(x, ctx, 0.5, *ids))
    a, b = _random((4, cfg.joint_attention_dim), 3), _random((cfg.inner_dim, 4), 4)
    load_lora(model, parse_lora({"context_embedder.lora_A.weight": a,
                                 "context_embedder.lora_B.weight": b}, name="ctx"))
    assert np.abs(np.array(model(x, ctx, 0.5, *ids)) - plain).max() > 1e-2
    set_lora_scales(model, {"ctx": 0.0})
    assert np.array_equal(np.array(model(x, ctx, 0.5, *ids)), plain)


def test_a_scale_changed_between_steps_reaches_the_text_projection(clean, arrays,
                                                                   monkeypatch):
    """Within one generation the text projections are memoised; a callback that turns a
    LoRA on context_embedder off after the first step must see it off in the later steps,
    as a run that recomputes them every step does."""
    from bonsai_mlx.models.transformer import ContextMemo

    cfg = clean.transformer.config
    a, b = _random((4, cfg.joint_attention_dim), 3) * 3, _random((cfg.inner_dim, 4), 4) * 3
    load_lora(clean.transformer, parse_lora(
        {"context_embedder.lora_A.weight": a, "context_embedder.lora_B.weight": b},
        name="ctx"))

    def run(schedule: bool) -> np.ndarray:
        clean.set_lora_scales({"ctx": 1.0})
        off = (lambda i, n, lat: clean.set_lora_scales({"ctx": 0.0})) if schedule else None
        return np.asarray(clean.generate(
            META["prompt"], width=META["width"], height=META["height"], steps=3,
            latents=arrays["diffusers/latents"], output_type="np", callback=off))

    memoised, always_on = run(True), run(False)
    monkeypatch.setattr(ContextMemo, "get", lambda self, source, version=0: None)
    recomputed = run(True)
    assert np.abs(recomputed - always_on).max() > 1e-3  # the change matters
    np.testing.assert_allclose(memoised, recomputed, atol=1e-6)


def test_numpy_scales_are_numbers_and_rank_zero_is_named(clean, tmp_path):
    from safetensors.numpy import save_file

    with pytest.warns(UserWarning, match="text-encoder tensors"):
        name = clean.load_lora(LORAS / "kohya.safetensors", scale=np.float32(0.5))
    assert clean.loras[name].scale == 0.5
    clean.set_lora_scales({name: np.float64(0.25)})
    with pytest.raises(BonsaiError, match="scale must be a number, not True"):
        clean.set_lora_scales({name: True})
    empty = tmp_path / "rank0.safetensors"
    save_file({"transformer.x_embedder.lora_A.weight": np.zeros((0, 8), np.float32),
               "transformer.x_embedder.lora_B.weight": np.zeros((8, 0), np.float32)}, empty)
    with pytest.raises(BonsaiError, match="has rank 0"):
        read_lora(empty)


def test_text_encoder_tensors_are_ignored_with_a_warning(clean):
    with pytest.warns(UserWarning, match=r"2 text-encoder tensors .* ignored"):
        clean.load_lora(LORAS / "diffusers.safetensors")
    assert read_lora(LORAS / "kohya.safetensors").text_encoder_keys == [
        f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{p}"
        for p in ("alpha", "lora_down.weight", "lora_up.weight")]


# ---- the adapter layer, exact math ----------------------------------------------------------


def _random(shape, seed):
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _one_layer_model(base: nn.Module) -> nn.Module:
    model = nn.Module()
    model.proj_out = base
    return model


def test_adapter_is_scale_times_alpha_over_rank_times_b_a_x():
    base = nn.Linear(8, 6, bias=False)
    model = _one_layer_model(base)
    a1, b1, a2, b2 = _random((3, 8), 1), _random((6, 3), 2), _random((2, 8), 3), _random((6, 2), 4)
    x = _random((2, 5, 8), 5)
    load_lora(model, parse_lora({"proj_out.lora_A.weight": a1, "proj_out.lora_B.weight": b1,
                                 "proj_out.alpha": mx.array(6.0)}, name="one"), scale=0.5)
    load_lora(model, parse_lora({"proj_out.lora_A.weight": a2, "proj_out.lora_B.weight": b2},
                                {"lora_alpha": 8, "use_rslora": True}, name="two"), scale=-1.5)
    a1, b1, a2, b2, x, w = (np.array(t, np.float64) for t in (a1, b1, a2, b2, x, base.weight))
    want = (x @ w.T + 0.5 * (6 / 3) * (x @ a1.T) @ b1.T
            - 1.5 * (8 / np.sqrt(2)) * (x @ a2.T) @ b2.T)
    np.testing.assert_allclose(np.array(model.proj_out(mx.array(x, mx.float32))), want,
                               rtol=1e-5, atol=1e-5)


def test_alpha_pattern_follows_peft_suffix_rule():
    a, b = _random((4, 8), 1), _random((8, 4), 2)
    tensors = {f"transformer.transformer_blocks.0.{m}.{p}.weight": t
               for m in ("ff.linear_in", "ff_context.linear_in")
               for p, t in (("lora_A", a), ("lora_B", b))}
    lora = parse_lora(tensors, {"lora_alpha": 8, "alpha_pattern": {"ff.linear_in": 2}})
    assert {x.module: x.scaling for x in lora.layers} == {
        "transformer_blocks.0.ff.linear_in": 0.5, "transformer_blocks.0.ff_context.linear_in": 2.0}


def test_kohya_names_beyond_diffusers_map_to_their_layers():
    a, b = _random((2, 8), 1), _random((16, 2), 2)
    tensors = {f"lora_unet_{n}.{p}.weight": t
               for n in ("double_stream_modulation_img_lin", "final_layer_adaLN_modulation_1",
                         "transformer_blocks_0_ff_context_linear_in")
               for p, t in (("lora_down", a), ("lora_up", b))}
    layers = {x.module: x for x in parse_lora(tensors).layers}
    assert set(layers) == {"double_stream_modulation_img.linear", "norm_out.linear",
                           "transformer_blocks.0.ff_context.linear_in"}
    swapped = np.concatenate([np.array(b)[8:], np.array(b)[:8]])  # (shift, scale) -> (scale, shift)
    assert np.array_equal(np.array(layers["norm_out.linear"].up), swapped)


def test_bfl_final_layer_lora_is_swapped_like_the_weights(tmp_path):
    """A BFL LoRA merged into a BFL checkpoint (outside bonsai-mlx) and loaded through the
    weight converter == the same LoRA unmerged: the fused qkv split and the final layer's
    (shift, scale) halves are mapped as the weights are."""
    cfg = Flux2TransformerConfig(in_channels=8, num_layers=1, num_single_layers=1,
                                 attention_head_dim=8, num_attention_heads=2,
                                 joint_attention_dim=12, timestep_guidance_channels=16,
                                 axes_dims_rope=(2, 2, 2, 2))
    dense = Flux2Transformer(cfg, dtype="float32")
    bfl = {"final_layer.adaLN_modulation.1.weight": dense.norm_out.linear.weight,
           "double_blocks.0.img_attn.qkv.weight": mx.concatenate(
               [getattr(dense.transformer_blocks[0].attn, n).weight
                for n in ("to_q", "to_k", "to_v")])}
    bfl["final_layer.adaLN_modulation.1.weight"] = mx.concatenate(  # diffusers -> BFL halves
        mx.split(bfl["final_layer.adaLN_modulation.1.weight"], 2)[::-1])
    lora, merged = {}, {}
    for i, (name, w) in enumerate(bfl.items()):
        a, b = _random((3, w.shape[1]), 10 + i), _random((w.shape[0], 3), 20 + i) * 0.3
        lora[f"diffusion_model.{name.removesuffix('.weight')}.lora_A.weight"] = a
        lora[f"diffusion_model.{name.removesuffix('.weight')}.lora_B.weight"] = b
        merged[f"model.diffusion_model.{name}"] = w + b @ a
    replaced = {"norm_out.linear.weight"} | {f"transformer_blocks.0.attn.to_{n}.weight"
                                             for n in "qkv"}
    rest = {k: v for k, v in tree_flatten(dense.parameters()) if k not in replaced}
    mx.save_safetensors(str(tmp_path / "merged.safetensors"), {**rest, **merged})
    reference = Flux2Transformer.from_pretrained(tmp_path / "merged.safetensors", config=cfg,
                                                 dtype="float32")
    load_lora(dense, parse_lora(lora, name="bfl"))
    x, c = _random((1, 4, 8), 1), _random((1, 3, 12), 2)
    ids = np.zeros((4, 4), np.int32), np.zeros((3, 4), np.int32)
    np.testing.assert_allclose(np.array(dense(x, c, 0.5, *ids)),
                               np.array(reference(x, c, 0.5, *ids)), rtol=1e-5, atol=1e-5)


# ---- packed layers: the same output as their dense twins --------------------------------------


def _packed_lora(model, seed: int):
    """Adapters in BFL names on every packed and several dense layers of `model`."""
    rng, tensors = np.random.default_rng(seed), {}
    for name, module in (("double_blocks.0.img_attn.qkv", "transformer_blocks.0.attn.to_q"),
                         ("double_blocks.0.txt_mlp.2", "transformer_blocks.0.ff_context."
                                                       "linear_out"),
                         ("single_blocks.0.linear1", "single_transformer_blocks.0.attn."
                                                     "to_qkv_mlp_proj"),
                         ("single_blocks.1.linear2", "single_transformer_blocks.1.attn.to_out"),
                         ("double_stream_modulation_img.lin", "double_stream_modulation_img."
                                                              "linear"),
                         ("img_in", "x_embedder")):
        out, k = linear_out_in(model, module)
        out *= 3 if name.endswith("qkv") else 1
        tensors[f"diffusion_model.{name}.lora_A.weight"] = rng.standard_normal((4, k)) / k**0.5
        tensors[f"diffusion_model.{name}.lora_B.weight"] = rng.standard_normal((out, 4)) * 0.05
    return parse_lora({k: mx.array(v.astype(np.float32)) for k, v in tensors.items()},
                      name="packed")


def linear_out_in(model, path):
    from bonsai_mlx.lora import linear_dims
    from bonsai_mlx.quant.model import get_module

    return linear_dims(get_module(model, path))


def _twins(fmt: str, dense_bits: int):
    weights = dense_transformer_weights(fmt, seed=3)
    models = []
    for _ in range(2):
        m = Flux2Transformer(Flux2TransformerConfig(**PACKED_CONFIG), dtype="float32")
        m.load_weights([(k, mx.array(v.astype(np.float32))) for k, v in weights.items()])
        models.append(m)
    dense, packed = models
    assert quantize_model(packed, fmt, lossless=True)
    if dense_bits == 8:  # the other dense layers MLX affine 8-bit; the twin dequantised
        quantize_dense_layers(packed, 8)
        for path, m in packed.named_modules():
            if isinstance(m, nn.QuantizedLinear):
                w = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size,
                                  bits=m.bits)
                _set_weight(dense, path, w)
    return dense, packed


def _set_weight(model, path, w):
    from bonsai_mlx.quant.model import get_module

    get_module(model, path).weight = w


def _forward(model) -> np.ndarray:
    rng = np.random.default_rng(0)
    img_ids = np.array([[0, h, w, 0] for h in range(2) for w in range(2)])
    txt_ids = np.array([[0, 0, 0, i] for i in range(3)])
    return np.array(model(rng.standard_normal((1, 4, 128)).astype(np.float32),
                          rng.standard_normal((1, 3, 192)).astype(np.float32),
                          np.array([0.7], np.float32), img_ids, txt_ids))


@pytest.mark.parametrize("fmt,dense_bits,cls", [("binary", 16, BinaryLinear),
                                                ("ternary", 16, TernaryLinear),
                                                ("ternary", 8, TernaryLinear)])
def test_lora_over_packed_layers_equals_lora_over_the_dense_twin(fmt, dense_bits, cls):
    dense, packed = _twins(fmt, dense_bits)
    lora = _packed_lora(dense, seed=1)
    without = _forward(dense)
    load_lora(dense, lora, scale=0.8)
    load_lora(packed, lora, scale=0.8)
    q = packed.transformer_blocks[0].attn.to_q
    assert isinstance(q, LoRALinear) and isinstance(q.base, cls)
    if dense_bits == 8:
        assert isinstance(packed.double_stream_modulation_img.linear.base, nn.QuantizedLinear)
    ref = _forward(dense)
    assert np.abs(ref - without).max() > 0.05 * np.abs(ref).max()
    np.testing.assert_allclose(_forward(packed), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_fuse_merges_into_dense_weights_and_refuses_packed(clean, arrays, tmp_path):
    load_case(clean, "two")
    unmerged = generate(clean, arrays, "two")
    with pytest.raises(BonsaiError, match=r"LoRAs are loaded \(lora_d, lora_b\); unload"):
        clean.save_pretrained(tmp_path / "saved")
    assert clean.fuse_lora() == ["lora_d", "lora_b"]
    assert clean.loras == {}
    assert not any(isinstance(m, LoRALinear) for _, m in clean.transformer.named_modules())
    assert max_err(generate(clean, arrays, "two"), unmerged) < 1e-5
    # a fused dense model saves like any other, the LoRA in its weights
    saved = Pipeline.from_pretrained(clean.save_pretrained(tmp_path / "saved",
                                                           transformer_dtype="float32"),
                                     dtype="float32")
    assert max_err(generate(saved, arrays, "two"), unmerged) < 1e-5
    # the fused weights stay: reload the pipeline's transformer for the other tests
    clean.transformer = Flux2Transformer.from_pretrained(DISTILLED / "transformer",
                                                         dtype="float32")

    _, packed = _twins("binary", 16)
    load_lora(packed, _packed_lora(packed, seed=2))
    with pytest.raises(BonsaiError, match=r"cannot fuse .*BinaryLinear.* unmerged"):
        fuse_lora(packed)
    assert list(lora_infos(packed)) == ["packed"]  # nothing changed


# ---- the CLI's done-when: a tiny binary pack with a LoRA, as diffusers on the dense twin ----


def binary_pack(root: Path) -> Path:
    """The tiny distilled pipeline with the fixture's 1-bit transformer (our packed layout,
    dense layers MLX affine 8-bit)."""
    shutil.copytree(DISTILLED, root, ignore=shutil.ignore_patterns("transformer"))
    shutil.copytree(LORAS / "binary_pack" / "transformer", root / "transformer")
    return root


def test_cli_gen_with_lora_on_a_binary_pack_matches_diffusers_on_the_dense_twin(
        tmp_path, arrays):
    from bonsai_mlx.cli import cli

    from click.testing import CliRunner
    from PIL import Image

    pack = binary_pack(tmp_path / "pack")
    [(file, _, scale)] = CASES["pack"]["adapters"]
    out = tmp_path / "out.png"
    result = CliRunner().invoke(cli, [
        "gen", "-m", str(pack), "--lora", f"{LORAS / file}:{scale}", "-p", META["prompt"],
        "--size", f"{META['width']}x{META['height']}", "--seed", str(META["pack_seed"]),
        "--steps", str(META["steps"]), "-o", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "LoRA pack_lora (bfl): scale 0.8, rank 4, 22 layers" in result.stderr
    with Image.open(out) as im:
        pixels = np.asarray(im).astype(int)
        assert im.text["loras"] == "pack_lora.safetensors:0.8"
    ref = np.round(arrays["pack/image"][0] * 255).astype(int)
    assert np.abs(pixels - ref).max() <= 1 and (pixels != ref).mean() < 0.01
    without = np.round(arrays["pack_none/image"][0] * 255).astype(int)
    assert np.abs(pixels - without).max() > 20


def test_pack_pipeline_with_lora_matches_diffusers(tmp_path, arrays):
    packed = Pipeline.from_pretrained(binary_pack(tmp_path / "pack"), dtype="float32")
    assert isinstance(packed.transformer.transformer_blocks[0].attn.to_q, BinaryLinear)
    load_case(packed, "pack")
    assert max_err(generate(packed, arrays, "pack"), arrays["pack/image"]) < TOLERANCE
    packed.set_lora_scales({"lora_p": 0})
    assert max_err(generate(packed, arrays, "pack"), arrays["pack_none/image"]) < TOLERANCE


# ---- user errors ------------------------------------------------------------------------


def test_keys_that_match_no_layer_are_an_error_listing_them(clean):
    a, b = _random((2, 32), 1), _random((32, 2), 2)
    tensors = {}
    for stem in ("transformer.transformer_blocks.0.attn.to_q",  # fits
                 "transformer.transformer_blocks.7.attn.to_q",  # no block 7
                 "transformer.transformer_blocks.0.norm1.linear"):  # a FLUX.1 name
        tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = a, b
    tensors["lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"] = a
    lora = parse_lora(tensors, {}, "mixed.safetensors", name="mixed")
    with pytest.raises(BonsaiError) as e:
        clean.load_lora(lora)
    for key in ("transformer_blocks.7.attn.to_q", "transformer_blocks.0.norm1.linear",
                "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight"):
        assert key in str(e.value)
    assert "ignore_unmatched" in str(e.value) and "mixed.safetensors" in str(e.value)
    assert clean.loras == {}  # nothing was applied
    with pytest.warns(UserWarning, match="skipped 3 LoRA layers"):
        clean.load_lora(lora, ignore_unmatched=True)
    assert clean.loras["mixed"].layers == 1


def test_a_lora_for_another_size_names_the_shapes(clean):
    with pytest.raises(BonsaiError, match=r"does not fit this model .*needs A \(r, 32\)"):
        clean.load_lora(LORAS / "pack_lora.safetensors")
    assert clean.loras == {}


def test_lokr_is_not_supported_yet():
    with pytest.raises(BonsaiError, match="LoKr file .* not supported yet"):
        read_lora(LORAS / "lokr.safetensors")


def test_names_and_scales_are_checked(clean):
    first = clean.load_lora(LORAS / "subblocks.safetensors")
    second = clean.load_lora(LORAS / "subblocks.safetensors", scale=0.5)
    assert (first, second) == ("subblocks", "subblocks-2")
    info = clean.loras["subblocks-2"]
    assert (info.scale, info.ranks, info.layers, info.format) == (0.5, [2, 3, 4, 5], 1,
                                                                    "diffusers")
    assert info.parameters == 32 * (2 + 3 + 4 + 5) + 32 * (2 + 3 + 4) + 192 * 5  # A's, B's
    assert info.bytes == 4 * info.parameters  # float32 compute dtype
    with pytest.raises(BonsaiError, match="already loaded"):
        clean.load_lora(LORAS / "subblocks.safetensors", name="subblocks")
    with pytest.raises(BonsaiError, match="no LoRA named 'nope'.*subblocks, subblocks-2"):
        clean.set_lora_scales({"nope": 1.0})
    with pytest.raises(BonsaiError, match="finite number"):
        clean.set_lora_scales({"subblocks": float("nan")})
    with pytest.raises(BonsaiError, match="no LoRA named"):
        clean.unload_lora("nope")


def test_peft_folder_alpha_comes_from_adapter_config(tmp_path):
    # PEFT's save_pretrained layout: adapter_model.safetensors + adapter_config.json
    a, b = _random((4, 8), 1), _random((8, 4), 2)
    mx.save_safetensors(str(tmp_path / "adapter_model.safetensors"), {
        "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": a,
        "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight": b})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16}))
    lora = read_lora(tmp_path)
    assert lora.name == tmp_path.name  # not "adapter_model"
    [layer] = lora.layers
    assert (layer.module, layer.scaling) == ("transformer_blocks.0.attn.to_q", 4.0)


def test_adapters_are_kept_in_the_compute_dtype():
    model = Flux2Transformer(Flux2TransformerConfig(
        in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2)), dtype="bfloat16")
    load_lora(model, parse_lora({"x_embedder.lora_A.weight": _random((4, 8), 1),
                                 "x_embedder.lora_B.weight": _random((16, 4), 2)}, name="l"))
    adapter = model.x_embedder.adapters["l"][0]
    assert adapter.lora_A.dtype == adapter.lora_B.dtype == mx.bfloat16
    assert lora_infos(model)["l"].bytes == 2 * (4 * 8 + 16 * 4)
    out = model(_random((1, 4, 8), 3), _random((1, 3, 12), 4), 0.5,
                np.zeros((4, 4), np.int32), np.zeros((3, 4), np.int32))
    assert out.dtype == mx.bfloat16


def test_only_safetensors_are_read(tmp_path):
    (tmp_path / "lora.bin").write_bytes(b"\x80\x02pickle")
    with pytest.raises(BonsaiError, match="only .safetensors"):
        lora_path(tmp_path / "lora.bin")
    with pytest.raises(BonsaiError, match="holds no .safetensors"):
        lora_path(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(BonsaiError, match="several .safetensors .* weight_name.*file's path"):
        lora_path(tmp_path)
    assert lora_path(tmp_path, "b.safetensors") == tmp_path / "b.safetensors"
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert lora_path(tmp_path).name == "pytorch_lora_weights.safetensors"
    with pytest.raises(BonsaiError, match="does not exist"):
        lora_path(tmp_path / "missing.safetensors")
    with pytest.raises(BonsaiError, match="does not exist"):
        lora_path("binary")  # a model alias is no LoRA repo


def test_hub_lora_downloads_only_its_file(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        shutil.copy(LORAS / "bfl.safetensors", folder / "style.safetensors")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo_id, revision=None: ["README.md", "style.safetensors",
                                                              "samples/a.png"])
    lora = read_lora("someone/style-lora")
    assert (lora.format, lora.name) == ("bfl", "style")
    files = ["style.safetensors", "adapter_config.json"]
    assert calls == [("someone/style-lora", files)]
    lora_path("someone/style-lora/style.safetensors")
    assert calls[-1] == ("someone/style-lora", files)
    # offline: no listing; the cached snapshot's files decide
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    lora_path("someone/style-lora")
    assert calls[-2:] == [("someone/style-lora", ["*.safetensors"]), ("someone/style-lora", files)]


# ---- CLI: spec parsing, info, errors ------------------------------------------------------


def _cli(*args):
    from bonsai_mlx.cli import cli

    from click.testing import CliRunner

    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("text,expected", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.8", ("style.safetensors", 0.8)),
    ("style.safetensors:-1.5", ("style.safetensors", -1.5)),
    ("owner/name:1.2", ("owner/name", 1.2)),
    (r"C:\loras\ink.safetensors", (r"C:\loras\ink.safetensors", 1.0)),
    (r"C:\loras\ink.safetensors:0.5", (r"C:\loras\ink.safetensors", 0.5)),
])
def test_lora_spec_is_path_and_optional_scale(text, expected):
    from bonsai_mlx.cli import parse_lora_spec

    assert parse_lora_spec(text) == expected


def test_png_metadata_names_a_lora_file_not_its_folder():
    from bonsai_mlx.outputs import lora_label

    assert lora_label("/home/me/loras/ink.safetensors") == "ink.safetensors"
    assert lora_label("/cache/hub/models--owner--style-lora/snapshots/0123abc/"
                       "style.safetensors") == "owner/style-lora/style.safetensors"


def test_info_on_a_lora_file_shows_format_ranks_and_layers():
    result = _cli("info", str(LORAS / "kohya.safetensors"))
    assert result.exit_code == 0, result.output
    assert "(LoRA, kohya format)" in result.output
    assert "15 transformer layers from 11 in the file, rank 2/4/6" in result.output
    assert "3 text-encoder tensors" in result.output
    assert "transformer_blocks.0.attn.to_v" in result.output  # the fused qkv, split
    as_json = json.loads(_cli("info", str(LORAS / "bfl.safetensors"), "--json").output)
    assert as_json["format"] == "bfl" and as_json["dtypes"] == ["bfloat16"]
    assert {layer["module"] for layer in as_json["layers"]} >= {
        "transformer_blocks.0.attn.add_v_proj", "single_transformer_blocks.1.attn.to_out"}


@pytest.mark.parametrize("args,phrase", [
    (["info", str(LORAS / "lokr.safetensors")], "LoKr is not supported yet"),
    (["gen", "-m", str(DISTILLED), "-p", "x", "--lora", "missing.safetensors:0.5"],
     "LoRA missing.safetensors does not exist"),
    (["gen", "-m", str(DISTILLED), "-p", "x", "--lora", str(LORAS / "pack_lora.safetensors")],
     "does not fit this model"),
])
def test_cli_lora_errors_are_one_line(args, phrase):
    result = _cli(*args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
