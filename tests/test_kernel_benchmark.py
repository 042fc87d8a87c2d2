"""benchmarks/kernels.py: its smoke run in the CPU emulator (every path, the table, the JSON
record, the crossover summary; never the speed), and the crossover rule on known times."""

import importlib.util
import json
from pathlib import Path

import pytest
from kernel_cases import needs_cxx

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kernel_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_cxx
def test_smoke_run_in_the_emulator(bench, tmp_path, capsys):
    out = tmp_path / "kernels.json"
    result = bench.main(["--backend", "emulator", "--shapes", "attn", "--tokens", "1", "9",
                         "--repeats", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "attn: M=1 N=128 K=128" in text and "attn: M=9 N=128 K=128" in text  # 3072 / 24
    for path in ("binary fused", "binary dequant+matmul", "ternary fused",
                 "ternary dequant+matmul", "mx.quantized_matmul 1-bit",
                 "mx.quantized_matmul 2-bit", "dense bfloat16 matmul"):
        assert f"  {path} " in text
    assert "WARNING" not in text  # the fused kernels agree with dequantize + matmul
    assert "suggested DEQUANT_MIN_M: " in text
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["crossover"]) == {"attn/binary", "attn/ternary"}
    assert {(r["m"], r["path"]) for r in result["records"]} >= {(1, "binary fused"),
                                                                (9, "ternary fused")}
    assert all(r["ms"] > 0 and r["tflops"] > 0 and r["weight_gbs"] > 0
               for r in result["records"])


def test_crossover_is_where_dequantize_wins_from_then_on(bench):
    def records(fused, deq):
        return [{"shape": "s", "m": m, "path": p, "ms": t}
                for m, f, d in zip([1, 64, 512, 4096], fused, deq, strict=True)
                for p, t in (("binary fused", f), ("binary dequant+matmul", d))]

    assert bench.crossover(records([1, 2, 9, 70], [5, 3, 8, 60]), "s", "binary") == 512
    assert bench.crossover(records([1, 2, 9, 70], [5, 1, 10, 60]), "s", "binary") == 4096
    assert bench.crossover(records([1, 2, 9, 70], [5, 3, 10, 80]), "s", "binary") is None
    assert bench.crossover(records([9, 9, 9, 9], [1, 1, 1, 1]), "s", "binary") == 1
