"""The `bonsai-mlx` command line, driven with click's CliRunner on tiny model folders."""

from __future__ import annotations

import fnmatch
import importlib
import json
import socket
from pathlib import Path

from bonsai_mlx import __version__
from bonsai_mlx.cli import _Progress, cli, parse_size, resolve_model
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.outputs import write_png_exclusive
from bonsai_mlx.weights import save_safetensors, write_json

import click
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

PIPELINES = Path(__file__).parent / "fixtures" / "pipeline"
TINY = PIPELINES / "distilled"
REFERENCE_IMAGE = PIPELINES / "reference.png"


def run(*args: str, **kwargs):
    return CliRunner().invoke(cli, list(args), **kwargs)


def assert_user_error(result, *phrases: str) -> None:
    """Exit 2, exactly one line on stderr starting with "error: ", no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as im:
        im.load()
        return dict(im.text)


@pytest.fixture
def no_network(monkeypatch):
    """HF_HUB_OFFLINE=1, an empty Hub cache, and any socket connection fails the test."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("the command tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def needs_pipeline():
    return pytest.importorskip("bonsai_mlx.pipeline")


# ----------------------------------------------------------------------------------------
# Pure parts: sizes, model names, never-overwriting writes


def test_parse_size_accepts_width_x_height():
    assert parse_size("64x96") == (64, 96)
    assert parse_size(" 1024X768 ") == (1024, 768)


@pytest.mark.parametrize("text, phrase", [
    ("65x96", "width 65 is not a multiple of 16; use 64 or 80"),
    ("64x100", "height 100 is not a multiple of 16; use 96 or 112"),
    ("0x64", "too small"),
    ("64", "is not WIDTHxHEIGHT"),
    ("big", "is not WIDTHxHEIGHT"),
    ("8192x64", "width 8192 is out of range: use 16 to 4096"),
    ("4100x16", "width 4100 is out of range: use 16 to 4096"),  # not "use 4096 or 4112"
    ("4090x16", r"use 4080 or 4096 \(e.g. --size 4096x16\)"),
    ("9" * 5000 + "x16", "use 16 to 4096 pixels a side"),  # beyond Python's int reading
    ("", "is not WIDTHxHEIGHT"),
])
def test_parse_size_rejects_bad_sizes_with_a_fix(text, phrase):
    with pytest.raises(BonsaiError, match=phrase):
        parse_size(text)


def test_aliases_name_the_published_repos():
    assert resolve_model("ternary") == "prism-ml/bonsai-image-ternary-4B-mlx-2bit"
    assert resolve_model("binary") == "prism-ml/bonsai-image-binary-4B-mlx-1bit"
    assert resolve_model("klein-4b") == "black-forest-labs/FLUX.2-klein-4B"
    assert resolve_model("klein-base-4b") == "black-forest-labs/FLUX.2-klein-base-4B"
    assert resolve_model("someone/some-model") == "someone/some-model"


def test_write_png_exclusive_numbers_names_and_keeps_existing_files(tmp_path):
    (tmp_path / "out.png").write_bytes(b"first")
    (tmp_path / "out-1.png").write_bytes(b"second")
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    path = write_png_exclusive(image, tmp_path / "out.png", None)
    assert path == tmp_path / "out-2.png"
    assert (tmp_path / "out.png").read_bytes() == b"first"
    assert (tmp_path / "out-1.png").read_bytes() == b"second"
    with Image.open(path) as im:
        assert im.getpixel((3, 3)) == (10, 20, 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png", "out-2.png", "out.png"]


# ----------------------------------------------------------------------------------------
# User errors: exit 2, one line, no traceback (checked before any model is loaded)


@pytest.mark.parametrize("args, phrases", [
    (["--size", "65x96"], ["width 65 is not a multiple of 16", "64 or 80"]),
    (["--size", "sixty"], ["is not WIDTHxHEIGHT"]),
    (["-m", "ternery"], ["unknown model 'ternery'", "did you mean 'ternary'", "klein-base-4b"]),
    (["-m", "flux"], ["unknown model 'flux'", "ternary, binary, klein-4b, klein-base-4b"]),
    (["-m", "./no/such/folder"], ["folder ./no/such/folder does not exist"]),
    (["--image", "REF", "--strength", "1.5"], ["--strength 1.5 is out of range", "0 < strength"]),
    (["--image", "REF", "--strength", "0"], ["--strength 0.0 is out of range"]),
    (["--strength", "0.5"], ["needs exactly one --image"]),
    (["--image", "no-such.png"], ["--image no-such.png does not exist"]),
    (["--image", "NOT_AN_IMAGE"], ["is not a readable image"]),
    (["-o", "out.jpg"], ["only PNG is written", "out.png"]),
    (["--steps", "0"], ["'--steps'", "bonsai-mlx gen --help"]),
    (["--seed", "-3"], ["'--seed'", "-3 is not in the range"]),
    (["--size", ""], ["--size '' is not WIDTHxHEIGHT"]),  # not the default size
    (["--seeds", "99999999999999999999"], ["'--seeds'", "1<=x<=10000"]),
    (["--preview", "notes.png/preview.png"], ["is a file, not a folder",
                                               "choose another --preview"]),
    (["-o", "x" * 300 + ".png"], ["File name too long", "check the path"]),
])
def test_gen_user_errors_exit_2_with_one_line(tmp_path, monkeypatch, args, phrases):
    good, bad = tmp_path / "photo.png", tmp_path / "notes.png"
    Image.new("RGB", (32, 32)).save(good)
    bad.write_text("this is not an image")
    args = [str(good) if a == "REF" else str(bad) if a == "NOT_AN_IMAGE" else a for a in args]
    monkeypatch.chdir(tmp_path)
    result = run("gen", "-p", "a cat", *args)
    assert_user_error(result, *phrases)


def test_a_lora_scale_that_is_not_a_number_is_named(tmp_path):
    lora = Path(__file__).parent / "fixtures" / "lora" / "kohya.safetensors"
    assert_user_error(run("gen", "-p", "a cat", "--lora", f"{lora}:abc"),
                      "the scale 'abc' is not a number", f"{lora}:0.8")


def test_a_preview_that_cannot_be_written_is_a_warning_and_the_image_is_kept(
        tmp_path, monkeypatch):
    needs_pipeline()
    import bonsai_mlx.outputs as outputs

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "write_preview", disk_full)
    result = run("gen", "-m", str(TINY), "-p", "a cat", "--size", "32x32", "--steps", "2",
                 "-o", str(tmp_path / "cat.png"), "--preview", str(tmp_path / "p.png"), "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning: --preview") == 1, result.stderr
    assert "No space left on device" in result.stderr
    assert Image.open(tmp_path / "cat.png").size == (32, 32)


def test_a_preview_named_as_the_image_is_refused(tmp_path):
    out = tmp_path / "fox.png"
    assert_user_error(run("gen", "-p", "a fox", "-o", str(out), "--preview", str(out)),
                      "is the image's own file (-o)")


def test_options_without_effect_are_a_warning(tmp_path):
    needs_pipeline()
    result = run("gen", "-m", str(TINY), "-p", "a cat", "--size", "32x32", "--steps", "1",
                 "-o", str(tmp_path / "cat.png"), "--reference-kv-cache", "--tensor-parallel",
                 "-q")
    assert result.exit_code == 0, result.output
    assert "warning: --reference-kv-cache has no effect without reference images" in (
        result.stderr)
    assert "warning: --tensor-parallel has no effect in a single process" in result.stderr
    assert Image.open(tmp_path / "cat.png").size == (32, 32)


def test_missing_prompt_is_a_one_line_usage_error():
    assert_user_error(run("gen"), "missing option '-p' / '--prompt'")


def test_verbose_shows_the_traceback():
    result = run("gen", "-p", "a cat", "--size", "65x96", "--verbose")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --size 65x96")


def test_offline_and_not_cached_is_a_user_error(no_network, empty_hub_cache):
    for command in (["info", "someone/not-cached"], ["download", "someone/not-cached", "-q"]):
        assert_user_error(run(*command), "someone/not-cached", "bonsai-mlx download")


def test_gen_offline_and_not_cached_is_a_user_error(no_network, empty_hub_cache):
    needs_pipeline()
    result = run("gen", "-p", "a cat", "-m", "someone/not-cached", "--size", "32x32")
    assert_user_error(result, "someone/not-cached", "bonsai-mlx download")


@pytest.mark.parametrize("command", ["convert", "bench"])
def test_convert_and_bench_are_wired_or_say_why(command):
    try:
        module = importlib.import_module(f"bonsai_mlx.{command}")
    except ModuleNotFoundError:
        module = None
    wired = module is not None and any(
        isinstance(c, click.Command) and c.name == command for c in vars(module).values())
    result = run(command, "--help")
    if wired:
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"Usage: bonsai-mlx {command}")
    else:
        assert_user_error(result, f"`bonsai-mlx {command}`", "not available yet"
                          if module is None else "no command-line entry")


def test_progress_bars_cover_encoding_steps_and_decoding(capsys):
    progress = _Progress(enabled=True)
    progress.start()
    for step in (1, 2, 3):
        progress.callback(step, 3, None)
    progress.close()
    err = capsys.readouterr().err
    for stage in ("encoding", "denoising", "decoding"):
        assert stage in err, (stage, err)


# ----------------------------------------------------------------------------------------
# info: components, formats, exact byte counts from headers and file sizes


def _tiny_bonsai_pack(root: Path) -> Path:
    """A miniature of the Bonsai binary MLX pack's layout (shapes tiny, formats real)."""
    write_json(root / "model_index.json", {"_class_name": "Flux2KleinPipeline"})
    write_json(root / "manifest.json", {"files": 5})
    t = root / "transformer-packed-mflux"
    write_json(t / "config.json", {"num_layers": 1})
    write_json(t / "quantization_config.json",
               {"bits": 1, "group_size": 128, "skip_patterns": ["x_embedder"]})
    save_safetensors(t / "diffusion_pytorch_model.safetensors", {
        "blocks.0.to_q.weight": mx.zeros((8, 4), dtype=mx.uint32),
        "blocks.0.to_q.scales": mx.zeros((8, 1), dtype=mx.float16),
        "blocks.0.to_q.biases": mx.zeros((8, 1), dtype=mx.float16),
        "x_embedder.weight": mx.zeros((8, 16), dtype=mx.float16),
    })
    te = root / "text_encoder-mlx-4bit"
    write_json(te / "config.json", {"quantization": {"bits": 4, "group_size": 64}})
    save_safetensors(te / "model.safetensors", {
        "model.layers.0.q.weight": mx.zeros((4, 8), dtype=mx.uint32),
        "model.layers.0.q.scales": mx.zeros((4, 1), dtype=mx.bfloat16),
    })
    vae = root / "vae"
    write_json(vae / "config.json", {"latent_channels": 32})
    save_safetensors(vae / "diffusion_pytorch_model.safetensors",
                     {"decoder.conv.weight": mx.zeros((3, 3, 3, 4), dtype=mx.float16)})
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    return root


def _sizes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_info_reports_formats_and_exact_bytes(tmp_path):
    pack = _tiny_bonsai_pack(tmp_path / "pack")
    result = run("info", str(pack), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    comps = {c["name"]: c for c in report["components"]}
    assert report["pipeline"] == "Flux2KleinPipeline"
    assert report["total_bytes"] == _sizes(pack)
    for name in ("transformer-packed-mflux", "text_encoder-mlx-4bit", "vae", "tokenizer"):
        assert comps[name]["bytes"] == _sizes(pack / name), name
    assert comps["(top level)"]["bytes"] == sum(
        (pack / n).stat().st_size for n in ("model_index.json", "manifest.json"))
    assert comps["transformer-packed-mflux"]["format"] == (
        "MLX affine 1-bit (binary), group 128 + float16 dense layers")
    assert comps["transformer-packed-mflux"]["tensors"] == 4
    assert comps["transformer-packed-mflux"]["dtype_bytes"] == {
        "uint32": 8 * 4 * 4, "float16": 2 * 8 * 2 + 8 * 16 * 2}
    assert comps["text_encoder-mlx-4bit"]["format"] == "MLX affine 4-bit, group 64"
    assert comps["vae"]["format"] == "dense float16"


def test_info_table_shows_components_and_total(tmp_path):
    pack = _tiny_bonsai_pack(tmp_path / "pack")
    result = run("info", str(pack))
    assert result.exit_code == 0, result.output
    total_line = result.stdout.strip().splitlines()[-1]
    assert total_line.split()[0] == "total"
    assert f"{_sizes(pack):,}" in total_line
    assert "MLX affine 4-bit, group 64" in result.stdout


def test_info_recognises_bonsai_mlx_packed_format(tmp_path):
    t = tmp_path / "m" / "transformer"
    write_json(t / "quantization_config.json", {
        "quant_method": "bonsai-mlx", "format": "ternary", "group_size": 128,
        "packed_layers": ["a", "b"], "dense_dtype": "bfloat16", "dense_bits": 16})
    save_safetensors(t / "model.safetensors", {"a.weight": mx.zeros((2, 26), dtype=mx.uint8)})
    result = run("info", str(tmp_path / "m"), "--json")
    comp = json.loads(result.stdout)["components"][0]
    assert comp["format"] == (
        "ternary packed (bonsai-mlx), group 128, 2 layers + bfloat16 dense layers")


def test_info_on_a_truncated_safetensors_is_a_user_error(tmp_path):
    pack = _tiny_bonsai_pack(tmp_path / "pack")
    f = pack / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    assert_user_error(run("info", str(pack)), "truncated")


# ----------------------------------------------------------------------------------------
# gen on a tiny diffusers pipeline folder


def gen(*args: str):
    return run("gen", "-m", str(TINY), "--steps", "2", *args)


def test_gen_writes_png_with_metadata_and_never_overwrites(tmp_path, no_network):
    needs_pipeline()
    out = tmp_path / "out.png"
    result = gen("-p", "a red fox", "--size", "64x96", "--seed", "3", "-o", str(out))
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout.strip() == str(out)
    with Image.open(out) as im:
        assert im.size == (64, 96) and im.mode == "RGB"
    text = png_text(out)
    assert text["prompt"] == "a red fox"
    assert text["seed"] == "3"
    assert text["steps"] == "2"
    assert text["size"] == "64x96"
    assert text["model"] == str(TINY)
    assert text["bonsai-mlx"] == __version__
    assert "guidance" in text
    assert "strength" not in text and "negative_prompt" not in text
    assert "seed 3:" in result.stderr and "peak memory" in result.stderr
    first = out.read_bytes()

    again = gen("-p", "a red fox", "--size", "64x96", "--seed", "3", "-o", str(out), "-q")
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == str(tmp_path / "out-1.png")
    assert again.stderr == ""
    assert out.read_bytes() == first
    # same seed, same machine: the same pixels
    with Image.open(out) as a, Image.open(tmp_path / "out-1.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_several_seeds_give_several_files(tmp_path):
    needs_pipeline()
    result = gen("-p", "a cat", "--size", "32x32", "--seed", "1", "--seed", "2", "--seeds", "1",
                 "-o", str(tmp_path / "many"), "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert len(paths) == 3 and len(set(paths)) == 3
    assert all(p.parent == tmp_path / "many" and p.is_file() for p in paths)
    seeds = [png_text(p)["seed"] for p in paths]
    assert seeds[:2] == ["1", "2"] and seeds[2].isdigit()
    pixels = [np.asarray(Image.open(p)) for p in paths]
    assert not np.array_equal(pixels[0], pixels[1])


def test_editing_with_reference_images(tmp_path):
    needs_pipeline()
    out = tmp_path / "edit.png"
    result = gen("-p", "make it blue", "--size", "32x32", "--seed", "0",
                 "--image", str(REFERENCE_IMAGE), "-o", str(out), "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    assert png_text(out)["images"] == REFERENCE_IMAGE.name
    plain = gen("-p", "make it blue", "--size", "32x32", "--seed", "0", "-o", str(out), "-q")
    assert plain.exit_code == 0
    # the reference image changes the result
    with Image.open(out) as a, Image.open(plain.stdout.strip()) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_image_to_image_with_strength(tmp_path):
    needs_pipeline()
    out = tmp_path / "i2i.png"
    result = gen("-p", "an oil painting", "--size", "32x32", "--seed", "0",
                 "--image", str(REFERENCE_IMAGE), "--strength", "0.5", "-o", str(out), "-q")
    assert result.exit_code == 0, (result.output, result.exception)
    text = png_text(out)
    assert text["strength"] == "0.5"
    assert text["steps"] == "2"  # the schedule's length, of which the last half ran
    assert text["images"] == REFERENCE_IMAGE.name


def test_info_reads_a_cached_repo_without_network(no_network, empty_hub_cache):
    # The Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}
    repo = empty_hub_cache / "models--someone--tiny-pack"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = _tiny_bonsai_pack(repo / "snapshots" / commit)
    result = run("info", "someone/tiny-pack", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["model"] == "someone/tiny-pack"
    assert report["total_bytes"] == _sizes(snapshot)


def test_download_fetches_only_what_the_pipeline_reads(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    result = run("download", "binary", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path)
    (repo_id, kwargs), = calls
    assert repo_id == "prism-ml/bonsai-image-binary-4B-mlx-1bit"
    patterns = kwargs["allow_patterns"]

    def fetched(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    for name in ("model_index.json", "scheduler/scheduler_config.json",
                 "tokenizer/tokenizer.json", "vae/diffusion_pytorch_model.safetensors",
                 "transformer-packed-mflux/diffusion_pytorch_model.safetensors",
                 "text_encoder-mlx-4bit/model.safetensors", "transformer/config.json"):
        assert fetched(name), name
    # never the single-file checkpoints beside the diffusers folders
    assert not fetched("flux-2-klein-4b.safetensors")


def test_download_of_a_local_folder_is_a_user_error(tmp_path):
    assert_user_error(run("download", str(tmp_path)), "local folder", "nothing to download")
