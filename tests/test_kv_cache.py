"""Reference KV caching (FLUX.2 [klein] 9B KV) against diffusers: the transformer's extract
and cached passes (Flux2KVAttnProcessor) and Flux2KleinKVPipeline, on the 9B miniature of
scripts/fixtures/make_variants.py; the model's default, the switch, and saving."""

import json

from bonsai_mlx import BonsaiError
from bonsai_mlx.models.transformer import Flux2Transformer
from bonsai_mlx.pipeline import Pipeline

import numpy as np
import pytest
from variants import (
    TOLERANCE,
    VARIANTS,
    arrays,
    generate_kwargs,
    image_path,
    max_error,
    pipeline_folder,
)


@pytest.fixture(scope="module")
def data():
    return arrays()


@pytest.fixture(scope="module")
def kv_pipe(tmp_path_factory):
    """The 9B miniature as diffusers' KV pipeline saves it: model_index names
    Flux2KleinKVPipeline and has no is_distilled."""
    folder = pipeline_folder(VARIANTS / "klein9b", tmp_path_factory.mktemp("kv") / "klein9b-kv",
                             _class_name="Flux2KleinKVPipeline", is_distilled=None)
    return Pipeline.from_pretrained(folder, dtype="float32")


@pytest.fixture(scope="module")
def plain():
    return Pipeline.from_pretrained(VARIANTS / "klein9b", dtype="float32")


@pytest.fixture(scope="module")
def plain_edit(plain, data):
    """The two-reference case as plain editing (the 9B miniature has no KV flag)."""
    assert not plain.reference_kv_cache
    out = plain.generate(**generate_kwargs("kv_two_references", data))
    assert "reference_kv" not in plain.last_timings
    return out


def test_transformer_extract_and_cached_passes_match_diffusers(data):
    p = "kv_transformer/"
    model = Flux2Transformer.from_pretrained(VARIANTS / "klein9b" / "transformer",
                                             dtype="float32")
    kv = model.reference_kv(data[p + "refs"], data[p + "ref_ids"])
    assert len(kv) == 4 + 12 and kv[0].keys.shape == (2, 4, 6, 8)
    for x, t, out in (("x0", "t0", "out0"), ("x1", "t1", "out1")):
        got = model(data[p + x], data[p + "context"], data[p + t], data[p + "img_ids"],
                    data[p + "txt_ids"], reference_kv=kv)
        ref = data[p + out]
        err = float(np.abs(np.array(got) - ref).max())
        assert err <= 1e-5 * float(np.abs(ref).max()), f"{out}: {err:.2e}"


@pytest.mark.parametrize("case", ["kv_one_reference", "kv_two_references"])
def test_kv_pipeline_matches_diffusers(kv_pipe, data, case):
    assert kv_pipe.reference_kv_cache and kv_pipe.is_distilled
    err = max_error(kv_pipe.generate(**generate_kwargs(case, data)), case, data)
    assert err < TOLERANCE, f"{case}: max abs error {err:.2e}"
    assert "reference_kv" in kv_pipe.last_timings


def test_cache_is_an_approximation_on_plain_models(plain, plain_edit, data):
    """On a model without the KV flag the cache is off by default (plain_edit); turned on,
    it gives the KV pipeline's image, which differs from plain editing."""
    cached = plain.generate(**generate_kwargs("kv_two_references", data),
                            reference_kv_cache=True)
    assert max_error(cached, "kv_two_references", data) < TOLERANCE
    assert np.abs(plain_edit - cached).max() > 1e-3


def test_kv_model_can_switch_the_cache_off(kv_pipe, plain_edit, data):
    off = kv_pipe.generate(**generate_kwargs("kv_two_references", data),
                           reference_kv_cache=False)
    np.testing.assert_array_equal(off, plain_edit)


def test_steps_run_only_text_and_noise_tokens(kv_pipe):
    seen = []
    real = kv_pipe.transformer

    class Recorder:
        dtype = real.dtype

        def rope_tables(self, *a):
            return real.rope_tables(*a)

        def reference_kv(self, refs, ids):
            seen.append(("references", refs.shape))
            return real.reference_kv(refs, ids)

        def __call__(self, x, c, t, **kw):
            seen.append(("step", x.shape))
            return real(x, c, t, **kw)

    kv_pipe.transformer = Recorder()
    try:
        kv_pipe.generate("put them in a garden", images=[image_path("reference.png")],
                         width=64, height=48,
                         steps=1, seed=0, num_images=2, output_type="np")
    finally:
        kv_pipe.transformer = real
    # once, batch 1 (references see no prompt), 96 x 64 -> 24 tokens; then 3 x 4 tokens
    assert seen == [("references", (1, 24, 128)), ("step", (2, 12, 128))]


def test_saving_keeps_the_kv_model(kv_pipe, tmp_path):
    out = kv_pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinKVPipeline" and index["is_distilled"] is True
    assert Pipeline.from_pretrained(out, dtype="float32").reference_kv_cache


def test_bad_reference_kv_cache_values(kv_pipe):
    with pytest.raises(BonsaiError, match="reference_kv_cache must be"):
        kv_pipe.generate("x", width=32, height=32, steps=1, reference_kv_cache="yes")
    model = kv_pipe.transformer
    with pytest.raises(BonsaiError, match="reference_kv has 3 layers"):
        model(np.zeros((1, 4, 128)), np.zeros((1, 2, 96)), 0.5, np.zeros((4, 4)),
              np.zeros((2, 4)), reference_kv=model.reference_kv(
                  np.zeros((1, 1, 128)), np.zeros((1, 4)))[:3])
