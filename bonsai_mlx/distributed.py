"""Generation on several processes (several Macs) with `mlx.distributed`.

Start the same command on every rank with `mlx.launch` (docs/distributed.md):

    mlx.launch --backend ring -n 2 -- bonsai-mlx gen -m ternary --seeds 4 -p "..."

Two ways to use the ranks:

- data-parallel (the default under mlx.launch): every rank loads the whole pipeline and
  makes its share of the images (seeds, prompts, `num_images`); rank 0 gathers the uint8
  pixels with `all_gather` (no shared file system) and writes every file.
- tensor-parallel (`--tensor-parallel`, `Pipeline.from_pretrained(..., tensor_parallel=True)`):
  the transformer is sharded as mlx-lm shards its models. Attention heads are split across
  the ranks: q/k/v and the SwiGLU input projections keep this rank's output rows, the output
  projections this rank's input columns and `all_sum` the partial products; modulation and
  embeddings are replicated. Packed binary / ternary layers are sliced the same way (a
  ternary weight is unpacked and re-packed when its inputs are split, since five weights
  share a byte). The text encoder runs on rank 0 and broadcasts the embeddings; the VAE
  decodes on rank 0.

Every collective goes through this module, so `timing_communication` sees them all and a
rank that died surfaces as one `BonsaiError` (`peer_errors`).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from bonsai_mlx.errors import BonsaiError
from bonsai_mlx.quant import formats
from bonsai_mlx.quant.layers import BinaryLinear, TernaryLinear
from bonsai_mlx.quant.model import get_module, set_module

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

Group = mx.distributed.Group


def world() -> Group:
    """Every process `mlx.launch` started (a group of size 1 when run on its own)."""
    return mx.distributed.init()


# ---------------------------------------------------------------------------------------
# Collectives


@dataclass
class CommunicationTimer:
    """Seconds spent in `all_sum` (waiting for the other ranks included) and its calls."""

    seconds: float = 0.0
    calls: int = 0


_timer: CommunicationTimer | None = None


@contextlib.contextmanager
def timing_communication() -> Iterator[CommunicationTimer]:
    """Time every tensor-parallel `all_sum` while active. Each is then evaluated on its own
    (its input first, then the sum), which adds a synchronisation per call."""
    global _timer
    outer, _timer = _timer, CommunicationTimer()
    try:
        yield _timer
    finally:
        _timer = outer


def all_sum(x: mx.array, group: Group) -> mx.array:
    """`mx.distributed.all_sum`, timed inside `timing_communication`."""
    if _timer is None:
        return mx.distributed.all_sum(x, group=group)
    mx.eval(x)
    t0 = time.perf_counter()
    y = mx.distributed.all_sum(x, group=group)
    mx.eval(y)
    _timer.seconds += time.perf_counter() - t0
    _timer.calls += 1
    return y


def _done(x: mx.array) -> mx.array:
    """Evaluate a collective now, so that a lost peer raises here. (`np.array()` of an
    unevaluated collective that failed returns uninitialised memory instead, MLX 0.32.)"""
    mx.eval(x)
    return x


# A header describes an array another rank does not know the shape of: dtype, ndim, shape.
_WIRE_DTYPES = (mx.uint8, mx.uint32, mx.uint64, mx.int32, mx.int64,
                mx.float16, mx.bfloat16, mx.float32)
_MAX_NDIM = 8


def _header(x: mx.array | None) -> mx.array:
    h = np.full(2 + _MAX_NDIM, -1, np.int64)
    if x is not None:
        if x.dtype not in _WIRE_DTYPES or x.ndim > _MAX_NDIM:
            raise BonsaiError(f"cannot send a {x.dtype} array of {x.ndim} dimensions between "
                              "ranks")
        h[0], h[1] = _WIRE_DTYPES.index(x.dtype), x.ndim
        h[2:2 + x.ndim] = x.shape
    return mx.array(h)


def _parse_header(h: np.ndarray) -> tuple[mx.Dtype, tuple[int, ...]] | None:
    if h[0] < 0:
        return None
    return _WIRE_DTYPES[int(h[0])], tuple(int(d) for d in h[2:2 + int(h[1])])


def broadcast(x: mx.array | None, group: Group) -> mx.array:
    """Rank 0's `x` on every rank (other ranks pass None). It is summed with zeros from every
    other rank, which is exact: the array arrives bit for bit (a -0.0 as 0.0)."""
    if group.size() == 1:
        return x
    root = group.rank() == 0
    header = _header(x) if root else mx.zeros(2 + _MAX_NDIM, mx.int64)
    dtype, shape = _parse_header(np.array(_done(mx.distributed.all_sum(header, group=group))))
    return _done(mx.distributed.all_sum(x if root else mx.zeros(shape, dtype), group=group))


def broadcast_ints(values: Sequence[int], group: Group) -> list[int]:
    """Rank 0's list of non-negative integers below 2**64 (seeds) on every rank."""
    if group.size() == 1:
        return list(values)
    return [int(v) for v in np.array(broadcast(mx.array(np.array(values, np.uint64)), group))]


def all_gather_list(x: mx.array | None, group: Group) -> list[mx.array | None]:
    """Every rank's array, in rank order. Ranks may hold different numbers of rows (the
    first axis), or nothing (None); the other axes and the dtype must agree."""
    if group.size() == 1:
        return [x]
    headers = np.array(_done(mx.distributed.all_gather(_header(x)[None], group=group)))
    described = [_parse_header(h) for h in headers]
    known = [d for d in described if d is not None]
    if not known:
        return [None] * group.size()
    dtype, shape = known[0]
    if any(d != dtype or s[1:] != shape[1:] for d, s in known):
        raise BonsaiError(
            f"the ranks made arrays of different shapes or types ({sorted(set(known))}); give "
            "every rank the same inputs (the same --image files on every machine, or --size)")
    rows = max(s[0] for _, s in known)
    mine = mx.zeros((rows, *shape[1:]), dtype)
    if x is not None and x.shape[0]:
        mine = mx.concatenate([x, mine[x.shape[0]:]]) if x.shape[0] < rows else x
    everything = _done(mx.distributed.all_gather(mine, group=group))  # (size * rows, ...)
    return [None if d is None else everything[i * rows: i * rows + d[1][0]]
            for i, d in enumerate(described)]


def gather_rows(x: mx.array | None, group: Group) -> mx.array:
    """Every rank's rows (the first axis), concatenated in rank order."""
    parts = [p for p in all_gather_list(x, group) if p is not None]
    if not parts:
        raise BonsaiError("no rank produced anything to gather")
    return parts[0] if len(parts) == 1 else mx.concatenate(parts)


def gather_json(value, group: Group) -> list:
    """A JSON-serialisable value from every rank, in rank order (reports, timings)."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    return [json.loads(bytes(np.array(p)).decode()) for p in all_gather_list(mx.array(data),
                                                                              group)]


_BACKEND_ERROR = re.compile(r"\[(ring|jaccl|mpi|nccl)\]")


@contextlib.contextmanager
def peer_errors(group: Group) -> Iterator[None]:
    """Turn a lost connection to another rank (its process died, the cable came out) into
    one BonsaiError naming this rank, instead of a traceback."""
    try:
        yield
    except RuntimeError as e:
        if group.size() == 1 or not _BACKEND_ERROR.search(str(e)):
            raise
        raise BonsaiError(
            f"rank {group.rank()} of {group.size()}: {e}; another rank stopped (see its "
            "output) or the connection between the machines dropped; run the command again"
        ) from e


# ---------------------------------------------------------------------------------------
# Data-parallel: who makes what


def share(n: int, group: Group) -> slice:
    """This rank's contiguous share of n items: sizes differ by at most one, in rank order."""
    size, rank = group.size(), group.rank()
    return slice(n * rank // size, n * (rank + 1) // size)


def map_in_rounds(items: Sequence, make: Callable[[object], mx.array],
                  group: Group) -> Iterator[tuple[object, mx.array]]:
    """(item, make(item)) for every item in order, on every rank, each made by one rank:
    round k gives items[k * size + r] to rank r, then all ranks gather that round's
    results, so they arrive round by round and only one round is held at a time."""
    size, rank = group.size(), group.rank()
    for start in range(0, len(items), size):
        batch = items[start:start + size]
        mine = make(batch[rank]) if rank < len(batch) else None
        results = all_gather_list(None if mine is None else mine[None], group)
        for item, result in zip(batch, results, strict=False):
            yield item, result[0]


# ---------------------------------------------------------------------------------------
# Tensor-parallel: sharding the transformer


class _SumsOverRanks:
    """Mixin for a layer holding a slice of the inputs (a column shard): each rank's
    product is a partial sum of the full one; `all_sum` completes it on every rank."""

    group: Group

    def __call__(self, x: mx.array) -> mx.array:
        return all_sum(super().__call__(x), self.group)


class ShardedToAllLinear(_SumsOverRanks, nn.Linear):
    pass


class ShardedToAllQuantizedLinear(_SumsOverRanks, nn.QuantizedLinear):
    pass


class ShardedToAllBinaryLinear(_SumsOverRanks, BinaryLinear):
    pass


class ShardedToAllTernaryLinear(_SumsOverRanks, TernaryLinear):
    pass


_SHARDED_TO_ALL = {nn.Linear: ShardedToAllLinear, nn.QuantizedLinear: ShardedToAllQuantizedLinear,
                   BinaryLinear: ShardedToAllBinaryLinear, TernaryLinear: ShardedToAllTernaryLinear}


def _plans(config) -> tuple[dict, dict]:
    """How each layer of a double / single block is split: ("rows" | "columns", segment
    bounds). Every segment is cut into `size` equal parts and a rank keeps part `rank` of
    each: q/k/v by heads, a SwiGLU input by its gate and up halves, the single block's fused
    projection as [q | k | v | gate | up] and its output projection as [attention | MLP]."""
    dim, hidden = config.inner_dim, config.mlp_hidden_dim
    heads, swiglu, mlp = [0, dim], [0, hidden, 2 * hidden], [0, hidden]
    double = {
        **{f"attn.{n}": ("rows", heads) for n in
           ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")},
        "attn.to_out.0": ("columns", heads), "attn.to_add_out": ("columns", heads),
        "ff.linear_in": ("rows", swiglu), "ff.linear_out": ("columns", mlp),
        "ff_context.linear_in": ("rows", swiglu), "ff_context.linear_out": ("columns", mlp),
    }
    single = {
        "attn.to_qkv_mlp_proj": ("rows", [0, dim, 2 * dim, 3 * dim, 3 * dim + hidden,
                                          3 * dim + 2 * hidden]),
        "attn.to_out": ("columns", [0, dim, dim + hidden]),
    }
    return double, single


def _spans(bounds: Sequence[int], group: Group) -> list[tuple[int, int]]:
    size, rank = group.size(), group.rank()
    spans = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
        part = (hi - lo) // size
        spans.append((lo + rank * part, lo + (rank + 1) * part))
    return spans


def _input_dims(layer: nn.Module) -> int:
    if isinstance(layer, (BinaryLinear, TernaryLinear)):
        return layer.input_dims
    if isinstance(layer, nn.QuantizedLinear):
        return layer.scales.shape[1] * layer.group_size
    return layer.weight.shape[1]


def _row_arrays(layer: nn.Module, spans) -> dict[str, mx.array]:
    """Every array of `layer` restricted to the output rows in `spans`."""
    return {k: mx.concatenate([a[lo:hi] for lo, hi in spans])
            for k, a in tree_flatten(layer.parameters())}


def _column_arrays(layer: nn.Module, spans, name: str) -> dict[str, mx.array]:
    """Every array of `layer` restricted to the inputs in `spans`. An array with c columns
    for K inputs (weight, packed words, group scales) is cut at lo * c / K, which must be
    whole: packed and quantized layers split only between groups."""
    k = _input_dims(layer)
    arrays = dict(tree_flatten(layer.parameters()))
    if isinstance(layer, TernaryLinear):  # five weights a byte: cut the trits, then re-pack
        arrays["weight"] = formats.unpack_ternary(layer.weight, k)
    out = {}
    for key, a in arrays.items():
        c = a.shape[1]
        if any(lo * c % k or hi * c % k for lo, hi in spans):
            unit = k // c if k % c == 0 else k
            raise BonsaiError(
                f"{name}: its {k} inputs cannot be split at {[lo for lo, _ in spans]} in "
                f"whole groups of {unit} ({type(layer).__name__}); use fewer ranks")
        out[key] = mx.concatenate([a[:, lo * c // k: hi * c // k] for lo, hi in spans], axis=1)
    if isinstance(layer, TernaryLinear):
        out["weight"] = formats.pack_ternary(out["weight"])
    return out


def _layer_like(layer: nn.Module, arrays: dict[str, mx.array], cls: type) -> nn.Module:
    """A bias-free layer of class `cls` (the kind of `layer`) holding `arrays`. The
    constructors' random initial weights are lazy and replaced before any evaluation."""
    n = arrays["weight"].shape[0]
    if isinstance(layer, (BinaryLinear, TernaryLinear)):
        new = cls(arrays["scales"].shape[1] * formats.GROUP_SIZE, n)
    elif isinstance(layer, nn.QuantizedLinear):
        new = cls(arrays["scales"].shape[1] * layer.group_size, n, bias=False,
                  group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    else:
        new = cls(arrays["weight"].shape[1], n, bias=False)
    new.update(arrays)
    return new


def _shard_layer(layer: nn.Module, how: str, bounds, group: Group, name: str) -> nn.Module:
    kind = next((c for c in _SHARDED_TO_ALL if type(layer) is c), None)
    if kind is None or "bias" in layer:
        raise BonsaiError(f"{name} is a {type(layer).__name__}; tensor parallelism shards "
                          "bias-free Linear, QuantizedLinear, BinaryLinear and TernaryLinear")
    spans = _spans(bounds, group)
    if how == "rows":
        return _layer_like(layer, _row_arrays(layer, spans), kind)
    new = _layer_like(layer, _column_arrays(layer, spans, name), _SHARDED_TO_ALL[kind])
    new.group = group
    return new


def shard_transformer(model: nn.Module, group: Group) -> nn.Module:
    """Shard a loaded `Flux2Transformer` in place across `group` (see the module doc);
    afterwards each rank holds its heads and MLP slice of every block, and every rank's
    forward pass returns the full output. Returns the model."""
    size = group.size()
    if size == 1:
        return model
    cfg = model.config
    if cfg.num_attention_heads % size or cfg.mlp_hidden_dim % size:
        raise BonsaiError(
            f"the transformer's {cfg.num_attention_heads} attention heads and "
            f"{cfg.mlp_hidden_dim} MLP features cannot be split evenly over {size} ranks; "
            "use a number of ranks that divides both (2 for FLUX.2 [klein] 4B: 24 heads)")
    double, single = _plans(cfg)
    for blocks, plan, prefix in ((model.transformer_blocks, double, "transformer_blocks"),
                                 (model.single_transformer_blocks, single,
                                  "single_transformer_blocks")):
        for i, block in enumerate(blocks):
            for path, (how, bounds) in plan.items():
                name = f"{prefix}.{i}.{path}"
                set_module(block, path, _shard_layer(get_module(block, path), how, bounds,
                                                     group, name))
            mx.eval(block.parameters())  # one block's unsharded weights freed at a time
    for block in model.single_transformer_blocks:
        block.attn.mlp_hidden //= size  # splits the fused projection's output locally
    mx.clear_cache()
    return model


# ---------------------------------------------------------------------------------------
# The pipeline's view: who does which stage of one generate call


@dataclass(frozen=True)
class Parallel:
    """How `Pipeline.generate` spreads one call over `group`: mode "tensor" (all ranks
    run every step together), "data" (each rank makes its share of the batch) or "none"."""

    mode: str = "none"
    group: Group | None = field(default=None, compare=False)

    def seed(self, seed: int | None) -> int:
        """`seed`, or a random one: rank 0's, on every rank."""
        if seed is not None:
            return seed
        drawn = secrets.randbelow(2**32)
        return drawn if self.mode == "none" else broadcast_ints([drawn], self.group)[0]

    def encode(self, encode: Callable[[], mx.array]) -> mx.array:
        """Prompt embeddings: on rank 0 only when tensor-parallel (then broadcast)."""
        if self.mode != "tensor":
            return encode()
        return broadcast(encode() if self.group.rank() == 0 else None, self.group)

    def _splits(self, batch: int) -> bool:
        # A batch smaller than the world runs whole on every rank: no rank sits with none.
        return self.mode == "data" and batch >= self.group.size()

    def rows(self, batch: int) -> slice:
        """The images of the batch this rank denoises and decodes."""
        return share(batch, self.group) if self._splits(batch) else slice(0, batch)

    def decode(self, decode: Callable[[], mx.array], batch: int) -> mx.array:
        """The decoded batch on every rank: decoded on rank 0 and broadcast when
        tensor-parallel, each rank's rows gathered when data-parallel."""
        if self.mode == "tensor":
            return broadcast(decode() if self.group.rank() == 0 else None, self.group)
        return gather_rows(decode(), self.group) if self._splits(batch) else decode()


def use_tensor_parallel(pipe, group: Group | None = None) -> None:
    """Shard `pipe.transformer` across `group` (default: the world) and make `pipe`
    generate tensor-parallel. A no-op on a single process."""
    group = world() if group is None else group
    if group.size() > 1:
        shard_transformer(pipe.transformer, group)
        pipe.parallel = Parallel("tensor", group)


def use_data_parallel(pipe, group: Group | None = None) -> None:
    """Make `pipe.generate` split each batch (prompts x num_images) across `group`."""
    group = world() if group is None else group
    if group.size() > 1:
        pipe.parallel = Parallel("data", group)
