"""The benchmark's records as a readable table (medians over the timed runs)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bonsai_mlx.bench.flops import roofline
from bonsai_mlx.weights import human_bytes

SCHEMA = "bonsai-mlx-bench/1"  # the "schema" of every JSON record


def median_seconds(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median over runs of encode, step (median step), decode and total seconds."""
    if not runs:
        return {}
    step = [statistics.median(r["steps"]) for r in runs if r["steps"]]
    encode = [r["encode"] for r in runs if r["encode"] is not None]
    return {
        "encode": statistics.median(encode) if encode else None,
        "step": statistics.median(step) if step else 0.0,
        "decode": statistics.median(r["decode"] for r in runs),
        "total": statistics.median(r["total"] for r in runs),
    }


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _header(width: int) -> str:
    return (f"{'model':<{width}} {'size':>9} {'steps':>5} {'runs':>4} {'encode s':>9} "
            f"{'step s':>8} {'decode s':>9} {'dec. GB':>8} {'total s':>8} {'peak GB':>8} "
            f"{'act mean':>8} {'act max':>8} {'TFLOP/step':>10} {'TFLOP/s':>8} {'% peak':>7}")


def _row(rs: list[dict[str, Any]], width: int) -> str:
    """One line for the runs of one model, size and step count."""
    r0 = rs[0]
    sec = median_seconds([r["seconds"] for r in rs])
    mem = {key: int(statistics.median(r["memory"][key] for r in rs))
           for key in ("peak_bytes", "decode_peak_bytes", "active_mean_bytes",
                       "active_max_bytes")}
    step_all = [s for r in rs for s in r["seconds"]["steps"]]
    flops = r0["roofline"]["flops_per_step"]
    roof = roofline({"total": flops, "linear": 0, "attention": 0, "image_tokens": 0,
                     "text_tokens": 0}, step_all, r0["machine"])
    frac = roof["fraction_of_peak"]
    size = f"{r0['width']}x{r0['height']}"
    return (f"{r0['model']:<{width}} {size:>9} {r0['steps']:>5} "
            f"{len(rs):>4} {_num(sec['encode'], '.3f'):>9} "
            f"{sec['step']:>8.3f} {sec['decode']:>9.3f} {_gb(mem['decode_peak_bytes']):>8} "
            f"{sec['total']:>8.3f} "
            f"{_gb(mem['peak_bytes']):>8} {_gb(mem['active_mean_bytes']):>8} "
            f"{_gb(mem['active_max_bytes']):>8} {flops / 1e12:>10.3f} "
            f"{_num(roof['achieved_tflops'], '.3f'):>8} "
            f"{_num(frac * 100 if frac is not None else None, '.1f'):>7}")


def _rank_rows(r: dict[str, Any]) -> list[str]:
    """Under mlx.launch: one line per rank, as each saw the run."""
    return [f"  rank {rank['rank']} ({r['parallel']}-parallel): step "
            f"{_num(rank['median_step_seconds'], '.3f')} s, all_sum "
            f"{rank['all_sum_seconds_per_step']:.3f} s/step, peak "
            f"{human_bytes(rank['peak_bytes'])}, transformer "
            f"{human_bytes(rank['transformer_bytes'])}" for rank in r.get("ranks") or []]


def _footer(runs: list[dict[str, Any]]) -> list[str]:
    peak = runs[0]["roofline"]
    lines = [f"peak: {_num(peak['peak_tflops'], '.1f')} TFLOP/s ({peak['peak_source']}); "
             "step = median step; dec. GB = peak while decoding; GB = 1e9 bytes"]
    if any(not r.get("text_encoder_ran", True) for r in runs):
        lines.append("encode n/a: text encoder skipped (--skip-encode); totals exclude it")
    fp = runs[0]["footprint_bytes"]
    lines.append(f"footprint ({runs[0]['footprint_source']}): " + ", ".join(
        f"{k} {human_bytes(v)}" for k, v in fp.items()))
    return lines


def _comparison(r: dict[str, Any]) -> str:
    where = f"{r['framework']} {r['width']}x{r['height']}"
    if not r["available"]:
        return f"{where}: not compared: {r['reason']}"
    theirs, ratio = r["seconds"], r["ratio_ours_over_theirs"]
    return f"{where} ({r['device']}, torch {r['torch_version']}): " + ", ".join(
        f"{k} {theirs[k]:.3f} s (ours/theirs {_num(ratio.get(k), '.2f')})" for k in theirs)


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """A readable summary: per model and size, medians over the timed runs, then the
    footprint and the comparisons."""
    runs = [r for r in records if r["kind"] == "run"]
    lines = []
    if runs:
        m = runs[0]["machine"]
        lines.append(f"machine: {m['chip']} | {m['backend']} | MLX {m['mlx_version']} | "
                     f"{_gb(m['memory_bytes'])} GB | {m['os']} | bonsai-mlx "
                     f"{m['bonsai_mlx_version']} {m['git_revision'] or ''}".rstrip())
    width = max([22] + [len(r["model"]) for r in runs])
    header = _header(width)
    lines += [header, "-" * len(header)]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["width"], r["height"], r["steps"]), []).append(r)
    for rs in groups.values():
        lines += [_row(rs, width), *_rank_rows(rs[-1])]
    if runs:
        lines += _footer(runs) + _profile_lines(runs)
    lines += [_comparison(r) for r in records if r["kind"] == "compare"]
    return "\n".join(lines)


def _profile_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    """With `bench --profile`: each model and size's table of seconds per kind of work."""
    from bonsai_mlx.bench.profiler import format_profile

    lines, seen = [], set()
    for r in runs:
        key = (r["model"], r["width"], r["height"])
        if r.get("profile") and key not in seen:
            seen.add(key)
            lines += [f"profile {r['model']} {r['width']}x{r['height']}, one step "
                      "(seconds per kind of work):", format_profile(r["profile"])]
    return lines
