"""`bonsai-mlx bench` refuses what it cannot honour before it loads anything: a --json file
it could not write or that is no JSON-lines file of the user's (never appended to), and
steps beyond the pipeline's bound. Each is one `error:` line, exit 2."""

import json
from pathlib import Path

from bonsai_mlx.bench.runner import check_json_lines_target
from bonsai_mlx.cli import cli
from bonsai_mlx.errors import BonsaiError

import pytest
from click.testing import CliRunner

TINY = ["bench", "--tiny", "--steps", "1", "--repeats", "1", "--warmup", "0",
        "--dtype", "float32"]


@pytest.fixture
def loading_forbidden(monkeypatch):
    """A refused run must not get as far as loading (without the check it would run)."""
    def load_target(*args, **kwargs):
        raise AssertionError("the benchmark loaded its model")

    monkeypatch.setattr("bonsai_mlx.bench.runner.load_target", load_target)


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_json_in_a_missing_folder_is_refused_before_running(tmp_path, loading_forbidden):
    path = tmp_path / "missing" / "out.json"
    line = one_line_error([*TINY, "--json", str(path)])
    assert f"--json {path}: the folder {path.parent} does not exist" in line


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
def test_json_in_a_folder_that_cannot_be_written_is_refused(loading_forbidden):
    line = one_line_error([*TINY, "--json", "/proc/bench.json"])
    assert "cannot write to /proc" in line and "--json" in line


def test_an_existing_file_that_is_not_json_lines_is_never_appended_to(tmp_path,
                                                                      loading_forbidden):
    picture = tmp_path / "realpic.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"a": 1}\n[1, 2]\n')
    text = tmp_path / "runs.txt"
    text.write_text('{"a": 1}\n')
    before = {p: p.read_bytes() for p in (picture, notes, text)}
    assert "realpic.png exists and is not a .json / .jsonl file" in one_line_error(
        [*TINY, "--json", str(picture)])
    assert "notes.jsonl: line 2 is not a JSON object" in one_line_error(
        [*TINY, "--json", str(notes)])
    assert "runs.txt exists and is not a .json / .jsonl file" in one_line_error(
        [*TINY, "--json", str(text)])
    (tmp_path / "folder.json").mkdir()  # the CLI's click.Path refuses a folder; run_bench too
    with pytest.raises(BonsaiError, match="folder.json exists and is not a .json / .jsonl"):
        check_json_lines_target(tmp_path / "folder.json")
    assert {p: p.read_bytes() for p in before} == before


def test_new_files_and_json_lines_files_are_accepted(tmp_path):
    check_json_lines_target(tmp_path / "new.png")  # a new file: nothing of the user's
    for name, text in (("runs.jsonl", '{"a": 1}\n\n{"b": [2]}\n'), ("empty.json", ""),
                       ("one.JSON", json.dumps({"schema": 1}))):
        (tmp_path / name).write_text(text)
        check_json_lines_target(tmp_path / name)
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(BonsaiError, match="binary.json: line 1 is not a JSON object"):
        check_json_lines_target(tmp_path / "binary.json")


@pytest.mark.parametrize("option,value,phrase", [
    ("--steps", "100000", "steps must be an integer in 1..1000"),
    ("--steps", "0", "steps must be an integer in 1..1000"),
    ("--repeats", "0", "repeats must be an integer >= 1"),
    ("--warmup", "-1", "warmup must be an integer >= 0"),
])
def test_counts_are_checked_before_loading(loading_forbidden, option, value, phrase):
    args = [a for a in TINY]
    args[args.index(option) + 1] = value
    assert phrase in one_line_error(args)
