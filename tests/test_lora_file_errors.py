"""LoRA files a user may hand over that are malformed or are no files: each is one named
BonsaiError (CLI: one `error:` line, exit 2), never a traceback; and PEFT's alpha_pattern
written in a file's own (BFL) names, matched as PEFT matches it."""

import json
import math
import os
import re
import struct
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.lora import lora_path, parse_lora, read_lora

import mlx.core as mx
import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
LORAS = FIXTURES / "lora"
DISTILLED = FIXTURES / "pipeline" / "distilled"
RANK = 4


def _write_safetensors(path: Path, tensors: dict, metadata=None, *, with_metadata=True) -> Path:
    """A safetensors file written byte by byte, so the header may hold what no writer
    would (a `__metadata__` that is a number, a metadata value that is an object)."""
    header, blobs, offset = {}, [], 0
    if with_metadata:
        header["__metadata__"] = metadata
    for name, value in tensors.items():
        data = np.array(value, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(value)),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def _adapter(stem: str, rank: int = RANK, out: int = 6) -> dict:
    rng = np.random.default_rng(0)
    return {f"{stem}.lora_A.weight": mx.array(rng.standard_normal((rank, 8)), mx.float32),
            f"{stem}.lora_B.weight": mx.array(rng.standard_normal((out, rank)), mx.float32)}


PEFT_STEM = "transformer.transformer_blocks.0.attn.to_q"


BAD_FILES = {  # name -> (tensors, metadata, phrase of the error)
    "metadata_number": (_adapter(PEFT_STEM), 7, "__metadata__ is 7, not an object"),
    "config_object": (_adapter(PEFT_STEM), {"lora_adapter_metadata": {"lora_alpha": 8}},
                      "lora_adapter_metadata metadata is {'lora_alpha': 8}, not a JSON string"),
    "config_list": (_adapter(PEFT_STEM), {"lora_adapter_metadata": "[1, 2]"},
                    "lora_adapter_metadata metadata is [1, 2], not a JSON object"),
    "alpha_text": (_adapter(PEFT_STEM), {"lora_adapter_metadata": '{"lora_alpha": "abc"}'},
                   "lora_alpha must be a number, not 'abc'"),
    "alpha_nan": (_adapter(PEFT_STEM), {"lora_adapter_metadata": '{"lora_alpha": NaN}'},
                  "lora_alpha must be a finite number, not nan"),
    "pattern_number": (_adapter(PEFT_STEM), {"lora_adapter_metadata": '{"alpha_pattern": 5}'},
                       "alpha_pattern must be an object of layer patterns, not 5"),
    "pattern_value": (_adapter(PEFT_STEM),
                      {"lora_adapter_metadata": '{"alpha_pattern": {"to_q": "big"}}'},
                      "alpha_pattern['to_q'] must be a number, not 'big'"),
    "pattern_regex": (_adapter(PEFT_STEM),
                      {"lora_adapter_metadata": '{"alpha_pattern": {"to_q(": 2}}'},
                      "alpha_pattern pattern 'to_q(' is no regular expression"),
    "rank_pattern": (_adapter(PEFT_STEM),
                     {"lora_adapter_metadata": '{"rank_pattern": {"to_q": 2.5}}'},
                     "rank_pattern['to_q'] must be an integer, not 2.5"),
    "alpha_tensor_inf": ({**_adapter("lora_unet_double_blocks_0_img_attn_proj"),
                          "lora_unet_double_blocks_0_img_attn_proj.alpha": mx.array(np.inf)},
                         None, "double_blocks_0_img_attn_proj.alpha must be a finite number"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_lora_files_are_named_errors(tmp_path, case):
    tensors, metadata, phrase = BAD_FILES[case]
    path = _write_safetensors(tmp_path / f"{case}.safetensors", tensors, metadata)
    with pytest.raises(BonsaiError, match="^" + re.escape(str(path))) as error:
        read_lora(path)
    assert phrase in str(error.value)


@pytest.mark.parametrize("case", ["metadata_number", "config_object", "alpha_text",
                                  "pattern_number", "alpha_tensor_inf"])
def test_cli_info_on_a_malformed_lora_is_one_error_line(tmp_path, case):
    tensors, metadata, phrase = BAD_FILES[case]
    path = _write_safetensors(tmp_path / f"{case}.safetensors", tensors, metadata)
    _assert_one_error_line(_cli("info", str(path)), phrase)


def test_cli_gen_with_a_malformed_lora_is_one_error_line(tmp_path):
    tensors, metadata, phrase = BAD_FILES["alpha_nan"]
    path = _write_safetensors(tmp_path / "nan.safetensors", tensors, metadata)
    _assert_one_error_line(_cli("gen", "-m", str(DISTILLED), "-p", "x", "-o", str(tmp_path),
                                "--lora", f"{path}:0.5"), phrase)


def test_adapter_config_json_beside_the_file_is_checked(tmp_path):
    _write_safetensors(tmp_path / "adapter_model.safetensors",
                       _adapter("base_model.model.transformer_blocks.0.attn.to_q"),
                       with_metadata=False)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"alpha_pattern": 5}))
    with pytest.raises(BonsaiError, match="adapter_config.json: alpha_pattern must be an object"):
        read_lora(tmp_path)


def test_a_config_given_to_parse_lora_is_checked():
    with pytest.raises(BonsaiError, match="lora_alpha must be a finite number, not inf"):
        parse_lora(_adapter(PEFT_STEM), {"lora_alpha": math.inf})
    with pytest.raises(BonsaiError, match="use_rslora must be true or false"):
        parse_lora(_adapter(PEFT_STEM), {"use_rslora": "no"})


def test_alpha_pattern_in_the_files_own_bfl_names_applies(tmp_path):
    """PEFT matches `alpha_pattern` keys against the names of the model it trained: for a
    BFL-named file those are BFL names (PEFT's rule: the key matches a dotted suffix)."""
    qkv, proj = "double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj"
    tensors = {**_adapter(f"base_model.model.{qkv}", out=18),
               **_adapter(f"base_model.model.{proj}")}
    _write_safetensors(tmp_path / "adapter_model.safetensors", tensors, with_metadata=False)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": RANK, "lora_alpha": 8, "alpha_pattern": {"img_attn.qkv": 2}}))
    scalings = {layer.module: layer.scaling for layer in read_lora(tmp_path).layers}
    assert scalings == {"transformer_blocks.0.attn.to_q": 2 / RANK,
                        "transformer_blocks.0.attn.to_k": 2 / RANK,
                        "transformer_blocks.0.attn.to_v": 2 / RANK,
                        "transformer_blocks.0.attn.to_out.0": 8 / RANK}
    # a full BFL name, and a kohya name (its prefix stripped), match too
    full = parse_lora(tensors, {"lora_alpha": 8, "alpha_pattern": {qkv: 4}})
    assert {x.scaling for x in full.layers if "to_out" not in x.module} == {4 / RANK}
    kohya = parse_lora(_adapter("lora_unet_double_blocks_0_img_attn_proj"),
                       {"alpha_pattern": {"double_blocks_0_img_attn_proj": 1}})
    assert [x.scaling for x in kohya.layers] == [1 / RANK]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_lora_path_that_is_no_regular_file_says_so(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        with pytest.raises(BonsaiError, match="is not a regular file"):
            lora_path(path)
    os.mkfifo(tmp_path / "pick.safetensors")
    with pytest.raises(BonsaiError, match="pick.safetensors is not a regular file"):
        lora_path(tmp_path, "pick.safetensors")
    _assert_one_error_line(_cli("gen", "-m", str(DISTILLED), "-p", "x", "-o", str(tmp_path),
                                "--lora", str(fifo)), "is not a regular file")


def test_a_scale_that_is_no_number_is_named(tmp_path):
    """`PATH:abc` of a file that exists: the message names the scale, not a missing file,
    from the library (read_lora) and from `gen --lora` (cli.parse_lora_spec)."""
    spec = f"{LORAS / 'bfl.safetensors'}:abc"
    with pytest.raises(BonsaiError, match="as its scale"):
        read_lora(spec)
    _assert_one_error_line(_cli("gen", "-m", str(DISTILLED), "-p", "x", "-o", str(tmp_path),
                                "--lora", spec), "the scale 'abc' is not a number")


def _cli(*args):
    from bonsai_mlx.cli import cli

    from click.testing import CliRunner

    return CliRunner().invoke(cli, list(args))


def _assert_one_error_line(result, phrase: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], lines
