"""Running a benchmark: load the target, time each image, build one JSON record per run.

`run_bench` runs a model (an alias, Hub repo or folder, through `Pipeline.from_pretrained`)
or a synthetic one (`synthetic="binary" | "ternary" | "bf16"`, see `synthetic.py`) at each
size: `warmup` untimed runs, then `repeats` timed runs. Each timed run gives one record:

- seconds for prompt encoding, each denoising step, VAE decode and the whole image;
- peak memory (`mx.get_peak_memory`, reset before the run) and the mean / max of
  `mx.get_active_memory()` sampled every 50 ms (the method behind the published "1.50 GB");
- bytes on disk per component (safetensors files; computed array bytes for synthetic);
- the roofline: FLOPs of one transformer step counted from the config, the achieved
  TFLOP/s, and the fraction of the chip's approximate peak;
- the machine (chip, CPU, memory, OS, MLX version and backend, bonsai-mlx version, git
  revision);
- under `mlx.launch` (docs/distributed.md): every rank's peak memory, seconds per step and
  seconds per step in tensor-parallel `all_sum` (`"ranks"`); rank 0 reports for all;
- with `profile`, seconds per kind of work in one more, profiled 1-step image per size
  (`profiler.py`), in each of that size's records (`"profile"`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bonsai_mlx import distributed
from bonsai_mlx.bench.compare import compare_frameworks
from bonsai_mlx.bench.flops import roofline, text_encoder_flops, transformer_flops
from bonsai_mlx.bench.machine import machine_info
from bonsai_mlx.bench.memory import MemorySampler
from bonsai_mlx.bench.report import SCHEMA
from bonsai_mlx.bench.synthetic import synthetic_pipeline
from bonsai_mlx.checks import integer
from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.images import check_size
from bonsai_mlx.layout import payload
from bonsai_mlx.pipeline import Pipeline
from bonsai_mlx.quant import packed_format
from bonsai_mlx.scheduler import MAX_STEPS
from bonsai_mlx.weights import check_writable, parse_dtype, read_json

import click
import mlx.core as mx
from mlx.utils import tree_flatten

DEFAULT_SIZES = ((512, 512), (1024, 1024))
TINY_SIZES = ((64, 64),)
DEFAULT_PROMPT = "A photo of a bonsai tree on a wooden table, soft window light"
WEIGHT_COMPONENTS = ("transformer", "text_encoder", "vae")  # what the footprint counts


@dataclasses.dataclass
class BenchTarget:
    """What is benchmarked: a loaded pipeline, its name, precision and footprint."""

    pipeline: Any
    model: str
    precision: str
    dtype: str
    footprint: dict[str, int]
    footprint_source: str
    text_tokens: int
    tiny: bool
    encodes: bool = True  # False: the synthetic text encoder was replaced by zeros


def load_target(
    model: str | None = None,
    synthetic: str | None = None,
    dtype: str = "bfloat16",
    tiny: bool = False,
    skip_encode: bool = False,
    vae: str | None = None,
) -> BenchTarget:
    """Build the synthetic pipeline or load `model` (alias, repo id or folder); `vae`
    swaps the decoder (`Pipeline.from_pretrained`; synthetic: only "small")."""
    if (model is None) == (synthetic is None):
        raise BonsaiError("pass a model (alias, Hub repo or folder) or --synthetic, not both")
    suffix = "" if vae is None else f"+vae-{Path(str(vae)).name}"
    if synthetic is not None:
        if vae not in (None, "small"):
            raise BonsaiError(f"--vae {vae}: a --synthetic model takes only --vae small")
        kind = synthetic.lower()
        pipe, footprint = synthetic_pipeline(kind, dtype, tiny, encode=not skip_encode,
                                             small_decoder=vae == "small")
        return BenchTarget(
            pipe, f"synthetic-{kind}" + ("-tiny" if tiny else "") + suffix, kind,
            dtype_name(dtype),
            footprint, "computed", pipe.prompt_encoder.max_sequence_length, tiny,
            not skip_encode,
        )
    if tiny or skip_encode:
        raise BonsaiError("--tiny and --skip-encode apply to --synthetic models only")
    pipe = Pipeline.from_pretrained(model, dtype=dtype, vae=vae)  # aliases resolve there
    on_disk = payload(pipe.source, weights_only=True)  # the folder it was loaded from
    return BenchTarget(
        pipe, model + suffix, packed_format(pipe.transformer), dtype_name(dtype),
        {c: on_disk[c] for c in WEIGHT_COMPONENTS}, "files",
        pipe.prompt_encoder.max_sequence_length, False,
    )


def dtype_name(dtype: str | mx.Dtype) -> str:
    """'bfloat16', 'float32', ...: the dtype's name ("auto" resolved)."""
    return str(parse_dtype(dtype)).rsplit(".", 1)[-1]


def run_once(target: BenchTarget, width: int, height: int, steps: int, prompt: str,
             seed: int, log: Callable[[str], None] | None = None,
             tiled_vae: bool | None = None) -> dict[str, Any]:
    """One timed image: stage seconds (from the pipeline), wall total, memory.
    `tiled_vae` forces tiled (True) or untiled (False) decoding; None decides by size."""
    pipe = target.pipeline

    def progress(step: int, total: int, latents) -> None:
        if log is not None:
            log(f"  step {step}/{total} done")

    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    with MemorySampler() as sampler, distributed.timing_communication() as comm:
        t0 = time.perf_counter()
        image = pipe.generate(prompt, width=width, height=height, steps=steps, seed=seed,
                              output_type="mx", callback=progress, tiled_vae=tiled_vae)
        mx.eval(image)
        wall = time.perf_counter() - t0
    timings = dict(pipe.last_timings)
    step_times = [float(s) for s in timings.get("steps", [])]
    return {
        "seconds": {
            "encode": float(timings.get("encode", 0.0)) if target.encodes else None,
            "steps": step_times,
            "denoise": sum(step_times),
            "decode": float(timings.get("decode", 0.0)),
            "total": wall,
        },
        "memory": {
            "peak_bytes": pipe.last_peak_memory,
            "decode_peak_bytes": pipe.last_decode_peak_memory,
            "active_mean_bytes": sampler.mean,
            "active_max_bytes": sampler.max,
            "samples": sampler.count,
            "interval_s": sampler.interval,
        },
        # tensor-parallel all_sum, each timed on its own (adds one sync per call)
        "communication": {"all_sum_seconds": comm.seconds, "all_sum_calls": comm.calls},
    }


def rank_report(result: dict[str, Any], target: BenchTarget, group) -> list[dict[str, Any]]:
    """Every rank's memory, step and communication seconds (gathered: all ranks call it)."""
    steps = result["seconds"]["steps"]
    mine = {
        "rank": group.rank(),
        "peak_bytes": result["memory"]["peak_bytes"],
        "transformer_bytes": sum(v.nbytes for _, v in
                                 tree_flatten(target.pipeline.transformer.parameters())),
        "median_step_seconds": statistics.median(steps) if steps else None,
        "all_sum_seconds_per_step": result["communication"]["all_sum_seconds"] / len(steps),
        "total_seconds": result["seconds"]["total"],
    }
    return distributed.gather_json(mine, group)


def _kernel_paths(precision: str, flops: dict[str, int]) -> dict[str, str] | None:
    """Which packed-matmul implementation the packed layers take, per row count M (image
    stream, text stream, joint sequence); None for dense models."""
    if precision not in ("binary", "ternary"):
        return None
    from bonsai_mlx.kernels import kernel_path

    n_img, n_txt = flops["image_tokens"], flops["text_tokens"]
    return {"image_tokens": kernel_path(n_img), "text_tokens": kernel_path(n_txt),
            "joint": kernel_path(n_img + n_txt)}


def _encode_flops(target: BenchTarget) -> int | None:
    """Prompt-encoding FLOPs for the target's text encoder (None when it is not known)."""
    enc = target.pipeline.prompt_encoder
    config = getattr(enc, "config", None)
    if config is None and hasattr(enc, "text_encoder_dir"):
        try:
            config = read_json(Path(enc.text_encoder_dir) / "config.json")
        except BonsaiError:
            return None
    if not config or not hasattr(enc, "out_layers"):
        return None
    return text_encoder_flops(config, target.text_tokens, max(enc.out_layers))


def _encode_roofline(flops: int | None, seconds: float | None) -> dict[str, Any]:
    achieved = flops / seconds / 1e12 if (flops and seconds) else None
    return {"encode_flops": flops, "encode_achieved_tflops": achieved}


@dataclasses.dataclass
class _Run:
    """What every record of one `run_bench` call shares."""

    target: BenchTarget
    steps: int
    warmup: int
    stamp: str
    command: str | None
    machine: dict[str, Any]
    encode_flops: int | None
    group: Any  # the ranks of mlx.launch (size 1 in one process)
    parallel: str  # "none", "tensor" or "data"
    profile: bool = False  # one more, profiled 1-step image per size
    tiled_vae: bool | None = None  # force tiled / untiled decoding; None: by size


def _record(run: _Run, width: int, height: int, index: int, result: dict[str, Any],
            flops: dict[str, int]) -> dict[str, Any]:
    """The JSON record of one timed run."""
    target = run.target
    return {
        "schema": SCHEMA, "kind": "run", "timestamp": run.stamp, "command": run.command,
        "model": target.model, "precision": target.precision, "dtype": target.dtype,
        "tiny": target.tiny, "text_encoder_ran": target.encodes,
        "width": width, "height": height, "steps": run.steps, "run": index,
        "warmup_runs": run.warmup,
        **result,
        "footprint_bytes": {**target.footprint, "total": sum(target.footprint.values())},
        "footprint_source": target.footprint_source,
        "roofline": {
            **roofline(flops, result["seconds"]["steps"], run.machine),
            **_encode_roofline(run.encode_flops, result["seconds"]["encode"]),
        },
        "packed_kernels": _kernel_paths(target.precision, flops),
        "machine": run.machine,
        "parallel": run.parallel,
        "ranks": rank_report(result, target, run.group) if run.group.size() > 1 else None,
    }


def _run_size(run: _Run, width: int, height: int, repeats: int, prompt: str, seed: int,
              log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Warm-up runs, then `repeats` timed records at one size."""
    target = run.target
    flops = transformer_flops(target.pipeline.transformer.config, height, width,
                              target.text_tokens)
    for i in range(run.warmup):
        log(f"{width}x{height}: warm-up {i + 1}/{run.warmup}")
        run_once(target, width, height, run.steps, f"{prompt} (warm-up {i})", seed, log,
                 run.tiled_vae)
    records = []
    for i in range(repeats):
        # A new prompt each run: the prompt encoder caches embeddings per prompt.
        result = run_once(target, width, height, run.steps, f"{prompt} (run {i})", seed + i,
                          log, run.tiled_vae)
        log(f"{width}x{height}: run {i + 1}/{repeats}: {result['seconds']['total']:.2f} s")
        records.append(_record(run, width, height, i, result, flops))
    if run.profile:
        _add_profile(records, run, width, height, prompt, seed, log)
    return records


def _add_profile(records: list[dict[str, Any]], run: _Run, width: int, height: int,
                 prompt: str, seed: int, log: Callable[[str], None]) -> None:
    """One more 1-step image under the profiler; its report goes into each record."""
    from bonsai_mlx.bench.profiler import StepProfiler

    log(f"{width}x{height}: profiling one step")
    with StepProfiler() as prof:
        run_once(run.target, width, height, 1, f"{prompt} (profile)", seed, None,
                 run.tiled_vae)
    for r in records:
        r["profile"] = prof.report()


def run_bench(
    model: str | None = None,
    *,
    synthetic: str | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    steps: int = 4,
    repeats: int = 3,
    warmup: int = 1,
    dtype: str = "auto",
    tiny: bool = False,
    skip_encode: bool = False,
    compare: bool = False,
    vae: str | None = None,
    profile: bool = False,
    tiled_vae: bool | None = None,
    prompt: str = DEFAULT_PROMPT,
    seed: int = 0,
    json_path: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    command: str | None = None,
    tensor_parallel: bool = False,
) -> list[dict[str, Any]]:
    """Benchmark and return the records: one `"kind": "run"` record per timed run, and with
    `compare` one `"kind": "compare"` record per size. `json_path` appends them as JSON
    lines. `log` receives progress lines (default: stderr). `skip_encode` (synthetic only)
    feeds zeros instead of running the text encoder; encode seconds are then None. `vae`
    swaps the VAE decoder ("small": FLUX.2's small decoder), `tiled_vae` forces tiled (True)
    or untiled (False) decoding. `dtype` "auto": bfloat16 on a GPU, float32 on the CPU.
    `profile`: see the module docstring. Under `mlx.launch` every rank runs the benchmark,
    the transformer sharded across them with `tensor_parallel` (else each makes its own
    images); rank 0 logs, returns the records with every rank's numbers and writes
    `json_path`."""
    group = distributed.world()
    log = log or (lambda s: click.echo(s, err=True))
    if group.rank() != 0:
        log = _silent  # rank 0 speaks for all
    if compare and group.size() > 1:
        raise BonsaiError("--compare runs in one process; run it without mlx.launch")
    sizes = _checked(sizes if sizes is not None else TINY_SIZES if tiny else DEFAULT_SIZES,
                     steps, repeats, warmup)
    if json_path is not None and group.rank() == 0:  # before any long work
        check_json_lines_target(json_path)
    machine = machine_info()
    log(f"machine: {machine['chip']} ({machine['backend']}), MLX {machine['mlx_version']}")
    target = _loaded(log, group if tensor_parallel else None, model, synthetic, dtype, tiny,
                     skip_encode, vae)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    parallel = "none" if group.size() == 1 else "tensor" if tensor_parallel else "data"
    run = _Run(target, steps, warmup, stamp, command, machine, _encode_flops(target), group,
               parallel, profile, tiled_vae)
    records: list[dict[str, Any]] = []
    for w, h in sizes:
        ours = _run_size(run, w, h, repeats, prompt, seed, log)
        records += ours
        if compare:
            records += compare_frameworks(target, synthetic, w, h, steps, repeats, warmup,
                                          ours, stamp, machine, log)
    if json_path is not None and group.rank() == 0:
        _append_json_lines(json_path, records)
    return records


def _loaded(log: Callable[[str], None], shard_over: Any, *args: Any) -> BenchTarget:
    """`load_target(*args)`, the transformer sharded over the `shard_over` group if any."""
    t0 = time.perf_counter()
    target = load_target(*args)
    if shard_over is not None:
        distributed.use_tensor_parallel(target.pipeline, shard_over)
    log(f"loaded {target.model} in {time.perf_counter() - t0:.1f} s")
    return target


JSON_LINES_SUFFIXES = (".json", ".jsonl")


def check_json_lines_target(path: str | Path) -> None:
    """A BonsaiError unless records can be appended to `path`: a new file in a folder that
    exists and can be written, or an existing .json / .jsonl file of JSON lines (every line
    an object), so that no other file of the user's is ever appended to."""
    path = Path(path)
    hint = "choose another --json file"
    if not path.parent.is_dir():
        raise BonsaiError(f"--json {path}: the folder {path.parent} does not exist; {hint}")
    check_writable(path.parent, hint=hint)
    if not path.exists():
        return
    if not path.is_file() or path.suffix.lower() not in JSON_LINES_SUFFIXES:
        raise BonsaiError(f"--json {path} exists and is not a .json / .jsonl file of JSON "
                          f"lines; records are appended only to such a file or a new one; {hint}")
    count = 0  # lines read
    try:
        with open(path, "rb") as f:  # bytes: a binary file fails as JSON, not as text
            for line in f:
                count += 1
                if line.strip() and not isinstance(json.loads(line), dict):
                    raise ValueError("not a JSON object")
    except OSError as e:
        raise BonsaiError(f"--json {path} cannot be read ({e.strerror or e}); {hint}") from None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError included
        raise BonsaiError(f"--json {path}: line {count} is not a JSON object; records are "
                          f"appended only to a file of JSON lines or a new one; {hint}"
                          ) from None


def _append_json_lines(path: str | Path, records: list[dict[str, Any]]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    except OSError as e:
        raise BonsaiError(f"--json {path}: cannot append the records ({e.strerror or e})"
                          ) from None


def _checked(sizes: Sequence[tuple[int, int]], steps: int, repeats: int,
             warmup: int) -> Sequence[tuple[int, int]]:
    for w, h in sizes:
        check_size(w, h)
    integer(steps, "steps", low=1, high=MAX_STEPS)  # as Pipeline.generate, before loading
    integer(repeats, "repeats", low=1)
    integer(warmup, "warmup", low=0)
    return sizes


def _silent(line: str) -> None:
    pass
