"""Loading miniature Bonsai MLX packs (1-bit, 2-bit ternary, published folder layout) as
pipelines, converting them and the unpacked layout into bonsai-mlx's layout, and
`Pipeline.save_pretrained` (atomic, no silent overwrite). Packs are built by
tests/bonsai_packs.py from the tiny fixtures."""

import json
import os

from bonsai_mlx.cli import cli
from bonsai_mlx.convert import convert
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.transformer import Flux2Transformer
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.quant import BinaryLinear, TernaryLinear
from bonsai_mlx.quant.model import get_module

import mlx.core as mx
import numpy as np
import pytest
from bonsai_packs import (
    PATHS,
    dense_transformer_weights,
    generate,
    write_bonsai_pack,
    write_dense_twin,
    write_unpacked,
)
from click.testing import CliRunner

BITS = {"binary": 1, "ternary": 2}


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """Per format: the unpacked folder, the Bonsai pack and the dense twin of the same
    weights, and the pack's image (float32)."""
    root = tmp_path_factory.mktemp("packs")
    out = {}
    for fmt, bits in BITS.items():
        weights = dense_transformer_weights(fmt, seed=bits)
        pack = write_bonsai_pack(root / f"pack-{fmt}", weights, bits)
        out[fmt] = {
            "weights": weights,
            "pack": pack,
            "unpacked": write_unpacked(root / f"unpacked-{fmt}", weights),
            "twin": write_dense_twin(root / f"twin-{fmt}", pack, weights),
            "image": generate(Pipeline.from_pretrained(pack, dtype="float32")),
        }
    return out


def load_tensors(folder):
    return dict(mx.load(str(folder / "diffusion_pytorch_model.safetensors")))


def same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item() for k in a)


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_bonsai_pack_matches_the_dense_pipeline_of_its_dequantised_weights(packs, fmt):
    p = packs[fmt]
    pipe = Pipeline.from_pretrained(p["pack"], dtype="float32")
    cls = BinaryLinear if fmt == "binary" else TernaryLinear
    assert all(isinstance(get_module(pipe.transformer, path), cls) for path in PATHS)
    assert pipe.is_distilled and pipe.default_steps == 4
    dense = generate(Pipeline.from_pretrained(p["twin"], dtype="float32"))
    # Measured 2.5e-6 (float32 summation order); the unquantised text encoder instead of the
    # dequantised 4-bit one moves the image by > 1e-2, so 2e-5 tells them apart.
    err = float(np.abs(p["image"] - dense).max())
    assert err < 2e-5, err
    full = generate(Pipeline.from_pretrained(p["unpacked"], dtype="float32"))
    assert float(np.abs(full - dense).max()) > 1e-3


def test_transformer_from_pretrained_reads_packed_folders(packs):
    pack = packs["binary"]["pack"]
    model = Flux2Transformer.from_pretrained(pack, dtype="float32")  # finds the pack folder
    assert isinstance(model.transformer_blocks[0].attn.to_q, BinaryLinear)
    baseline = Flux2Transformer.from_pretrained(pack / "transformer-packed-mflux",
                                                dtype="float32", affine_baseline=True)
    assert baseline.transformer_blocks[0].attn.to_q.bits == 1
    words = load_tensors(pack / "transformer-packed-mflux")["transformer_blocks.0.attn.to_q.weight"]
    assert mx.array_equal(model.transformer_blocks[0].attn.to_q.weight, words).item()


@pytest.mark.parametrize("fmt", ["binary", "ternary"])
def test_convert_pack_and_unpacked_losslessly_to_the_same_bytes(packs, fmt, tmp_path):
    p = packs[fmt]
    from_pack = convert(p["pack"], tmp_path / "from-pack", fmt, echo=None)
    from_unpacked = convert(p["unpacked"], tmp_path / "from-unpacked", fmt, echo=None)
    assert from_pack.method == "lossless (from MLX affine)"
    assert from_unpacked.method == "lossless (verified)" and from_unpacked.lossless

    a = load_tensors(tmp_path / "from-pack" / "transformer")
    b = load_tensors(tmp_path / "from-unpacked" / "transformer")
    assert same_tensors(a, b)  # two routes, one exact packing
    # the packed bytes are the format's, independently: binary reuses MLX's 1-bit words
    weight = p["weights"]["transformer_blocks.0.ff.linear_out.weight"].astype(np.float32)
    layer = "transformer_blocks.0.ff.linear_out"
    if fmt == "binary":
        words = load_tensors(p["pack"] / "transformer-packed-mflux")[f"{layer}.weight"]
        assert mx.array_equal(a[f"{layer}.weight"], words).item()
    else:
        trits = np.sign(weight).astype(np.int64) + 1  # (N, K), K = 384 = 5 * 76 + 4
        padded = np.concatenate([trits, np.ones((trits.shape[0], 1), np.int64)], axis=1)
        expected = (padded.reshape(trits.shape[0], -1, 5) * 3 ** np.arange(5)).sum(-1)
        assert np.array_equal(np.array(a[f"{layer}.weight"]), expected.astype(np.uint8))
    scales = np.abs(weight).reshape(weight.shape[0], -1, 128).max(-1)
    assert np.array_equal(np.array(a[f"{layer}.scales"]), scales.astype(np.float16))
    assert a["x_embedder.weight"].dtype == mx.float16  # dense layers kept as stored

    qc = json.loads((tmp_path / "from-pack" / "transformer" / "quantization_config.json")
                    .read_text())
    assert (qc["format"], qc["dense_bits"], qc["dense_dtype"]) == (fmt, 16, "float16")
    image_pack = generate(Pipeline.from_pretrained(tmp_path / "from-pack", dtype="float32"))
    image_unpacked = generate(Pipeline.from_pretrained(tmp_path / "from-unpacked",
                                                       dtype="float32"))
    assert np.array_equal(image_pack, p["image"])  # identical images
    assert np.array_equal(image_unpacked, p["image"])  # same 4-bit text encoder as mlx-lm's


def test_convert_other_checkpoints_by_absmean_with_a_warning(tmp_path):
    src = write_unpacked(tmp_path / "klein", dense_transformer_weights(None, seed=7))
    with pytest.warns(UserWarning, match="absmean"):
        report = convert(src, tmp_path / "out", "ternary", dense_bits=8,
                         text_encoder_bits=8, echo=None)
    assert report.method.startswith("absmean") and not report.lossless
    qc = json.loads((tmp_path / "out" / "transformer" / "quantization_config.json")
                    .read_text())
    assert (qc["format"], qc["dense_bits"]) == ("ternary", 8)
    te = json.loads((tmp_path / "out" / "text_encoder" / "config.json").read_text())
    assert te["quantization"]["bits"] == 8
    pipe = Pipeline.from_pretrained(tmp_path / "out", dtype="float32")
    assert np.isfinite(generate(pipe)).all()
    assert report.after["transformer"] < report.before["transformer"] / 2


def test_dense_pipeline_round_trips_unchanged(packs, tmp_path):
    """fmt None keeps a dense transformer dense (as stored: float16), text encoder 16-bit."""
    p = packs["ternary"]
    report = convert(p["unpacked"], tmp_path / "dense", text_encoder_bits=16, echo=None)
    assert (report.format, report.method) == ("dense", "unchanged")
    assert not (tmp_path / "dense" / "transformer" / "quantization_config.json").exists()
    weights = load_tensors(tmp_path / "dense" / "transformer")
    assert all(weights[k].dtype == mx.float16 and np.array_equal(np.array(weights[k]), v)
               for k, v in p["weights"].items())
    image = generate(Pipeline.from_pretrained(tmp_path / "dense", dtype="float32"))
    assert np.array_equal(image, generate(Pipeline.from_pretrained(p["unpacked"],
                                                                   dtype="float32")))


def test_convert_errors(packs, tmp_path):
    pack = packs["binary"]["pack"]
    with pytest.raises(BonsaiError, match="already binary-packed; it cannot become ternary"):
        convert(pack, tmp_path / "a", "ternary", echo=None)
    with pytest.raises(BonsaiError, match="already MLX affine 4-bit.*not be lossless"):
        convert(pack, tmp_path / "b", "binary", text_encoder_bits=8, echo=None)
    with pytest.raises(BonsaiError, match="dense_bits=8 needs a packed transformer"):
        convert(packs["binary"]["unpacked"], tmp_path / "c", None, dense_bits=8, echo=None)
    with pytest.raises(BonsaiError, match="unknown format"):
        convert(pack, tmp_path / "d", "int4", echo=None)
    assert sorted(os.listdir(tmp_path)) == []  # failures leave nothing


def test_save_pretrained_refuses_to_overwrite_and_replaces_when_asked(packs, tmp_path):
    pipe = Pipeline.from_pretrained(packs["binary"]["pack"], dtype="float16")
    dst = tmp_path / "saved"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(BonsaiError, match="already exists.*overwrite"):
        pipe.save_pretrained(dst)
    # overwrite replaces only a model folder
    with pytest.raises(BonsaiError, match="refusing to replace .* not a model folder"):
        pipe.save_pretrained(dst, overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["precious.txt"]
    dst = tmp_path / "model"
    pipe.save_pretrained(dst)
    (dst / "stale.txt").write_text("from the previous save")
    pipe.save_pretrained(dst, overwrite=True)
    assert not (dst / "stale.txt").exists() and (dst / "model_index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "saved"]  # no temporary
    with pytest.raises(BonsaiError, match="loaded from"):
        Pipeline.from_pretrained(dst, dtype="float16").save_pretrained(dst, overwrite=True)


def test_save_pretrained_is_atomic(packs, tmp_path, monkeypatch):
    """A failure after the transformer and the text encoder were written leaves nothing."""
    import bonsai_mlx.saving as saving_module

    pipe = Pipeline.from_pretrained(packs["ternary"]["pack"], dtype="float16")
    previous = pipe.save_pretrained(tmp_path / "previous")
    written = []

    def failing_copy(source, folder, dtype=None):
        written.extend(p.name for p in folder.parent.iterdir())
        raise OSError("disk full")

    monkeypatch.setattr(saving_module, "save_vae_files", failing_copy)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(BonsaiError, match="disk full"):
        pipe.save_pretrained(tmp_path / "out")
    assert {"transformer", "text_encoder"} <= set(written)  # it failed mid-write
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    # and an existing model folder survives a failed overwrite untouched
    (previous / "old.txt").write_text("old")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(BonsaiError, match="disk full"):
        pipe.save_pretrained(previous, overwrite=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]


def test_cli_convert(packs, tmp_path):
    runner = CliRunner()
    dst = tmp_path / "cli-out"
    result = runner.invoke(cli, ["convert", str(packs["binary"]["pack"]), str(dst),
                                 "--format", "binary", "--text-encoder-bits", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert "text_encoder" in result.output and "total" in result.output
    qc = json.loads((dst / "transformer" / "quantization_config.json").read_text())
    assert qc["format"] == "binary"
    again = runner.invoke(cli, ["convert", str(packs["binary"]["pack"]), str(dst),
                                "--format", "binary"])
    assert again.exit_code == 2 and "already exists" in again.output
