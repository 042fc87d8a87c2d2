"""Threadgroup-memory bank conflicts of the tiled GEMM's tile stores and fragment reads,
measured on the real helpers of packed.h (`load_w_tile`, `load_x_tile`, `load_fragment`,
`load_fragment_transposed`) in the CPU emulator: the tiles hold a probe type whose every
store and read records its address, and a bank model judges each SIMD-group access.

The model (docs/kernels.md): 32 banks of 4 bytes; a SIMD-group access takes as many cycles as
the most distinct 4-byte words any one bank serves (lanes reading the same word share it);
it is conflict-free when that equals the fewest cycles its number of words needs. Apple does
not publish its threadgroup memory design: this is the model MLX's tile padding is built for,
and an argument for the layout, not a measurement of an Apple GPU."""

from collections import Counter

from bonsai_mlx.kernels import emulator, metal

import mlx.core as mx
import numpy as np
import pytest
from kernel_cases import needs_cxx, with_bug

pytestmark = needs_cxx

PROBE = r"""
// Tile element stand-in of S bytes: stores into and reads from the probed tile are logged.
namespace bank_probe {
constexpr int LOG = 64;
inline const char* begin;
inline const char* end;
inline int log[2][128][LOG];  // [store, read][thread][i]: byte offset in the tile
inline int count[2][128];
inline void record(const void* p, int kind) {
  const char* c = static_cast<const char*>(p);
  if (c < begin || c >= end) return;  // a local or an input, not the tile
  const int t = int(bonsai_emu::cur()->thread_index_in_threadgroup);
  log[kind][t][count[kind][t]++] = int(c - begin);
}
template <int S>
struct Probe {
  unsigned char bytes[S];
  Probe() = default;
  Probe(float) {}
  Probe(const Probe& o) {  // (a vector load copies each element)
    record(&o, 1);
  }
  Probe& operator=(const Probe&) {
    record(this, 0);
    return *this;
  }
  operator float() const {
    record(this, 1);
    return 0.0f;
  }
};
}  // namespace bank_probe
"""

# Template S (bytes per element); input what[0]: 0 W tile, 1 x tile of 64 rows, 2 of 32 rows.
HARNESS = r"""
    using P = bank_probe::Probe<S>;
    const int WHAT = what[0];
    const uint tid = thread_index_in_threadgroup;
    const uint lane = thread_index_in_simdgroup;
    threadgroup P tile[64 * tile_ld<P>()];
    static P x_rows[64 * BK];
    if (tid == 0) {
        bank_probe::begin = reinterpret_cast<const char*>(tile);
        bank_probe::end = reinterpret_cast<const char*>(tile + 64 * tile_ld<P>());
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    bank_probe::count[0][tid] = bank_probe::count[1][tid] = 0;
    float s = 0.0f;
    if (WHAT == 0) {
        load_w_tile(tile, w, scales, s, 64, 128, 4, 0, 0, tid);
    } else if (WHAT == 1) {
        load_x_tile<64>(tile, x_rows, 64, BK, 0, 0, tid);
    } else {
        load_x_tile<32>(tile, x_rows, 32, BK, 0, 0, tid);
    }
    simdgroup_matrix<float, 8, 8> f;
    for (int r0 = 0; r0 < (WHAT == 2 ? 32 : 64); r0 += 8) {
        for (int kk = 0; kk < BK; kk += 8) {
            if (WHAT == 0) {
                load_fragment_transposed(f, tile, r0, kk, lane);
            } else {
                load_fragment(f, tile, r0, kk, lane);
            }
        }
    }
    for (int kind = 0; kind < 2; ++kind) {
        out[tid * (2 + 2 * bank_probe::LOG) + kind] = bank_probe::count[kind][tid];
        for (int i = 0; i < bank_probe::count[kind][tid]; ++i) {
            out[tid * (2 + 2 * bank_probe::LOG) + 2 + kind * bank_probe::LOG + i] =
                bank_probe::log[kind][tid][i];
        }
    }
"""


def accesses(what: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(stores, reads): byte offsets per thread (128 x n) made by the tile helpers."""
    header = PROBE + (metal.metal_source_dir() / "packed.h").read_text()
    kernel = emulator.metal_kernel("bank_probe", ["w", "scales", "what"], ["out"], HARNESS,
                                   header)
    log = 2 + 2 * 64
    out = kernel(inputs=[mx.zeros((64, 4), mx.uint32), mx.zeros((64, 1), mx.float16),
                         mx.full((8,), what, mx.int32)],
                 template=[("S", size)], grid=(128, 1, 1),
                 threadgroup=(128, 1, 1), output_shapes=[(128 * log,)],
                 output_dtypes=[mx.int32], init_value=-1)[0]
    rows = np.array(out).reshape(128, log)
    counts = rows[:, :2]
    assert (counts == counts[0]).all()  # every thread makes the same accesses
    return rows[:, 2:2 + counts[0, 0]], rows[:, 66:66 + counts[0, 1]]


def conflict(ranges) -> float:
    """Cycles of one SIMD-group access / the fewest its words need ([(byte, nbytes)] per lane)."""
    words = {w for start, n in ranges for w in range(start // 4, (start + n - 1) // 4 + 1)}
    per_bank = Counter(w % 32 for w in words)
    return max(per_bank.values()) / -(-len(words) // 32)


def worst_conflicts(what: int, size: int) -> tuple[float, float]:
    stores, reads = accesses(what, size)
    # Each store is a 4-element vector: 4 consecutive element stores to consecutive addresses.
    assert stores.shape[1] % 4 == 0
    vectors = stores.reshape(128, -1, 4)
    assert (np.diff(vectors, axis=2) == size).all()
    worst_store = max(conflict([(int(vectors[t, v, 0]), 4 * size) for t in range(g, g + 32)])
                      for g in range(0, 128, 32) for v in range(vectors.shape[1]))
    # A fragment reads its two elements with one vector load (x tile); B, transposed, with two.
    width = 1 if what == 0 else 2
    loads = reads.reshape(128, -1, width)
    assert (np.diff(loads, axis=2) == size).all()
    worst_read = max(conflict([(int(loads[t, i, 0]), width * size) for t in range(32)])
                     for i in range(loads.shape[1]))
    return worst_store, worst_read


@pytest.mark.parametrize("size", [2, 4], ids=["16-bit", "float32"])
@pytest.mark.parametrize("what", [0, 1, 2], ids=["W tile", "x tile BM=64", "x tile BM=32"])
def test_tile_stores_and_fragment_reads_are_free_of_bank_conflicts(what, size):
    assert worst_conflicts(what, size) == (1.0, 1.0)


def test_unrotated_w_tile_stores_conflict_two_way_in_16_bits(tmp_path, monkeypatch):
    # Without the rotation of store_slot, 32 lanes writing 32 rows of a 16-bit tile (rows 80
    # bytes apart) hit half the banks twice: the 2-way conflict the rotation exists for.
    with_bug(tmp_path, monkeypatch, "packed.h", "return (v + (r >> 3)) & (count - 1);",
             "return v & (count - 1);")
    assert worst_conflicts(0, 2) == (2.0, 1.0)
    assert worst_conflicts(0, 4) == (1.0, 1.0)  # 16-byte stores of float: no conflict anyway
