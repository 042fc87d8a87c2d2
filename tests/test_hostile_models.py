"""Hostile or broken model folders (SECURITY.md): a copy of the tiny pipeline with one value
changed must end in one BonsaiError naming the file and the value (one `error:` line, exit 2
on the command line), never a crash, a hang or memory exhausted.

Nothing here may allocate much should a check be missing: loading is forbidden where the
check must come first, blocking reads run under `alarm`, and reads that would fill memory
run in a subprocess limited to 4 GB of address space."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.memory import read_model_sizes
from bonsai_mlx.models.text_encoder import qwen3_args
from bonsai_mlx.models.transformer import Flux2Transformer
from bonsai_mlx.models.vae import VAE
from bonsai_mlx.weights import read_json, read_safetensors_header

import pytest
from test_cli import assert_user_error, run
from test_security import alarm, copy_model, edit_json, gen_args  # noqa: F401

# ----------------------------------------------------------------------------------------
# Config sizes: bounded before any layer is built


def forbid_building(monkeypatch, component: str) -> None:
    """Building the transformer (or the VAE) fails the test: its config check must come
    first."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"the {component} was built before its config was checked")

    model = Flux2Transformer if component == "transformer" else VAE
    monkeypatch.setattr(model, "__init__", refuse)


HUGE_CONFIGS = [
    ("transformer", dict(num_layers=99999999999999), "num_layers must be an integer in 0..512"),
    ("transformer", dict(num_single_layers=4096), "num_single_layers must be an integer in 0."),
    ("transformer", dict(joint_attention_dim=99999999999),
     "joint_attention_dim must be an integer in 1..65536"),
    ("transformer", dict(num_attention_heads=100000), "num_attention_heads must be an integer"),
    ("transformer", dict(mlp_ratio=1e12), "mlp_ratio must be at most 16"),
    ("transformer", dict(num_attention_heads=1024, attention_head_dim=128,
                         axes_dims_rope=[32, 32, 32, 32]), "attention_head_dim"),
    ("vae", dict(layers_per_block=99999999), "layers_per_block must be an integer in 1..16"),
    ("vae", dict(block_out_channels=[10**9] * 4), "block_out_channels must be an integer in"),
    ("vae", dict(block_out_channels=[32] * 100), "block_out_channels must be a non-empty list"),
    ("vae", dict(latent_channels=10**12), "latent_channels must be an integer in 1..8192"),
]


@pytest.mark.parametrize("component, changes, phrase", HUGE_CONFIGS)
def test_huge_config_sizes_are_refused_before_building(tmp_path, monkeypatch, component,
                                                       changes, phrase):
    model = copy_model(tmp_path)
    config = model / component / "config.json"
    edit_json(config, **changes)
    forbid_building(monkeypatch, component)
    assert_user_error(run(*gen_args(model, "-o", str(tmp_path / "out.png"))), str(config),
                      phrase)
    load = Flux2Transformer if component == "transformer" else VAE
    with pytest.raises(BonsaiError, match=phrase.replace("..", r"\.\.")):
        load.from_pretrained(model / component, dtype="float32")
    # the memory estimate reads the same configs, and stops there too
    with pytest.raises(BonsaiError, match=phrase.replace("..", r"\.\.")):
        read_model_sizes(model, "float32")


@pytest.mark.parametrize("changes, phrase", [
    (dict(hidden_size=10**9), "hidden_size must be an integer <= 65536"),
    (dict(num_hidden_layers=10**6), "num_hidden_layers must be an integer <= 512"),
    (dict(vocab_size=10**12), "vocab_size must be an integer in 1..1048576"),
    (dict(intermediate_size=10**7), "intermediate_size must be an integer in 1..262144"),
    (dict(head_dim=10**5), "head_dim must be an integer in 1..1024"),
    (dict(rope_parameters={"rope_theta": "x", "rope_type": "default"}),
     "rope_theta must be a number, not 'x'"),
])
def test_huge_or_wrong_text_encoder_configs_are_refused(changes, phrase):
    config = json.loads((TINY_TEXT_ENCODER / "config.json").read_text())
    config.update(changes)
    with pytest.raises(BonsaiError, match=f"config.json: {phrase}"):
        qwen3_args(config, TINY_TEXT_ENCODER / "config.json")


TINY_TEXT_ENCODER = Path(__file__).parent / "fixtures" / "pipeline" / "distilled" / "text_encoder"


def test_a_text_rope_theta_that_is_not_a_number_is_one_error_line(tmp_path):
    model = copy_model(tmp_path)
    edit_json(model / "text_encoder" / "config.json",
              rope_parameters={"rope_theta": "x", "rope_type": "default"})
    result = run(*gen_args(model, "-o", str(tmp_path / "out.png")))
    assert_user_error(result, str(model / "text_encoder" / "config.json"),
                      "rope_theta must be a number, not 'x'")


# ----------------------------------------------------------------------------------------
# JSON read only from regular files of bounded size, never blocking


LIMITED = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
           "sys.argv[0] = 'bonsai-mlx'\n")


def run_limited(code: str, *args: str) -> subprocess.CompletedProcess:
    """Python `code` in a process limited to 4 GB of address space and 60 s: a read that
    would fill memory fails there, not in the test process."""
    return subprocess.run([sys.executable, "-c", LIMITED + code, *args], capture_output=True,
                          text=True, timeout=60)


def read_json_limited(path: Path) -> subprocess.CompletedProcess:
    return run_limited("from bonsai_mlx.weights import read_json\n"
                       "from bonsai_mlx.errors import BonsaiError\n"
                       "try:\n    read_json(sys.argv[1])\n"
                       "except BonsaiError as e:\n    print(e); sys.exit(2)\n", str(path))


@pytest.mark.parametrize("kind", ["dev-zero-link", "fifo", "huge", "folder"])
def test_read_json_reads_only_regular_files_of_bounded_size(tmp_path, kind):
    path = tmp_path / "config.json"
    if kind == "dev-zero-link":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge":  # sparse: 17 MB of zero bytes, none written
        with open(path, "wb") as f:
            f.truncate(17 * 1024 * 1024)
    else:
        path.mkdir()
    result = read_json_limited(path)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    expected = "is larger than 16.78 MB" if kind == "huge" else "is not a regular file"
    assert f"{path} {expected}" in result.stdout


def test_read_json_follows_links_to_regular_files(tmp_path):
    """The Hugging Face cache is made of links into its blobs."""
    (tmp_path / "blob").write_text('{"a": 1}')
    (tmp_path / "config.json").symlink_to(tmp_path / "blob")
    assert read_json(tmp_path / "config.json") == {"a": 1}


def test_a_fifo_as_vae_config_is_one_error_line(tmp_path, alarm):  # noqa: F811
    model = copy_model(tmp_path)
    (model / "vae" / "config.json").unlink()
    os.mkfifo(model / "vae" / "config.json")
    result = run(*gen_args(model, "-o", str(tmp_path / "out.png")))
    assert_user_error(result, str(model / "vae" / "config.json"), "is not a regular file")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero-link"])
def test_tokenizer_files_must_be_regular_files(tmp_path, kind):
    """transformers reads the tokenizer's files itself: they are checked before."""
    model = copy_model(tmp_path)
    tokenizer = model / "tokenizer" / "tokenizer.json"
    tokenizer.unlink()
    if kind == "fifo":
        os.mkfifo(tokenizer)
    else:
        tokenizer.symlink_to("/dev/zero")
    result = run_limited("from bonsai_mlx.cli import cli; cli()",
                         *gen_args(model, "-o", str(tmp_path / "out.png")))
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert f"{tokenizer} is not a regular file" in lines[0]


# ----------------------------------------------------------------------------------------
# Safetensors headers


def write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


GOOD = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


@pytest.mark.parametrize("change, phrase", [
    (dict(data_offsets=["0", "24"]), "malformed data_offsets ['0', '24']"),
    (dict(data_offsets=[0]), "malformed data_offsets [0]"),
    (dict(data_offsets=[24, 0]), "malformed data_offsets [24, 0]"),
    (dict(data_offsets=[-8, 16]), "malformed data_offsets [-8, 16]"),
    (dict(data_offsets=[0, 4000]), "is truncated: tensor 'w' ends at byte 4000 of 24"),
    (dict(data_offsets=[0, 20]), "do not hold the bytes of shape [2, 3] F32"),
    (dict(shape=[2, True, 3]), "malformed shape [2, True, 3]"),
    (dict(shape=[-2, -3]), "malformed shape [-2, -3]"),
    (dict(shape="2x3"), "malformed shape '2x3'"),
    (dict(shape=[2, 3.0]), "malformed shape [2, 3.0]"),
    (dict(dtype="F33"), "unknown dtype 'F33'"),
    (dict(dtype=["F32"]), "unknown dtype ['F32']"),
])
def test_malformed_safetensors_headers_name_the_file_and_tensor(tmp_path, change, phrase):
    path = write_safetensors(tmp_path / "w.safetensors", {"w": {**GOOD, **change}}, bytes(24))
    with pytest.raises(BonsaiError) as e:
        read_safetensors_header(path)
    assert str(path) in str(e.value) and "'w'" in str(e.value) and phrase in str(e.value)


def test_a_header_entry_that_is_not_an_object_is_refused(tmp_path):
    path = write_safetensors(tmp_path / "w.safetensors", {"w": [0, 24]}, bytes(24))
    with pytest.raises(BonsaiError, match="tensor 'w' has a malformed header entry"):
        read_safetensors_header(path)


def test_string_data_offsets_in_a_model_are_one_error_line(tmp_path):
    model = copy_model(tmp_path)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [str(o) for o in header[name]["data_offsets"]]
    write_safetensors(weights, header, raw[8 + n:])
    for command in (gen_args(model, "-o", str(tmp_path / "out.png")), ["info", str(model)]):
        assert_user_error(run(*command), str(weights), repr(name), "malformed data_offsets")


# ----------------------------------------------------------------------------------------
# Flags and numbers of the pipeline's own configs


@pytest.mark.parametrize("config, changes, phrases", [
    ("model_index.json", dict(is_distilled="false"),
     ["is_distilled must be true or false, not 'false'"]),
    ("scheduler/scheduler_config.json", dict(base_shift="a"), ["base_shift must be a number"]),
    ("scheduler/scheduler_config.json", dict(max_image_seq_len=[4096]),
     ["max_image_seq_len must be a number"]),
])
def test_wrongly_typed_pipeline_fields_are_one_error_line(tmp_path, config, changes, phrases):
    model = copy_model(tmp_path)
    edit_json(model / config, **changes)
    result = run(*gen_args(model, "-o", str(tmp_path / "out.png")))
    assert_user_error(result, str(model / config), *phrases)
    assert not (tmp_path / "out.png").exists()
