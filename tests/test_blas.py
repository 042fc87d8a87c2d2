"""OpenBLAS core-type selection (bonsai_mlx/_blas.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
    found = _blas._probe(None, verify=True)
    assert found["corename"] == _blas.openblas_status()["corename"]
    assert found["verified"] is True


def _status_in_child(**env) -> dict:
    code = "import json, bonsai_mlx._blas as b; print(json.dumps(b.openblas_status()))"
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OPENBLAS_CORETYPE", _blas._PROBE_ENV, _blas._FORCED_ENV)}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@needs_openblas
def test_misdetected_core_is_replaced_by_the_cpus_best():
    target = _blas.cpu_coretype(*_blas._cpu_info())
    if target is None:
        pytest.skip("this CPU has no x86 core above SSE to force")
    # Pretend OpenBLAS picked Prescott here, as it does on the Sapphire Rapids host.
    status = _status_in_child(**{_blas._PROBE_ENV: "Prescott"})
    assert set(status) == {"loaded", "library", "corename", "coretype", "verified"}
    assert status["loaded"] and status["coretype"] == target and status["verified"] is True
    assert _blas.core_tier(status["corename"]) == _blas.core_tier(target)


@needs_openblas
def test_users_coretype_is_left_alone():
    if not _blas._cpu_info()[0]:
        pytest.skip("x86 core names")
    status = _status_in_child(OPENBLAS_CORETYPE="Nehalem")
    assert status["corename"] == "Nehalem"
    assert status["coretype"] is None and status["verified"] is None
