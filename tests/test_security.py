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


# ----------------------------------------------------------------------------------------
# 2. convert --overwrite / save_pretrained(overwrite=True) replace only a model folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A model folder bonsai-mlx wrote (the tiny pipeline, converted as it is)."""
    from bonsai_mlx.convert import convert

    return convert(TINY, tmp_path_factory.mktemp("converted") / "model", echo=None).destination


def snapshot(*folders: Path) -> dict[Path, bytes]:
    """Every file below `folders` (hidden ones included) with its bytes."""
    return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def a_project(folder: Path) -> Path:
    """A folder a user cares about: sources, notes, a git repository."""
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.txt").write_text("years of work")
    return folder


def convert_overwrite(src: Path, dst: Path | str):
    return run("convert", str(src), str(dst), "--overwrite", "-q")


def test_convert_into_the_current_folder_deletes_nothing(tmp_path, monkeypatch, converted):
    src = copy_model(tmp_path, "src")
    for work in (a_project(tmp_path / "project"), copy_model(tmp_path, "ours", converted)):
        monkeypatch.chdir(work)
        before = snapshot(tmp_path)
        assert_user_error(convert_overwrite(src, "."), "current folder")
        assert snapshot(tmp_path) == before


def test_convert_into_a_folder_holding_the_source_deletes_nothing(tmp_path, converted):
    parent = a_project(tmp_path / "parent")
    src = copy_model(parent, "model")
    before = snapshot(tmp_path)
    assert_user_error(convert_overwrite(src, parent), "holding the source")
    # also when the folder around the source is one bonsai-mlx wrote
    ours = copy_model(tmp_path, "ours", converted)
    inner = copy_model(ours, "inner")
    before = snapshot(tmp_path)
    assert_user_error(convert_overwrite(inner, ours), "holding the source")
    assert snapshot(tmp_path) == before


def test_convert_into_a_folder_inside_the_source_deletes_nothing(tmp_path, converted):
    src = copy_model(tmp_path, "src")
    before = snapshot(tmp_path)
    assert_user_error(convert_overwrite(src, src / "transformer"), "inside the source")
    assert snapshot(tmp_path) == before
    # also when that inner folder is a model folder bonsai-mlx wrote
    copy_model(src, "converted", converted)
    before = snapshot(tmp_path)
    assert_user_error(convert_overwrite(src, src / "converted"), "inside the source")
    assert snapshot(tmp_path) == before


def test_convert_into_the_home_folder_deletes_nothing(tmp_path, monkeypatch, converted):
    src = copy_model(tmp_path, "src")
    for home in (a_project(tmp_path / "home"), copy_model(tmp_path, "ours", converted)):
        monkeypatch.setenv("HOME", str(home))
        before = snapshot(tmp_path)
        assert_user_error(convert_overwrite(src, "~"), "home folder")
        assert_user_error(convert_overwrite(src, tmp_path), "home folder")  # holds home
        assert snapshot(tmp_path) == before


def test_convert_into_a_filesystem_root_or_mount_point_deletes_nothing(
        tmp_path, monkeypatch, converted):
    import os.path

    src = copy_model(tmp_path, "src")
    assert_user_error(convert_overwrite(src, "/"), "filesystem root")
    ours = copy_model(tmp_path, "ours", converted)
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == ours or real_ismount(p))
    before = snapshot(tmp_path)
    assert_user_error(convert_overwrite(src, ours), "mount point")
    assert snapshot(tmp_path) == before


def test_convert_never_replaces_a_folder_that_is_not_a_model(tmp_path):
    src = copy_model(tmp_path, "src")
    project = a_project(tmp_path / "project")
    before = snapshot(tmp_path)
    assert_user_error(convert_overwrite(src, project), "not a model folder")
    assert snapshot(tmp_path) == before


def test_convert_replaces_a_model_folder_it_wrote_and_keeps_everything_else(
        tmp_path, converted):
    src = copy_model(tmp_path, "src")
    ours = copy_model(tmp_path, "ours", converted)
    (ours / "stale.txt").write_text("replaced with the folder")
    a_project(tmp_path / "project")
    others = snapshot(tmp_path / "src", tmp_path / "project")
    result = convert_overwrite(src, ours)
    assert result.exit_code == 0, result.output
    assert not (ours / "stale.txt").exists() and (ours / "model_index.json").is_file()
    assert snapshot(tmp_path / "src", tmp_path / "project") == others
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "project", "src"]


def test_save_pretrained_uses_the_same_rule(tmp_path, monkeypatch, converted):
    from bonsai_mlx.pipeline import Pipeline

    src = copy_model(tmp_path / "outer", "src")
    pipe = Pipeline.from_pretrained(src, dtype="float32")
    monkeypatch.chdir(copy_model(tmp_path, "ours", converted))
    before = snapshot(tmp_path)
    for dst, phrase in ((".", "current folder"), (tmp_path / "outer", "holding the source"),
                        (src, "loaded from"), (src / "tokenizer", "inside the source"),
                        (src / "vae", "inside the source")):
        with pytest.raises(BonsaiError, match=phrase):
            pipe.save_pretrained(dst, overwrite=True)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------
# 3. Bounded work: steps, and memory checked before any model is loaded


@pytest.mark.parametrize("steps", ["1000000000", str(10**30), "1001"])
def test_steps_are_bounded_on_the_command_line(tmp_path, steps):
    result = run("gen", "-m", str(TINY), "-p", "a fox", "--size", "32x32", "--steps", steps,
                 "-o", str(tmp_path / "out.png"))
    assert_user_error(result, "'--steps'", "1<=x<=1000")


def test_steps_are_bounded_in_the_api():
    from bonsai_mlx.pipeline import Pipeline
    from bonsai_mlx.scheduler import SchedulerConfig, make_schedule

    pipe = Pipeline.from_pretrained(TINY, dtype="float32")
    for kwargs in (dict(steps=10**9), dict(steps=10**30), dict(sigmas=[0.5] * 1001)):
        with pytest.raises(BonsaiError, match="1..1000|1 to 1000"):
            pipe.generate("a fox", width=32, height=32, **kwargs)
    with pytest.raises(BonsaiError, match="1..1000"):
        make_schedule(SchedulerConfig(), 1001, 16)
    assert make_schedule(SchedulerConfig(), 1000, 16).num_steps == 1000


@pytest.fixture
def loading_forbidden(monkeypatch):
    """Any attempt to load a model fails the test."""
    from bonsai_mlx.pipeline import Pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(Pipeline, "from_pretrained", refuse)


def test_a_size_that_does_not_fit_in_memory_fails_before_loading(
        tmp_path, monkeypatch, loading_forbidden):
    import bonsai_mlx.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda: 4 * 10**9)
    result = run("gen", "-m", str(TINY), "-p", "a fox", "--size", "4096x4096",
                 "-o", str(tmp_path / "out.png"))
    assert_user_error(result, "4096x4096 needs about", "4.0 GB is available",
                      "the largest size that fits is", "BONSAI_NO_MEMORY_CHECK")
    # the size it names fits, and 16 pixels more would not
    fit = result.stderr.split("the largest size that fits is ")[1].split(";")[0].split(" ")[0]
    w, h = map(int, fit.split("x"))
    sizes = memory.read_model_sizes(TINY, "float32")
    assert memory.estimate_memory(sizes, w, h, dtype="float32").total <= 4 * 10**9
    assert memory.estimate_memory(sizes, w + 16, h + 16, dtype="float32").total > 4 * 10**9
    assert not (tmp_path / "out.png").exists()


def test_tiled_decoding_is_suggested_when_it_fits(tmp_path, monkeypatch, loading_forbidden):
    import bonsai_mlx.memory as memory

    sizes = memory.read_model_sizes(TINY, "float32")
    untiled = memory.estimate_memory(sizes, 1536, 1536, dtype="float32", tiled_vae=False)
    tiled = memory.estimate_memory(sizes, 1536, 1536, dtype="float32", tiled_vae=True)
    assert tiled.total < untiled.total  # the VAE dominates for the tiny model
    monkeypatch.setattr(memory, "available_memory", lambda: (tiled.total + untiled.total) // 2)
    result = run("gen", "-m", str(TINY), "-p", "a fox", "--size", "1536x1536", "--no-tile-vae",
                 "-o", str(tmp_path / "out.png"))
    assert_user_error(result, "decoding in tiles (--tile-vae", "which fits")
    monkeypatch.setenv("BONSAI_NO_MEMORY_CHECK", "1")  # the way around an estimate
    result = run("gen", "-m", str(TINY), "-p", "a fox", "--size", "1536x1536", "--no-tile-vae",
                 "-o", str(tmp_path / "out.png"))
    assert "the model was loaded before the check" in str(result.exception)


@pytest.mark.parametrize("size", [256, 512])
def test_memory_estimate_is_within_2x_of_the_measured_peak(size):
    """The estimate against MLX's own peak for a real generation (the tiny model, CPU)."""
    import bonsai_mlx.memory as memory
    from bonsai_mlx.pipeline import Pipeline

    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.cpu:
        pytest.skip("the CPU estimate")
    pipe = Pipeline.from_pretrained(TINY, dtype="float32")
    pipe.generate("a fox", width=size, height=size, steps=1, seed=0, output_type="np")
    measured = pipe.last_peak_memory
    estimate = memory.estimate_memory(memory.read_model_sizes(TINY, "float32"), size, size,
                                      dtype="float32").total
    assert 0.5 <= estimate / measured <= 2, (estimate, measured)
