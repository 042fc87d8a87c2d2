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

import numpy as np
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

    from bonsai_mlx.layout import ALLOW_PATTERNS

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
    for (width, height), fits in (((w, h), True), ((w + 16, h + 16), False)):
        estimate = memory.estimate_memory(sizes, width, height, dtype="float32",
                                          available=4 * 10**9)  # tiled as fits in that
        assert (estimate.total <= 4 * 10**9) == fits
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


# ----------------------------------------------------------------------------------------
# 4 and 5. Faults a user causes end in one error line, and bad destinations are found
# before the model is loaded


def bomb_png(path: Path, side: int = 20_000) -> Path:
    """A real decompression bomb: a side x side 1-bit PNG of zeros, 50 kB on disk, 400 MP
    (over PIL's 179 MP limit) once decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    z = zlib.compressobj(9)
    row = b"\0" * (1 + side // 8)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def alarm():
    """Fail a test that blocks (a FIFO read) instead of hanging the suite."""
    import signal

    def expired(*_):
        raise TimeoutError("blocked for 30 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, loading_forbidden):
    from bonsai_mlx.images import load_image

    bomb = bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    result = run("gen", "-m", str(TINY), "-p", "a fox", "--image", str(bomb),
                 "-o", str(tmp_path / "out.png"))
    assert_user_error(result, "--image", "bomb.png", "400000000 pixels", "smaller image")
    with pytest.raises(BonsaiError, match="bomb.png.*400000000 pixels"):
        load_image(bomb)


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_an_image_that_is_not_a_regular_file_is_refused_without_blocking(
        tmp_path, alarm, loading_forbidden, kind):
    import os

    from bonsai_mlx.images import load_image

    path = {"fifo": tmp_path / "photo.png", "device": Path("/dev/zero"),
            "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    result = run("gen", "-m", str(TINY), "-p", "a fox", "--image", str(path),
                 "-o", str(tmp_path / "out.png"))
    assert_user_error(result, str(path), "not a regular file")
    with pytest.raises(BonsaiError, match="not a regular file"):
        load_image(path)


def test_a_prompt_that_is_not_utf8_is_one_error_line(tmp_path):
    """The real command line: bytes that are not UTF-8 in argv (no CliRunner in between)."""
    import subprocess

    out = tmp_path / "out.png"
    result = subprocess.run(
        [sys.executable, "-m", "bonsai_mlx.cli", "gen", "-m", str(TINY), "-p",
         b"a \xff\xfe fox", "--size", "32x32", "--steps", "1", "-o", str(out)],
        capture_output=True, timeout=120)
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == ("error: --prompt is not valid UTF-8 text (0xff 0xfe at character 2); "
                        "write it as UTF-8")
    assert not out.exists()


def test_text_that_is_not_utf8_is_refused_by_the_api_too():
    from bonsai_mlx.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(TINY, dtype="float32")
    bad = b"a \xff fox".decode("utf-8", "surrogateescape")
    with pytest.raises(BonsaiError, match=r"the prompt is not valid UTF-8 text \(0xff"):
        pipe.generate(bad, width=32, height=32, steps=1)
    with pytest.raises(BonsaiError, match="the prompt is not valid UTF-8"):
        pipe.encode_prompt(["fine", bad])
    result = run(*gen_args(TINY, "--negative-prompt", bad))
    assert_user_error(result, "--negative-prompt is not valid UTF-8 text (0xff")


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("config, changes, phrases", [
    ("scheduler/scheduler_config.json", dict(num_train_timesteps="1000 steps"),
     ["num_train_timesteps must be an integer, not '1000 steps'"]),
    ("scheduler/scheduler_config.json", dict(shift="abc", use_dynamic_shifting=False),
     ["shift must be a number, not 'abc'"]),
    ("scheduler/scheduler_config.json", dict(shift=float("nan")),
     ["shift must be a positive finite number"]),
    ("scheduler/scheduler_config.json", dict(use_dynamic_shifting="yes"),
     ["use_dynamic_shifting must be true or false"]),
    ("scheduler/scheduler_config.json", dict(shift_terminal=1.5),
     ["shift_terminal must be in [0, 1)"]),
    ("transformer/config.json", dict(num_attention_heads=0),
     ["num_attention_heads must be an integer in 1..1024, not 0"]),
    ("transformer/config.json", dict(attention_head_dim=-16),
     ["attention_head_dim must be an integer in 1..65536"]),
    ("transformer/config.json", dict(mlp_ratio="3"), ["mlp_ratio must be a number"]),
    ("transformer/config.json", dict(num_layers=1.5), ["num_layers must be an integer"]),
    ("transformer/config.json", dict(axes_dims_rope=4), ["axes_dims_rope must be a list"]),
    ("vae/config.json", dict(norm_num_groups=0), ["norm_num_groups must be an integer in 1..8192"]),
    ("vae/config.json", dict(block_out_channels=[]), ["block_out_channels must be a non-empty"]),
    ("vae/config.json", dict(norm_num_groups=5), ["block_out_channels 16 does not split"]),
    ("text_encoder/config.json", dict(num_attention_heads=0),
     ["num_attention_heads must be an integer in 1..1024"]),
    ("text_encoder/config.json", dict(num_key_value_heads=3),
     ["multiple of num_key_value_heads"]),
    ("text_encoder/config.json", dict(rms_norm_eps="tiny"), ["rms_norm_eps must be a number"]),
])
def test_impossible_configs_are_one_error_line_naming_the_file(tmp_path, config, changes,
                                                               phrases):
    model = copy_model(tmp_path)
    edit_json(model / config, **changes)
    result = run(*gen_args(model, "-o", str(tmp_path / "out.png")))
    assert_user_error(result, str(model / config), *phrases)
    assert not (tmp_path / "out.png").exists()


def test_a_vae_folder_without_config_json_names_it(tmp_path):
    model = copy_model(tmp_path)
    (model / "vae" / "config.json").unlink()
    result = run(*gen_args(model, "-o", str(tmp_path / "out.png")))
    assert_user_error(result, f"{model / 'vae'} has no config.json", "norm_num_groups 32",
                      "add the VAE's config.json")


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A folder nothing can be written to, even by root: a read-only tmpfs where one can be
    mounted (root), else mode 555 (others), else every create in it fails as on one."""
    import errno
    import os
    import subprocess
    import tempfile

    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                              str(folder)], capture_output=True).returncode == 0
    if not mounted:
        def failing(real):
            def create(*args, dir=None, **kwargs):
                if dir is not None and Path(dir).resolve() == folder.resolve():
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
                return real(*args, dir=dir, **kwargs)
            return create

        for name in ("mkstemp", "mkdtemp"):
            monkeypatch.setattr(tempfile, name, failing(getattr(tempfile, name)))
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 kB tmpfs (root only; the failing-writer tests below cover the rest)."""
    import os
    import subprocess

    folder = tmp_path / "full"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the failing-writer tests cover a full disk")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_folder_fails_before_loading(read_only_dir, loading_forbidden):
    result = run(*gen_args(TINY, "-o", str(read_only_dir / "out.png")))
    assert_user_error(result, f"cannot write to {read_only_dir}", "choose another -o")
    result = run(*gen_args(TINY, "-o", str(read_only_dir / "new" / "folder") + "/"))
    assert_user_error(result, f"cannot write to {read_only_dir}")


def test_a_file_used_as_output_folder_fails_before_loading(tmp_path, loading_forbidden):
    (tmp_path / "notes.txt").write_text("mine")
    result = run(*gen_args(TINY, "-o", str(tmp_path / "notes.txt" / "out.png")))
    assert_user_error(result, "notes.txt is a file, not a folder", "choose another -o")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_full_output_disk_fails_before_loading(full_disk, loading_forbidden):
    result = run("gen", "-m", str(TINY), "-p", "a fox", "--size", "256x256",
                 "-o", str(full_disk / "out.png"))
    assert_user_error(result, "bytes free", "are needed", "choose another -o")
    assert list(full_disk.iterdir()) == []


def test_a_disk_that_fills_while_writing_the_png_is_one_error_line(tmp_path, monkeypatch):
    """The failing writer: the space check passed, then the disk filled up."""
    import errno

    from PIL import Image

    def no_space(image, fp, filename, *args):
        fp.write(b"\x89PNG\r\n")  # part of the file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    Image.init()
    monkeypatch.setitem(Image.SAVE, "PNG", no_space)
    result = run(*gen_args(TINY, "-o", str(tmp_path / "out.png")))
    assert_user_error(result, "cannot write", "out.png", "No space left on device")
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_a_read_only_convert_destination_fails_before_loading(read_only_dir, loading_forbidden):
    result = run("convert", str(TINY), str(read_only_dir / "converted"), "-q")
    assert_user_error(result, f"cannot write to {read_only_dir}",
                      "choose another destination")


def test_a_full_convert_destination_is_one_error_line_and_leaves_nothing(full_disk):
    result = run("convert", str(TINY), str(full_disk / "converted"), "-q")
    assert_user_error(result, f"cannot write {full_disk / 'converted'}", "nothing was written")
    assert list(full_disk.iterdir()) == []


def test_a_convert_whose_disk_fills_up_is_one_error_line_and_leaves_nothing(
        tmp_path, monkeypatch):
    import mlx.core as mx

    def unable(path, *args, **kwargs):
        raise RuntimeError(f"[write] Unable to write 1564 bytes to file {path}.")

    monkeypatch.setattr(mx, "save_safetensors", unable)
    result = run("convert", str(TINY), str(tmp_path / "converted"), "-q")
    assert_user_error(result, f"cannot write {tmp_path / 'converted'}", "Unable to write",
                      "is the disk full?", "nothing was written")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# 6. Non-finite latents stop with the step named; no NaN image is ever written


def test_an_overflowing_guidance_stops_with_the_step_and_writes_no_png(tmp_path):
    """float16 overflows to infinity, then NaN: before, a black PNG and exit 0."""
    out = tmp_path / "out.png"
    result = run("gen", "-m", str(FIXTURES / "pipeline" / "base"), "-p", "a fox", "--size",
                 "32x32", "--steps", "3", "--seed", "1", "--dtype", "float16",
                 "--guidance", "1e38", "-o", str(out))
    assert_user_error(result, "step 2 of 3 produced non-finite latents",
                      "lower the guidance (1e+38)", "another dtype than float16")
    assert list(tmp_path.iterdir()) == []


def test_the_first_non_finite_step_is_named(monkeypatch):
    """The transformer's prediction turns to NaN at the second step of three."""
    from bonsai_mlx.pipeline import Pipeline

    import mlx.core as mx

    pipe = Pipeline.from_pretrained(TINY, dtype="float32")
    calls = []
    real = type(pipe.transformer).__call__

    def nan_from_the_second_call(self, *args, **kwargs):
        calls.append(1)
        out = real(self, *args, **kwargs)
        return out * mx.array(float("nan")) if len(calls) == 2 else out

    monkeypatch.setattr(type(pipe.transformer), "__call__", nan_from_the_second_call)
    with pytest.raises(BonsaiError, match=r"^step 2 of 3 produced non-finite latents.*"
                                          r"use another dtype than float32"):
        pipe.generate("a fox", width=32, height=32, steps=3, seed=0)
    with pytest.raises(BonsaiError, match="latents contain NaN"):
        pipe.generate("a fox", width=32, height=32, steps=1,
                      latents=np.full((1, 128, 2, 2), np.nan, np.float32))


def test_a_non_finite_decode_is_refused(monkeypatch):
    from bonsai_mlx.pipeline import Pipeline

    import mlx.core as mx

    pipe = Pipeline.from_pretrained(TINY, dtype="float32")
    real = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, **kw: real(z, **kw) / mx.array(0.0))
    with pytest.raises(BonsaiError, match="decoding image 1 produced non-finite pixels"):
        pipe.generate("a fox", width=32, height=32, steps=1, seed=0)


@pytest.fixture(scope="module")
def ternary_model(tmp_path_factory) -> Path:
    """A tiny pipeline converted to bonsai-mlx's ternary format."""
    from bonsai_mlx.convert import convert

    from bonsai_packs import dense_transformer_weights, write_unpacked

    root = tmp_path_factory.mktemp("ternary")
    unpacked = write_unpacked(root / "unpacked", dense_transformer_weights("ternary", seed=2))
    return convert(unpacked, root / "ternary", "ternary", echo=None).destination


def test_a_ternary_byte_of_243_or_more_is_refused(tmp_path, ternary_model):
    from bonsai_mlx.pipeline import Pipeline

    import mlx.core as mx

    model = copy_model(tmp_path, "corrupt", ternary_model)
    weights_file = model / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = dict(mx.load(str(weights_file)))
    name = "single_transformer_blocks.1.attn.to_out.weight"
    assert tensors[name].dtype == mx.uint8 and tensors[name].max().item() < 243
    Pipeline.from_pretrained(model, dtype="float32")  # loads before the corruption
    packed = np.array(tensors[name])
    packed[3, 1] = 250
    tensors[name] = mx.array(packed)
    mx.save_safetensors(str(weights_file), tensors, metadata={"format": "mlx"})
    with pytest.raises(BonsaiError, match=f"{name} holds the byte 250.*corrupt"):
        Pipeline.from_pretrained(model, dtype="float32")
    result = run(*gen_args(model, "-o", str(tmp_path / "out.png")))
    assert_user_error(result, name, "byte 250", "< 243")
    assert not (tmp_path / "out.png").exists()


# ----------------------------------------------------------------------------------------
# 7. The prompt cache: keyed on the weights' bytes, checked on read, never fatal


def flip_weight_signs(weights_file: Path, tensor: str) -> None:
    """Change a tensor's values in place: same file size, same header, same names."""
    import os
    import struct

    from bonsai_mlx.weights import read_safetensors_header

    info = read_safetensors_header(weights_file)[tensor]
    raw = bytearray(weights_file.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start, stop = (8 + n + o for o in info["data_offsets"])
    size = {"F32": 4, "F16": 2, "BF16": 2}[info["dtype"]]
    for i in range(start + size - 1, stop, size):
        raw[i] ^= 0x80  # the sign bit of each little-endian value
    stat = weights_file.stat()
    weights_file.write_bytes(bytes(raw))
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def encoder_of(model: Path, cache: Path) -> PromptEncoder:
    return PromptEncoder(model / "text_encoder", model / "tokenizer", dtype="float32",
                         max_sequence_length=24, cache_dir=cache)


def test_new_weights_with_the_same_sizes_and_headers_miss_the_cache(tmp_path):
    from bonsai_mlx.weights import read_safetensors_header

    model = copy_model(tmp_path)
    weights_file = model / "text_encoder" / "model.safetensors"
    old = np.array(encoder_of(model, tmp_path / "cache").encode("a fox"))
    header = read_safetensors_header(weights_file)
    flip_weight_signs(weights_file, "model.embed_tokens.weight")
    assert read_safetensors_header(weights_file) == header
    fresh = encoder_of(model, tmp_path / "cache")
    new = np.array(fresh.encode("a fox"))
    assert fresh.loads == 1 and not np.array_equal(new, old)
    uncached = PromptEncoder(model / "text_encoder", model / "tokenizer", dtype="float32",
                             max_sequence_length=24)
    np.testing.assert_array_equal(new, np.array(uncached.encode("a fox")))


def test_weights_are_hashed_once_per_file_and_process(tmp_path, monkeypatch):
    import bonsai_mlx.weights as weights

    model = copy_model(tmp_path)
    hashed = []
    real = weights._hash_file
    monkeypatch.setattr(weights, "_DIGESTS", {})
    monkeypatch.setattr(weights, "_hash_file", lambda path: hashed.append(path) or real(path))
    for _ in range(3):
        encoder_of(model, tmp_path / "cache").encode("a fox")
    assert hashed == [(model / "text_encoder" / "model.safetensors").resolve()]


@pytest.mark.parametrize("damage", ["one byte", "garbage", "truncated", "empty"])
def test_a_corrupt_cache_entry_warns_is_recomputed_and_rewritten(tmp_path, damage):
    model = copy_model(tmp_path)
    cache = tmp_path / "cache"
    right = np.array(encoder_of(model, cache).encode("a fox"))
    (entry,) = cache.glob("*.safetensors")
    raw = bytearray(entry.read_bytes())
    if damage == "one byte":
        raw[-7] ^= 0x40  # a value in the data, the header intact
    entry.write_bytes({"one byte": bytes(raw), "garbage": b"not a safetensors file",
                       "truncated": bytes(raw[:-100]), "empty": b""}[damage])
    second = encoder_of(model, cache)
    with pytest.warns(UserWarning, match=f"prompt cache entry {entry} is unusable"):
        again = np.array(second.encode("a fox"))
    assert second.loads == 1
    np.testing.assert_array_equal(again, right)
    third = encoder_of(model, cache)  # rewritten: a clean hit, no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.array(third.encode("a fox")), right)
    assert third.loads == 0


def test_a_read_only_cache_folder_keeps_generating(read_only_dir):
    from bonsai_mlx.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(TINY, dtype="float32", prompt_cache_dir=read_only_dir)
    with pytest.warns(UserWarning, match=f"cannot write the prompt cache in {read_only_dir}"):
        image = pipe.generate("a fox", width=32, height=32, steps=1, seed=0, output_type="np")
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    plain = Pipeline.from_pretrained(TINY, dtype="float32")
    np.testing.assert_array_equal(
        image, plain.generate("a fox", width=32, height=32, steps=1, seed=0, output_type="np"))
    assert not list(read_only_dir.iterdir())


# ----------------------------------------------------------------------------------------
# 8. Small ones: file modes, stale temporary folders, the notebook, ignored negative
# prompts, numpy numbers


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_pngs_get_the_mode_the_umask_gives(tmp_path, umask):
    import os

    previous = os.umask(umask)
    try:
        result = run(*gen_args(TINY, "-o", str(tmp_path / "out.png"), "-q"))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o666 & ~umask


def dead_pid() -> int:
    import subprocess

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def run_cli_process(*args: str):
    """The command line in a new process: a next run, as a user makes one."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "bonsai_mlx.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_a_killed_conversion_leaves_no_partial_folder_after_the_next_run(tmp_path):
    import signal
    import subprocess

    killed = subprocess.Popen([sys.executable, "-c", f"""
import time
import bonsai_mlx.saving as saving
def hang(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(300)
saving.save_vae_files = hang
from bonsai_mlx.convert import convert
convert({str(TINY)!r}, {str(tmp_path / "out")!r}, echo=None)
"""], stdout=subprocess.PIPE, text=True)
    assert killed.stdout.readline() == "writing\n"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(f".out.partial-{killed.pid}-")
    result = run_cli_process("convert", str(TINY), str(tmp_path / "out"), "-q")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_only_our_stale_temporary_folders_are_cleaned(tmp_path):
    import os
    import time

    from bonsai_mlx.weights import remove_stale_temp_dirs

    dead, past = dead_pid(), time.time() - 3600
    ours_dead = tmp_path / f".model.partial-{dead}-abc123"
    ours_alive = tmp_path / f".model.partial-{os.getpid()}-abc123"
    not_ours = [tmp_path / ".model.partial-abc123", tmp_path / f".model.backup-{dead}-abc",
                tmp_path / "model.partial-1-abc", tmp_path / ".config"]
    for folder in (ours_dead, ours_alive, *not_ours):
        (folder / "data").mkdir(parents=True)
    link = tmp_path / f".other.partial-{dead}-abc123"
    link.symlink_to(tmp_path / ".config")
    file = tmp_path / f".file.partial-{dead}-abc123"
    file.write_text("a file, not our folder")
    recent = tmp_path / f".model.partial-{dead}-new123"  # newer than this process
    (recent / "data").mkdir(parents=True)
    for p in (ours_dead, ours_alive, *not_ours, file):
        os.utime(p, (past, past))
    assert remove_stale_temp_dirs(tmp_path) == [ours_dead]
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {p.name for p in (ours_alive, *not_ours, link, file, recent)}
    assert (tmp_path / ".config" / "data").is_dir()  # the link's target is untouched


def test_a_stale_old_folder_is_put_back_when_its_replacement_never_arrived(tmp_path):
    import os
    import time

    from bonsai_mlx.weights import remove_stale_temp_dirs

    dead, past = dead_pid(), time.time() - 3600
    old = tmp_path / f".model.old-{dead}-abc123"
    (old / "model").mkdir(parents=True)
    (old / "model" / "model_index.json").write_text("{}")
    os.utime(old, (past, past))
    remove_stale_temp_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (tmp_path / "model" / "model_index.json").read_text() == "{}"


def test_the_notebook_installs_from_this_checkout():
    notebook = Path(__file__).parents[1] / "examples" / "quickstart.ipynb"
    cells = json.loads(notebook.read_text())["cells"]
    installs = [line.strip() for c in cells if c["cell_type"] == "code"
                for line in c["source"] if line.lstrip().startswith("%pip")]
    assert len(installs) == 1, installs
    target = installs[0].split()[-1]
    assert "-e" in installs[0].split() and not target.startswith("bonsai")
    root = (notebook.parent / target).resolve()
    assert 'name = "bonsai-mlx"' in (root / "pyproject.toml").read_text()


def test_a_negative_prompt_on_a_distilled_model_warns_and_is_not_recorded(tmp_path):
    from bonsai_mlx.pipeline import Pipeline

    from PIL import Image

    out = tmp_path / "out.png"
    result = run(*gen_args(TINY, "--negative-prompt", "blurry", "-o", str(out)))
    assert result.exit_code == 0, result.output
    assert "warning: negative_prompt is ignored" in result.stderr
    assert "guidance-distilled" in result.stderr
    with Image.open(out) as im:
        assert "negative_prompt" not in im.text
    base = Pipeline.from_pretrained(FIXTURES / "pipeline" / "base", dtype="float32")
    with pytest.warns(UserWarning, match="guidance 1 <= 1 uses none"):
        base.generate("a fox", width=32, height=32, steps=1, guidance=1.0,
                      negative_prompt="blurry")


def test_a_negative_prompt_that_is_used_is_recorded(tmp_path):
    from PIL import Image

    out = tmp_path / "out.png"
    result = run(*gen_args(FIXTURES / "pipeline" / "base", "--negative-prompt", "blurry",
                           "-o", str(out)))
    assert result.exit_code == 0 and "warning" not in result.stderr, result.output
    with Image.open(out) as im:
        assert im.text["negative_prompt"] == "blurry"


def test_numpy_numbers_are_numbers():
    from bonsai_mlx.pipeline import Pipeline

    from PIL import Image

    pipe = Pipeline.from_pretrained(TINY, dtype="float32")
    image = Image.new("RGB", (64, 64), (100, 50, 20))

    def make(**kw):
        return pipe.generate("a fox", output_type="np", **kw)

    np.testing.assert_array_equal(
        make(width=np.int64(32), height=np.int32(32), steps=np.int64(2), seed=np.uint32(3),
             num_images=np.int8(1), guidance=np.float32(1.0)),
        make(width=32, height=32, steps=2, seed=3, num_images=1, guidance=1.0))
    np.testing.assert_array_equal(
        make(images=[image], strength=np.float32(0.5), steps=2, seed=0),
        make(images=[image], strength=0.5, steps=2, seed=0))
    for bad in (dict(width=np.float64(32.0)), dict(steps=np.True_), dict(strength=np.nan)):
        with pytest.raises(BonsaiError):
            make(**{"width": 32, "height": 32, "steps": 1, **bad})


def test_security_md_names_what_exists():
    """SECURITY.md points at code (`bonsai_mlx.pipeline.check_destination`, ...) and tests:
    each must exist, so the page cannot drift from what is checked."""
    import importlib
    import re

    root = Path(__file__).parents[1]
    page = (root / "SECURITY.md").read_text()
    dotted = set(re.findall(r"`(bonsai_mlx(?:\.\w+)+)`", page))
    assert {"bonsai_mlx.pipeline.check_destination", "bonsai_mlx.pipeline.ALLOW_PATTERNS"} <= dotted
    for name in dotted:
        module, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module), attr), name
    for path in re.findall(r"`((?:bonsai_mlx|tests|docs)/[\w/.]+)`", page):
        assert (root / path).exists(), path
    assert "[SECURITY.md](SECURITY.md)" in (root / "README.md").read_text()
