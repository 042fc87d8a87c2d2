"""Freed memory is kept for reuse on Linux (bonsai_mlx/_malloc.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Faults while a second, same-sized 64 MB op runs after the first one's output was freed.
CHILD = r"""
import json, resource
import bonsai_mlx, mlx.core as mx
from bonsai_mlx._malloc import malloc_status
x = mx.ones((16, 1024, 1024)); mx.eval(x)
def faults():
    y = x * 2.0; mx.eval(y); del y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = faults(); b = faults(); c = faults()
print(json.dumps({"faults": c - b, **malloc_status()}))
"""


def _second_op_faults(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "BONSAI_MALLOC_DEFAULT"}
    done = subprocess.run([sys.executable, "-c", CHILD], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_repeated_op_reuses_freed_memory_instead_of_faulting_in_new_pages():
    kept = _second_op_faults()
    if not kept["keeps_freed_memory"]:
        pytest.skip("not glibc")
    default = _second_op_faults(BONSAI_MALLOC_DEFAULT="1")
    assert not default["keeps_freed_memory"]
    # 64 MB of fresh 4 KB pages is 16,384 faults; reused memory needs (almost) none
    assert default["faults"] > 8000
    assert kept["faults"] < 1000
