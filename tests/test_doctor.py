"""`bonsai-mlx doctor`: on this Linux machine (no Apple GPU: reference path) and on a stand-in
Metal device whose GEMM fails to compile (tests/kernel_doubles.py): verdicts, timings against
the fallback, exit status 1; a bad BONSAI_KERNELS is a user error (exit 2)."""

import json
import sys

from bonsai_mlx import doctor
from bonsai_mlx.cli import cli
from bonsai_mlx.kernels import device, selfcheck
from bonsai_mlx.kernels.device import Device

import kernel_doubles
import pytest
from click.testing import CliRunner
from kernel_cases import needs_cxx


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("BONSAI_KERNEL_CACHE", str(tmp_path / "verdicts"))
    monkeypatch.delenv("BONSAI_KERNELS", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    selfcheck.forget()
    yield
    selfcheck.forget()


def fake_hub_model(hub, repo: str, size: int) -> None:
    """A model in the Hugging Face cache layout: blob, refs/main, snapshot symlink."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "abc123").write_bytes(b"x" * size)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(folder / "blobs" / "abc123")


def test_doctor_on_linux_reports_the_reference_path(tmp_path):
    fake_hub_model(tmp_path / "hub", "prism-ml/tiny-pack", 12345)
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "kernels     no Apple GPU: reference path" in out
    assert "Metal       not available" in out and "MLX         " in out
    assert f"HF cache    {tmp_path / 'hub'}: 1 model(s), 12.35 kB" in out
    assert "prism-ml/tiny-pack" in out and out.rstrip().endswith("result      ok")
    if sys.platform.startswith("linux"):
        assert "OpenBLAS    " in out
    assert ("g++" in out) and ("clang" in out)


def test_doctor_json_is_one_object():
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0
    rep = json.loads(result.output)
    assert rep["kernels"] == {"forced": None, "note": "no Apple GPU: reference path",
                              "verdicts": []}
    assert rep["mlx"] and rep["backend"] == "cpu" and rep["metal"] is False
    assert rep["huggingface_cache"]["models"] == []
    if sys.platform.startswith("linux"):
        assert set(rep["openblas"]) == {"loaded", "library", "corename", "coretype", "verified"}


def test_a_bad_kernel_setting_is_a_user_error(monkeypatch):
    monkeypatch.setenv("BONSAI_KERNELS", "cuda")
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 2
    assert "error: BONSAI_KERNELS='cuda' is not one of" in result.output


@needs_cxx
def test_doctor_on_a_metal_device_with_a_broken_gemm_exits_1(monkeypatch):
    monkeypatch.setattr(doctor, "TIMING_N_K", (40, 256))
    monkeypatch.setattr(doctor, "TIMING_REPEATS", 1)
    # One problem per kernel (the report is under test, not the problems: test_selfcheck.py):
    # each GEMV row is otherwise 8 compiled variants in the emulator.
    monkeypatch.setattr(selfcheck, "PROBLEMS", {k: v[:1] for k, v in selfcheck.PROBLEMS.items()})
    stand_in = Device(chip="Apple M0 (test double)", has_metal=True,
                      factory=kernel_doubles.gemm_compile_error, isolated=False)
    with device.use(stand_in):  # (verdicts for a report warn nothing)
        result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 1, result.output
    rep = json.loads(result.output)
    rows = {row["id"]: row for row in rep["kernels"]["verdicts"]}
    assert len(rows) == 18 and rep["kernels"]["device"] == "Apple M0 (test double)"
    broken = {i for i, r in rows.items() if not r["usable"]}
    assert broken == {f"gemm/{f}/{d}" for f in ("binary", "ternary")
                      for d in ("bfloat16", "float16", "float32")}
    assert all("Unable to build metal library" in rows[i]["reason"] for i in broken)
    assert all(r["kernel_ms"] > 0 and r["fallback_ms"] > 0 for i, r in rows.items()
               if i not in broken)

    with device.use(stand_in):  # the text form, from the cached verdicts
        text = CliRunner().invoke(cli, ["doctor"]).output
    assert "  gemm/binary/bfloat16         FELL BACK: RuntimeError: [metal::Device]" in text
    assert "result      6 kernel(s) fell back to the reference path" in text

