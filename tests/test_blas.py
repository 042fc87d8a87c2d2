"""OpenBLAS core-type selection (bonsai_mlx/_blas.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bonsai_mlx import _blas

import pytest

SAPPHIRE_RAPIDS = set("sse2 avx avx2 fma avx512f avx512bw avx512vl avx512dq avx512cd "
                      "avx512_bf16 amx_bf16 amx_tile amx_int8".split())
ZEN4 = set("sse2 avx avx2 fma avx512f avx512bw avx512vl avx512dq avx512cd avx512_bf16".split())
SKYLAKE_X = set("sse2 avx avx2 fma avx512f avx512bw avx512vl avx512dq avx512cd".split())
ZEN3 = set("sse2 avx avx2 fma".split())

needs_openblas = pytest.mark.skipif(
    not _blas.openblas_status()["loaded"], reason="OpenBLAS is not loaded on this machine")


def test_cpu_coretype_is_the_best_core_the_flags_allow():
    assert _blas.cpu_coretype(SAPPHIRE_RAPIDS, "GenuineIntel") == "SapphireRapids"
    assert _blas.cpu_coretype(ZEN4, "AuthenticAMD") == "Cooperlake"
    assert _blas.cpu_coretype(SKYLAKE_X, "GenuineIntel") == "SkylakeX"
    assert _blas.cpu_coretype(ZEN3, "AuthenticAMD") == "Zen"
    assert _blas.cpu_coretype(ZEN3, "GenuineIntel") == "Haswell"
    assert _blas.cpu_coretype({"sse2", "avx"}, "GenuineIntel") == "Sandybridge"
    assert _blas.cpu_coretype({"sse2", "sse3"}, "GenuineIntel") is None
    assert _blas.cpu_coretype(set(), "") is None  # not x86 (ARM Linux)


def test_only_a_lower_instruction_set_than_the_cpu_asks_for_a_coretype():
    # the Sapphire Rapids host, where OpenBLAS 0.3.21 picked SSE3 kernels
    assert _blas.needs_coretype("SapphireRapids", "Prescott")
    assert _blas.needs_coretype("Cooperlake", "Haswell")
    assert _blas.needs_coretype("Zen", "Nehalem")
    # Zen 4 here: 0.3.21 picks Cooperlake, which is what the flags allow
    assert not _blas.needs_coretype("Cooperlake", "Cooperlake")
    assert not _blas.needs_coretype("Cooperlake", "SkylakeX")  # same tier: OpenBLAS knows best
    assert not _blas.needs_coretype(None, "Prescott")  # nothing known about the CPU
    assert not _blas.needs_coretype("SkylakeX", None)  # no OpenBLAS answer


def test_failed_sgemm_check_keeps_openblas_default(monkeypatch):
    monkeypatch.setattr(_blas, "_STATUS", dict(_blas._STATUS, coretype=None, verified=None))
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    monkeypatch.setenv(_blas._PROBE_ENV, "Prescott")
    monkeypatch.setattr(_blas, "_cpu_info", lambda: (SAPPHIRE_RAPIDS, "GenuineIntel"))
    asked = []

    def probe(coretype, verify):
        asked.append((coretype, verify))
        return {"library": "libopenblas.so.0", "corename": coretype, "verified": False}

    monkeypatch.setattr(_blas, "_probe", probe)
    assert _blas._choose_coretype() is None
    assert asked == [("SapphireRapids", True)]
    assert _blas.openblas_status()["verified"] is False
    # and when the check agrees, the core is chosen
    monkeypatch.setattr(_blas, "_probe", lambda c, verify: {"corename": c, "verified": True})
    assert _blas._choose_coretype() == "SapphireRapids"


@needs_openblas
def test_sgemm_check_passes_on_the_installed_openblas():
    # the core this process runs (one we or the user forced), as the child would load it
    found = _blas._probe(os.environ.get("OPENBLAS_CORETYPE") or None, verify=True)
    assert found["corename"] == _blas.openblas_status()["corename"]
    assert found["verified"] is True


def _status_in_child(cache: Path, **env) -> dict:
    """openblas_status() of a fresh process, its verdicts kept in `cache`."""
    code = "import json, bonsai_mlx._blas as b; print(json.dumps(b.openblas_status()))"
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OPENBLAS_CORETYPE", _blas._PROBE_ENV, _blas._FORCED_ENV)}
    done = subprocess.run([sys.executable, "-c", code],
                          env={**clean, _blas.CACHE_ENV: str(cache), **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@needs_openblas
def test_misdetected_core_is_replaced_by_the_cpus_best(tmp_path):
    target = _blas.cpu_coretype(*_blas._cpu_info())
    if target is None:
        pytest.skip("this CPU has no x86 core above SSE to force")
    # Pretend OpenBLAS picked Prescott here, as it does on the Sapphire Rapids host.
    status = _status_in_child(tmp_path, **{_blas._PROBE_ENV: "Prescott"})
    assert set(status) == {"loaded", "library", "corename", "coretype", "verified"}
    assert status["loaded"] and status["coretype"] == target and status["verified"] is True
    assert _blas.core_tier(status["corename"]) == _blas.core_tier(target)


@needs_openblas
def test_users_coretype_is_left_alone(tmp_path):
    if not _blas._cpu_info()[0]:
        pytest.skip("x86 core names")
    status = _status_in_child(tmp_path, OPENBLAS_CORETYPE="Nehalem")
    assert status["corename"] == "Nehalem"
    assert status["coretype"] is None and status["verified"] is None


# ---------------------------------------------------------------------------------------
# The verdict kept on disk

KEY = {"version": _blas._CACHE_VERSION, "library": "/lib/libopenblas.so.0", "mtime_ns": 1,
       "size": 2, "ld_so_cache_mtime_ns": 3, "ld_library_path": "", "cpu": "Xeon",
       "vendor": "GenuineIntel", "flags": "abc"}


@pytest.fixture
def misdetected(monkeypatch, tmp_path):
    """A Sapphire Rapids host whose OpenBLAS picks Prescott (the issue's), probes counted,
    verdicts kept in tmp_path, the library's key settable."""
    monkeypatch.setattr(_blas, "_STATUS", dict(_blas._STATUS, coretype=None, verified=None))
    for name in ("OPENBLAS_CORETYPE", _blas._PROBE_ENV, _blas._FORCED_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(_blas.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(_blas, "_cpu_info", lambda: (SAPPHIRE_RAPIDS, "GenuineIntel"))
    state = {"key": dict(KEY), "path": KEY["library"], "probes": []}
    monkeypatch.setattr(_blas, "_cache_key", lambda: dict(state["key"]))

    def probe(coretype, verify):
        state["probes"].append((coretype, verify))
        return {"library": "libopenblas.so.0", "path": state["path"],
                "corename": coretype or "Prescott", "verified": True if verify else None}

    monkeypatch.setattr(_blas, "_probe", probe)

    def choose():  # as a new process would: nothing inherited from the last call
        os.environ.pop(_blas._PROBE_ENV, None)
        _blas._STATUS["verified"] = None
        return _blas._choose_coretype()

    state["choose"] = choose
    return state


def test_a_kept_verdict_spares_the_probes(misdetected, tmp_path):
    assert misdetected["choose"]() == "SapphireRapids"
    assert misdetected["probes"] == [(None, False), ("SapphireRapids", True)]
    (kept,) = tmp_path.glob("core-*.json")
    assert json.loads(kept.read_text()) == {"key": KEY, "picked": "Prescott",
                                            "coretype": "SapphireRapids", "verified": True}
    assert misdetected["choose"]() == "SapphireRapids"  # read back: no child this time
    assert len(misdetected["probes"]) == 2
    assert _blas.openblas_status()["verified"] is True
    assert os.environ[_blas._PROBE_ENV] == "Prescott"  # children still inherit the answer
    misdetected["key"]["mtime_ns"] += 1  # OpenBLAS upgraded in place: asked again
    assert misdetected["choose"]() == "SapphireRapids"
    assert len(misdetected["probes"]) == 4


def test_a_corrupt_or_foreign_verdict_is_a_miss(misdetected, tmp_path):
    misdetected["choose"]()
    (kept,) = tmp_path.glob("core-*.json")
    for bad in ("{not json", json.dumps({"key": {**KEY, "cpu": "other"}, "picked": "Haswell",
                                         "coretype": "Haswell", "verified": True}),
                json.dumps({"key": KEY, "picked": 3, "coretype": None, "verified": None}),
                json.dumps({"key": KEY, "picked": "Prescott", "coretype": "Haswell",
                            "verified": True})):  # not a core this CPU's verdict can name
        kept.write_text(bad)
        assert misdetected["choose"]() == "SapphireRapids"
        assert json.loads(kept.read_text())["coretype"] == "SapphireRapids"  # replaced
    assert len(misdetected["probes"]) == 2 * 5


def _hostile_files(kept: Path, other: Path):
    """Ways to plant something at the verdict's path, each of which once crashed or hung
    `import bonsai_mlx`; yields after each is in place."""
    def replace(write):
        kept.unlink(missing_ok=True)
        write()

    good = json.loads(other.read_text())
    for picked in ("Prescott\u0000", "x" * 200_000, "Prescott; rm -rf ~"):
        replace(lambda p=picked: kept.write_text(json.dumps({**good, "picked": p})))
        yield f"picked {picked[:12]!r}"
    replace(lambda: kept.write_text("[" * 100_000))
    yield "nesting"
    replace(lambda: kept.write_text(json.dumps(good) + " " * 10_000))
    yield "oversized"
    replace(lambda: os.mkfifo(kept))
    yield "fifo"
    replace(lambda: kept.symlink_to(other))  # a good verdict, but through a link
    yield "symlink"


def test_a_hostile_verdict_file_is_a_miss_and_never_blocks(misdetected, tmp_path):
    import threading

    misdetected["choose"]()
    (kept,) = tmp_path.glob("core-*.json")
    good = tmp_path / "good.json"
    good.write_text(kept.read_text())
    for n, what in enumerate(_hostile_files(kept, good), start=1):
        result = {}
        reader = threading.Thread(
            target=lambda r=result: r.update(core=misdetected["choose"]()), daemon=True)
        reader.start()
        reader.join(timeout=20)
        assert not reader.is_alive(), f"{what}: reading the verdict blocked"
        assert result == {"core": "SapphireRapids"}, what
        assert len(misdetected["probes"]) == 2 * (n + 1), f"{what}: not probed again"
        assert os.environ[_blas._PROBE_ENV] == "Prescott"
        assert kept.is_file() and not kept.is_symlink()  # replaced by a verdict of ours


def test_no_home_folder_keeps_nothing(misdetected, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(_blas.CACHE_ENV, "~no-such-user-here/cache")
    assert misdetected["choose"]() == "SapphireRapids"
    monkeypatch.setenv(_blas.CACHE_ENV, "relative/cache")
    assert misdetected["choose"]() == "SapphireRapids"
    assert not (tmp_path / "relative").exists() and not (tmp_path / "~no-such-user-here").exists()


def test_no_verdict_is_kept_for_another_file_or_a_failed_check(misdetected, tmp_path,
                                                                  monkeypatch):
    misdetected["path"] = "/elsewhere/libopenblas.so.0"  # the linker found another file
    assert misdetected["choose"]() == "SapphireRapids"
    assert not list(tmp_path.glob("core-*.json"))
    misdetected["path"] = KEY["library"]
    probe = _blas._probe
    monkeypatch.setattr(_blas, "_probe", lambda c, verify: None if verify else probe(c, verify))
    assert misdetected["choose"]() is None  # the checking child died: not a verdict to keep
    assert not list(tmp_path.glob("core-*.json"))


def test_an_unwritable_cache_folder_costs_only_the_probes(misdetected, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(_blas.CACHE_ENV, str(blocker / "cache"))
    assert misdetected["choose"]() == "SapphireRapids"
    assert misdetected["choose"]() == "SapphireRapids"
    assert len(misdetected["probes"]) == 4 and blocker.read_text() == ""


@needs_openblas
def test_a_process_keeps_its_verdict_and_the_next_one_uses_it(tmp_path):
    if not _blas._cpu_info()[0]:
        pytest.skip("x86 core names")
    target = _blas.cpu_coretype(*_blas._cpu_info())
    first = _status_in_child(tmp_path)
    (kept,) = tmp_path.glob("core-*.json")  # found the file the child loaded, without loading
    record = json.loads(kept.read_text())
    assert record["key"] == _blas._cache_key() and record["picked"] == first["corename"]
    # Forged: OpenBLAS picked Prescott and the CPU's best core passed its check. The next
    # process forces that core without asking OpenBLAS (a probe would replace the file).
    forged = {**record, "picked": "Prescott", "coretype": target, "verified": True}
    kept.write_text(json.dumps(forged))
    inode = kept.stat().st_ino
    second = _status_in_child(tmp_path)
    assert second["coretype"] == target and second["verified"] is True
    assert _blas.core_tier(second["corename"]) == _blas.core_tier(target)
    assert kept.stat().st_ino == inode and json.loads(kept.read_text()) == forged
