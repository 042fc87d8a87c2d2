"""FLUX.2 [klein] 9B and base 9B: the 9B-shaped miniature of scripts/fixtures/make_variants.py
(Qwen3-8B-like text encoder with an untied lm_head, text hidden = transformer width, joint
attention dim = 3 x text hidden, double:single blocks 1:3) against diffusers'
Flux2KleinPipeline; the aliases; converting a 9B-shaped transformer."""

import json

from bonsai_mlx.convert import convert
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.quant import BinaryLinear
from bonsai_mlx.weights import MODEL_ALIASES, resolve_model

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from variants import TOLERANCE, VARIANTS, arrays, generate_kwargs, max_error, pipeline_folder


@pytest.fixture(scope="module")
def data():
    return arrays()


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    base = pipeline_folder(VARIANTS / "klein9b", tmp_path_factory.mktemp("9b") / "base",
                           is_distilled=False)
    return {"klein9b": Pipeline.from_pretrained(VARIANTS / "klein9b", dtype="float32"),
            "klein_base9b": Pipeline.from_pretrained(base, dtype="float32")}


def test_miniature_has_the_9b_ratios(pipes):
    cfg = pipes["klein9b"].transformer.config
    text = pipes["klein9b"].prompt_encoder
    assert cfg.joint_attention_dim == 3 * text.hidden_size == 3 * cfg.inner_dim
    assert 3 * cfg.num_layers == cfg.num_single_layers and cfg.num_attention_heads == 4
    te_config = json.loads((VARIANTS / "klein9b/text_encoder/config.json").read_text())
    assert te_config["tie_word_embeddings"] is False  # Qwen3-8B has its own lm_head
    assert te_config["intermediate_size"] == 3 * te_config["hidden_size"]


@pytest.mark.parametrize("case", ["klein9b_t2i", "klein9b_edit", "klein_base9b_cfg"])
def test_9b_pipeline_matches_diffusers(pipes, data, case):
    pipe = pipes["klein9b" if case.startswith("klein9b") else "klein_base9b"]
    err = max_error(pipe.generate(**generate_kwargs(case, data)), case, data)
    assert err < TOLERANCE, f"{case}: max abs error {err:.2e}"


def test_9b_defaults(pipes):
    assert (pipes["klein9b"].default_steps, pipes["klein9b"].default_guidance) == (4, 1.0)
    assert (pipes["klein_base9b"].default_steps,
            pipes["klein_base9b"].default_guidance) == (50, 4.0)


def test_9b_aliases():
    assert resolve_model("klein-9b") == "black-forest-labs/FLUX.2-klein-9B"
    assert resolve_model("klein-base-9b") == "black-forest-labs/FLUX.2-klein-base-9B"
    assert resolve_model("klein-9b-kv") == "black-forest-labs/FLUX.2-klein-9b-kv"
    assert {"klein-9b", "klein-base-9b", "klein-9b-kv"} <= set(MODEL_ALIASES)


def _binary_valued_9b_shaped(src, dst):
    """The miniature with a transformer wide enough to pack (width 128: every packed input
    a whole number of groups of 128) and the 9B's 8 double and 24 single blocks, its packed
    layers binary-valued per group, as a diffusers folder."""
    from bonsai_mlx.models.transformer import Flux2Transformer, packed_layer_paths

    config = dict(in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=96, axes_dims_rope=[8, 8, 8, 8],
                  timestep_guidance_channels=32)
    model = Flux2Transformer(config, dtype="float32")
    packed = set(packed_layer_paths(8, 24))
    rng = np.random.default_rng(0)
    weights = {}
    for k, v in tree_flatten(model.parameters()):
        if k.removesuffix(".weight") in packed:
            n, kk = v.shape
            q = rng.choice(np.array([-1.0, 1.0], np.float32), size=(n, kk // 128, 128))
            s = rng.uniform(0.02, 0.06, size=(n, kk // 128, 1)).astype(np.float32)
            v = mx.array((q * s).reshape(n, kk))
        weights[k] = v.astype(mx.bfloat16)
    root = pipeline_folder(src, dst)
    (root / "transformer").unlink()
    (root / "transformer").mkdir()
    mx.save_safetensors(str(root / "transformer" / "diffusion_pytorch_model.safetensors"),
                        weights, metadata={"format": "pt"})
    (root / "transformer" / "config.json").write_text(
        json.dumps({"_class_name": "Flux2Transformer2DModel", **config}))
    return root


@pytest.mark.slow
def test_convert_packs_a_9b_shaped_transformer_losslessly(tmp_path):
    src = _binary_valued_9b_shaped(VARIANTS / "klein9b", tmp_path / "dense")
    report = convert(src, tmp_path / "packed", "binary", echo=None)
    assert report.method == "lossless (verified)"
    packed = Pipeline.from_pretrained(tmp_path / "packed", dtype="float32")
    layers = [m for _, m in packed.transformer.named_modules() if isinstance(m, BinaryLinear)]
    assert len(layers) == 12 * 8 + 2 * 24  # 144, as in the 9B
    assert report.after["transformer"] < report.before["transformer"] / 5
    kwargs = dict(width=32, height=32, steps=1, seed=0, output_type="np")
    dense = Pipeline.from_pretrained(src, dtype="float32").generate("a fox", **kwargs)
    np.testing.assert_allclose(packed.generate("a fox", **kwargs), dense, atol=1e-5)
