"""Freed memory is kept for reuse on Linux (bonsai_mlx/_malloc.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Faults while a second, same-sized 64 MB op runs after the first one's output was freed.
# (on a thread of its own, as the server's worker, with THREAD=1)
CHILD = r"""
import json, os, resource, threading
import bonsai_mlx, mlx.core as mx
from bonsai_mlx._malloc import malloc_status
result = {}
def run():
    x = mx.ones((16, 1024, 1024)); mx.eval(x)
    def faults():
        y = x * 2.0; mx.eval(y); del y
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = faults(); b = faults(); c = faults()
    result["faults"] = c - b
if os.environ.get("THREAD"):
    worker = threading.Thread(target=run); worker.start(); worker.join()
else:
    run()
print(json.dumps({**result, **malloc_status()}))
"""


def _second_op_faults(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("BONSAI_MALLOC_DEFAULT", "THREAD")}
    done = subprocess.run([sys.executable, "-c", CHILD], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("thread", ["", "1"], ids=["main thread", "worker thread"])
def test_a_repeated_op_reuses_freed_memory_instead_of_faulting_in_new_pages(thread):
    kept = _second_op_faults(THREAD=thread)
    if not kept["keeps_freed_memory"]:
        pytest.skip("not glibc")
    default = _second_op_faults(BONSAI_MALLOC_DEFAULT="1", THREAD=thread)
    assert not default["keeps_freed_memory"]
    # 64 MB of fresh 4 KB pages is 16,384 faults; reused memory needs (almost) none
    assert default["faults"] > 8000
    assert kept["faults"] < 1000
