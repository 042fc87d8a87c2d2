"""Seconds per kind of work inside a transformer step and a VAE decode, on any backend.

    with StepProfiler() as prof:
        pipeline.generate(prompt, steps=1, ...)      # or transformer(x, c, t, rope=rope)
    print(format_profile(prof.report()))

MLX evaluates lazily, so while the profiler is on every timed function evaluates its inputs
on entry and its output on exit (`mx.eval`), and the wall time between two such points goes
to the innermost function running then (exclusive time). The functions are patched by name
for the duration of the `with` block:

- scopes: `Flux2Transformer.__call__` ("step") and `VAE.decode` ("vae decode"); time outside
  them (prompt encoding, the scheduler) is not counted, and everything inside a VAE decode
  is "vae decode";
- inside a step: `nn.Linear` / `nn.QuantizedLinear` ("linear dense"), `BinaryLinear` /
  `TernaryLinear` ("linear packed", dequantizing included), the attention product
  ("attention"), RoPE ("rope"), LayerNorm + modulation, RMSNorm and the modulation vectors
  ("norms+modulation"); the rest of a step (gated residuals, SwiGLU, concatenations,
  embeddings) is "other". RoPE and the modulated norm are a model's own functions
  (`transformer_layers.Fused`, chosen when it is built): they are patched on that object
  when one of its steps starts, and restored with the rest.

Forcing evaluation at every boundary removes fusion and overlap, so a profiled step takes a
little longer than a plain one; `step` (the sum) says by how much next to the plain time.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from typing import Any

import mlx.core as mx
import mlx.nn as nn

KINDS = ("linear dense", "linear packed", "attention", "norms+modulation", "rope", "other")
STEP, VAE_DECODE = "step", "vae decode"


def _patch_targets() -> list[tuple[Any, str, str]]:
    """(owner, attribute, kind) for every function the profiler times."""
    from bonsai_mlx.models import cpu_ops, transformer, transformer_layers, vae
    from bonsai_mlx.quant.layers import BinaryLinear, TernaryLinear

    targets = [
        (transformer.Flux2Transformer, "__call__", STEP),
        (vae.VAE, "decode", VAE_DECODE),
        (nn.Linear, "__call__", "linear dense"),
        (nn.QuantizedLinear, "__call__", "linear dense"),
        (BinaryLinear, "__call__", "linear packed"),
        (TernaryLinear, "__call__", "linear packed"),
        (nn.RMSNorm, "__call__", "norms+modulation"),
        (transformer_layers.Modulation, "__call__", "norms+modulation"),
        (transformer_layers.NormOut, "__call__", "norms+modulation"),
        # looked up by name at call time, so patching the module attribute works
        (transformer_layers, "_attention", "attention"),
    ]
    return [*targets, (cpu_ops, "attention", "attention")]


def _fused_targets(model: Any) -> list[tuple[Any, str, str]]:
    """(owner, attribute, kind) for a transformer's own element-wise functions (its
    `Fused`, shared by all its blocks); none for an object without one."""
    fused = getattr(getattr(model, "norm_out", None), "fused", None)
    if fused is None:
        return []
    return [(fused, "apply_rope", "rope"), (fused, "modulated_norm", "norms+modulation")]


class StepProfiler:
    """Context manager collecting exclusive seconds per kind (see the module docstring)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._mark = 0.0
        self._saved: list[tuple[Any, str, Any]] = []
        self._patched: set[int] = set()  # ids of the Fused objects already patched

    def __enter__(self) -> StepProfiler:
        try:
            self._patch(_patch_targets())
        except BaseException:  # put back what was patched before the failure
            self.__exit__()
            raise
        return self

    def _patch(self, targets: list[tuple[Any, str, str]]) -> None:
        for owner, name, kind in targets:
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            self._saved.append((owner, name, original))
            setattr(owner, name, self._timed(original, kind))

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()
        self._patched.clear()

    def _boundary(self) -> None:
        now = time.perf_counter()
        if self._stack:
            top = self._stack[-1]
            self.seconds[top if top != STEP else "other"] += now - self._mark
        self._mark = now

    def _timed(self, fn, kind: str):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            outer = self._stack[-1] if self._stack else None
            if outer == VAE_DECODE or (outer is None and kind not in (STEP, VAE_DECODE)):
                return fn(*args, **kwargs)  # not inside a step, or inside the VAE: no split
            if kind == STEP and args:
                self._patch_model(args[0])
            mx.eval(_arrays((args, kwargs)))
            self._boundary()
            self._stack.append(kind)
            if outer != kind:  # a call inside one of its kind (cpu_ops.attention) is that one
                self.calls[kind] += 1
            try:
                out = fn(*args, **kwargs)
                mx.eval(out)
            finally:
                self._boundary()
                self._stack.pop()
            return out

        return call

    def _patch_model(self, model: Any) -> None:
        targets = _fused_targets(model)
        if targets and id(targets[0][0]) not in self._patched:
            self._patched.add(id(targets[0][0]))
            self._patch(targets)

    def report(self) -> dict[str, Any]:
        """{"seconds": {kind: s}, "calls": {kind: n}, "step": s, "vae_decode": s}: `step`
        is the sum over the kinds of one or more transformer calls (all the profiled steps)."""
        per_kind = {k: round(self.seconds.get(k, 0.0), 4) for k in KINDS}
        return {
            "seconds": per_kind,
            "calls": {k: self.calls.get(k, 0) for k in (*KINDS, STEP, VAE_DECODE)
                      if self.calls.get(k)},
            "step": round(sum(self.seconds.get(k, 0.0) for k in KINDS), 4),
            "vae_decode": round(self.seconds.get(VAE_DECODE, 0.0), 4),
        }


def _arrays(tree) -> list[mx.array]:
    """The mx.arrays in nested tuples / lists / dicts (modules and numbers are skipped)."""
    if isinstance(tree, mx.array):
        return [tree]
    if isinstance(tree, dict):
        tree = tree.values()
    elif not isinstance(tree, (list, tuple)):
        return []
    return [a for t in tree for a in _arrays(t)]


def format_profile(report: dict[str, Any]) -> str:
    """A table of seconds and shares per kind, then the VAE decode."""
    step = report["step"] or 1e-12
    lines = [f"{'kind':<18} {'seconds':>9} {'share':>7}"]
    for kind, s in report["seconds"].items():
        lines.append(f"{kind:<18} {s:>9.3f} {100 * s / step:>6.1f}%")
    lines.append(f"{'step (sum)':<18} {report['step']:>9.3f}")
    if report.get("vae_decode"):
        lines.append(f"{'vae decode':<18} {report['vae_decode']:>9.3f}")
    return "\n".join(lines)
