"""Security and data safety (SECURITY.md): each attack or fault of issue 14 reproduced, through
the CLI where a user meets it. Every one must end in one `error:` line and exit 2 (or a
correct result), touch nothing outside the destination and run no code from a model folder."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.models.text_encoder import PromptEncoder

import pytest
from test_cli import assert_user_error, run

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "pipeline" / "distilled"


def copy_model(tmp_path: Path, name: str = "model", source: Path = TINY) -> Path:
    return Path(shutil.copytree(source, tmp_path / name))


def gen_args(model: Path, *extra: str) -> list[str]:
    return ["gen", "-m", str(model), "-p", "a fox", "--size", "32x32", "--steps", "1", *extra]


# ----------------------------------------------------------------------------------------
# 1. No code from a model folder runs, even when a terminal answers "y"


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Where transformers would copy a folder's Python module to import it (kept out of
    the user's cache should the code ever be loaded)."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    return tmp_path / "modules"


def plant_code(folder: Path, marker: Path) -> None:
    """A Python file that writes `marker` when imported, as a tokenizer class would be."""
    (folder / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').write('the folder ran its own code')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )


def add_auto_map(config_file: Path) -> None:
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "EvilTokenizer"  # unknown to transformers: it must ask
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize("config", ["tokenizer/tokenizer_config.json",
                                    "text_encoder/config.json"])
def test_a_folder_naming_custom_code_is_refused_even_when_the_terminal_says_yes(
        tmp_path, modules_cache, config):
    model = copy_model(tmp_path)
    marker = tmp_path / "PWNED"
    plant_code(model / "tokenizer", marker)
    add_auto_map(model / config)
    result = run(*gen_args(model, "-o", str(tmp_path / "out.png")), input="y\ny\ny\n")
    assert_user_error(result, str(model / config), "custom code (auto_map)")
    assert not marker.exists()
    assert not (tmp_path / "out.png").exists()


def test_a_custom_pipeline_component_in_model_index_is_refused(tmp_path):
    model = copy_model(tmp_path)
    index = json.loads((model / "model_index.json").read_text())
    index["transformer"] = ["my_transformer", "MyTransformer"]  # my_transformer.py in the folder
    (model / "model_index.json").write_text(json.dumps(index))
    result = run(*gen_args(model, "-o", str(tmp_path / "out.png")))
    assert_user_error(result, "model_index.json", "transformer: my_transformer")


def test_the_tokenizer_is_loaded_without_remote_code_whatever_stdin_says(
        tmp_path, modules_cache, monkeypatch):
    """Defence in depth: with the folder check switched off, transformers itself is told
    trust_remote_code=False, so its "[y/N]" question is never asked, the code never runs and
    the load fails as a BonsaiError."""
    import bonsai_mlx.models.text_encoder as text_encoder

    model = copy_model(tmp_path)
    marker = tmp_path / "PWNED"
    plant_code(model / "tokenizer", marker)
    add_auto_map(model / "tokenizer" / "tokenizer_config.json")
    monkeypatch.setattr(text_encoder, "check_no_custom_code", lambda *folders: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    encoder = PromptEncoder(model / "text_encoder", model / "tokenizer", dtype="float32")
    with pytest.raises(BonsaiError, match="could not load the tokenizer.*custom code"):
        encoder.tokenize(["a fox"])
    assert not marker.exists()


def test_hub_downloads_never_fetch_python_files():
    import fnmatch

    from bonsai_mlx.pipeline import ALLOW_PATTERNS

    def fetched(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in ALLOW_PATTERNS)

    for name in ("tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "tokenizer/chat_template.jinja"):
        assert fetched(name), name
    for name in ("tokenizer/evil_tokenizer.py", "tokenizer/__init__.py",
                 "transformer/modeling.py", "pipeline.py", "tokenizer/pickle.bin"):
        assert not fetched(name), name


def test_prompt_encoder_alone_refuses_custom_code(tmp_path):
    model = copy_model(tmp_path)
    add_auto_map(model / "tokenizer" / "tokenizer_config.json")
    with pytest.raises(BonsaiError, match="tokenizer_config.json names custom code"):
        PromptEncoder(model / "text_encoder", model / "tokenizer")
