// Shared helpers for the packed binary / ternary kernels (the header of every kernel).
//
// Formats (docs/formats.md): scale-only, one float16 scale per GROUP = 128 consecutive inputs k.
//   binary  `w` uint32 (N, K/32): bit j of word i of row n is weight (n, 32i + j); 1 -> +s, 0 -> -s.
//   ternary `w` uint8 (N, ceil(K/5)): byte b holds k = 5b .. 5b+4 as base-3 digits, least
//           significant first; digit 0 -> -s, 1 -> 0, 2 -> +s.
// The kernels follow MLX's quantized kernels (mlx/backend/metal/kernels/quantized.h); why each
// choice was made is in docs/kernels.md. The binary and ternary versions of each helper are
// overloads on the type of `w` (or of the codes it returns), so one kernel body serves both.
// Offsets are 32-bit `int`: metal.py splits launches so that every array has < 2^31 elements.

static constant constexpr const int GROUP = 128;  // inputs per scale

// ---- decoding ----------------------------------------------------------------------------
// The codes of L consecutive weights k .. k + L - 1 of one row (L = 8 or 16, k % L == 0).
struct BinaryCodes {
  uint bits;  // bit i: weight k + i is +s (1) or -s (0)
};
struct TernaryCodes {
  uint trits;  // bits 2i, 2i + 1: base-3 digit t of weight k + i, which is (t - 1) * s
};

// TRITS[b]: the five base-3 digits of byte b, least significant first, as 2-bit fields (digit
// i in bits 2i and 2i + 1): one table read per byte instead of divisions by 3. 256 entries,
// so any byte indexes it (243 .. 255 never occur in a pack; they decode as reference.py does).
constant ushort TRITS[256] = {
    0x000, 0x001, 0x002, 0x004, 0x005, 0x006, 0x008, 0x009, 0x00a, 0x010, 0x011, 0x012,
    0x014, 0x015, 0x016, 0x018, 0x019, 0x01a, 0x020, 0x021, 0x022, 0x024, 0x025, 0x026,
    0x028, 0x029, 0x02a, 0x040, 0x041, 0x042, 0x044, 0x045, 0x046, 0x048, 0x049, 0x04a,
    0x050, 0x051, 0x052, 0x054, 0x055, 0x056, 0x058, 0x059, 0x05a, 0x060, 0x061, 0x062,
    0x064, 0x065, 0x066, 0x068, 0x069, 0x06a, 0x080, 0x081, 0x082, 0x084, 0x085, 0x086,
    0x088, 0x089, 0x08a, 0x090, 0x091, 0x092, 0x094, 0x095, 0x096, 0x098, 0x099, 0x09a,
    0x0a0, 0x0a1, 0x0a2, 0x0a4, 0x0a5, 0x0a6, 0x0a8, 0x0a9, 0x0aa, 0x100, 0x101, 0x102,
    0x104, 0x105, 0x106, 0x108, 0x109, 0x10a, 0x110, 0x111, 0x112, 0x114, 0x115, 0x116,
    0x118, 0x119, 0x11a, 0x120, 0x121, 0x122, 0x124, 0x125, 0x126, 0x128, 0x129, 0x12a,
    0x140, 0x141, 0x142, 0x144, 0x145, 0x146, 0x148, 0x149, 0x14a, 0x150, 0x151, 0x152,
    0x154, 0x155, 0x156, 0x158, 0x159, 0x15a, 0x160, 0x161, 0x162, 0x164, 0x165, 0x166,
    0x168, 0x169, 0x16a, 0x180, 0x181, 0x182, 0x184, 0x185, 0x186, 0x188, 0x189, 0x18a,
    0x190, 0x191, 0x192, 0x194, 0x195, 0x196, 0x198, 0x199, 0x19a, 0x1a0, 0x1a1, 0x1a2,
    0x1a4, 0x1a5, 0x1a6, 0x1a8, 0x1a9, 0x1aa, 0x200, 0x201, 0x202, 0x204, 0x205, 0x206,
    0x208, 0x209, 0x20a, 0x210, 0x211, 0x212, 0x214, 0x215, 0x216, 0x218, 0x219, 0x21a,
    0x220, 0x221, 0x222, 0x224, 0x225, 0x226, 0x228, 0x229, 0x22a, 0x240, 0x241, 0x242,
    0x244, 0x245, 0x246, 0x248, 0x249, 0x24a, 0x250, 0x251, 0x252, 0x254, 0x255, 0x256,
    0x258, 0x259, 0x25a, 0x260, 0x261, 0x262, 0x264, 0x265, 0x266, 0x268, 0x269, 0x26a,
    0x280, 0x281, 0x282, 0x284, 0x285, 0x286, 0x288, 0x289, 0x28a, 0x290, 0x291, 0x292,
    0x294, 0x295, 0x296, 0x298, 0x299, 0x29a, 0x2a0, 0x2a1, 0x2a2, 0x2a4, 0x2a5, 0x2a6,
    0x2a8, 0x2a9, 0x2aa, 0x000, 0x001, 0x002, 0x004, 0x005, 0x006, 0x008, 0x009, 0x00a,
    0x010, 0x011, 0x012, 0x014,
};

// n / 5 for every uint n (multiply-and-shift; only to locate a weight's byte, never per weight).
inline uint div5(uint n) {
  return uint((ulong(n) * 0xCCCCCCCDul) >> 34);
}

template <int L>
inline BinaryCodes weight_codes(const device uint32_t* row, int k) {
  static_assert(L == 8 || L == 16, "chunks of 8 or 16 weights");
  const uint word = row[k >> 5];
  return {(word >> (k & 31)) & ((1u << L) - 1u)};
}

// Weight k lives in byte k / 5 as digit k % 5: the bytes that hold digits d .. d + L - 1 go
// through TRITS into one 64-bit run of 2-bit fields, shifted so that weight k is field 0.
template <int L>
inline TernaryCodes weight_codes(const device uint8_t* row, int k) {
  static_assert(L == 8 || L == 16, "chunks of 8 or 16 weights");
  const uint b = div5(uint(k));
  const uint d = uint(k) - 5u * b;
  ulong fields = 0;
  for (int j = 0; j < (L + 8) / 5; ++j) {
    if (5u * uint(j) < d + uint(L)) {  // only bytes holding one of the L digits: never past the row
      fields |= ulong(TRITS[row[b + uint(j)]]) << (10 * j);
    }
  }
  return {uint(fields >> (2u * d))};
}

// Weight i of the codes in units of its scale: -1 or +1 (binary), -1, 0 or +1 (ternary).
inline float unit_weight(BinaryCodes c, int i) {
  return ((c.bits >> i) & 1u) ? 1.0f : -1.0f;
}
inline float unit_weight(TernaryCodes c, int i) {
  return float(int((c.trits >> (2 * i)) & 3u) - 1);
}

// Weights i .. i + 3 as a vector of T (scale applied): the unit of every tile / output store.
template <typename T, typename C>
inline vec<T, 4> weights4(C codes, int i, float s) {
  vec<T, 4> v;
  for (int e = 0; e < 4; ++e) {
    v[e] = T(unit_weight(codes, i + e) * s);
  }
  return v;
}

// Four zeros of T, element by element (clang's bfloat stand-in cannot splat: msl_check.py).
template <typename T>
inline vec<T, 4> zeros4() {
  vec<T, 4> v;
  for (int e = 0; e < 4; ++e) {
    v[e] = T(0.0f);
  }
  return v;
}

// Small-M kernel: sum_i unit_weight(c, i) * x[i] over one chunk of L inputs, where
// xsum = sum_i x[i]. As in MLX's qdot, the weights are affine in their codes
// (binary: 2 b - 1; ternary: t - 1), so the inner loop is one select or one multiply-add per
// weight and the offset is applied once, through xsum, which every output row shares.
template <int L>
inline float chunk_dot(BinaryCodes c, const thread float* x, float xsum) {
  float d = 0.0f;
  for (int i = 0; i < L; ++i) {
    d += ((c.bits >> i) & 1u) ? x[i] : 0.0f;
  }
  return 2.0f * d - xsum;
}
template <int L>
inline float chunk_dot(TernaryCodes c, const thread float* x, float xsum) {
  float d = 0.0f;
  for (int i = 0; i < L; ++i) {
    d += float((c.trits >> (2 * i)) & 3u) * x[i];
  }
  return d - xsum;
}

// ---- small-M kernel (packed_gemv.metal) --------------------------------------------------
static constant constexpr const int GEMV_SIMDGROUPS = 2;  // per threadgroup (MLX's qmv_fast)
static constant constexpr const int GEMV_ROWS = 4;        // output features per SIMD-group

// ---- tiled GEMM (packed_gemm.metal) ------------------------------------------------------
// A threadgroup of 128 threads (2 x 2 SIMD-groups) computes BM x BN outputs (BM = 64, or 32
// for M < 64: a template parameter), K consumed BK at a time. Tiles are staged in the
// activation dtype T, rows BK + 16 bytes apart (MLX steel's BK_padded).
static constant constexpr const int BN = 64;
static constant constexpr const int BK = 32;
static constant constexpr const int GEMM_THREADS = 128;

template <typename T>
constexpr int tile_ld() {
  return BK + 16 / int(sizeof(T));
}

// Lane l of a SIMD-group holds elements (row, col) and (row, col + 1) of an 8 x 8
// simdgroup_matrix (the layout MLX's steel GEMMs use: mma.h, BaseMMAFrag::get_coord).
inline int frag_row(uint lane) {
  return int((lane / 4 & 4) + (lane / 2) % 4);
}
inline int frag_col(uint lane) {
  return int((lane / 4 & 2) * 2 + (lane % 2) * 2);
}

// Fragment (8 x 8, float) of a tile in T: element (i, j) is tile[(r0 + i) * LD + c0 + j] (the x
// tile as A), or, transposed, tile[(r0 + j) * LD + c0 + i] (the W tile, rows n, as B = W.T).
template <typename T>
inline void load_fragment(thread simdgroup_matrix<float, 8, 8>& f, const threadgroup T* tile,
                          int r0, int c0, uint lane) {
  const threadgroup T* src = tile + (r0 + frag_row(lane)) * tile_ld<T>() + c0 + frag_col(lane);
  const vec<T, 2> pair = *((const threadgroup vec<T, 2>*)src);  // one load of both
  f.thread_elements()[0] = float(pair[0]);
  f.thread_elements()[1] = float(pair[1]);
}
template <typename T>
inline void load_fragment_transposed(thread simdgroup_matrix<float, 8, 8>& f,
                                     const threadgroup T* tile, int r0, int c0, uint lane) {
  const threadgroup T* src = tile + (r0 + frag_col(lane)) * tile_ld<T>() + c0 + frag_row(lane);
  f.thread_elements()[0] = float(src[0]);
  f.thread_elements()[1] = float(src[tile_ld<T>()]);
}

// Which of its `count` 4-element stores a thread writing tile row r issues as its v-th:
// rotated by r / 8, so that the 32 lanes of a SIMD-group (32 rows, the same columns) spread
// each store over all 32 banks (with 2-byte T, unrotated stores would conflict 2-way).
inline int store_slot(int v, int r, int count) {
  return (v + (r >> 3)) & (count - 1);
}

// x tile: rows m0 .. m0 + R of x, inputs k0 .. k0 + BK -> xs[r * LD + c] in T; rows past M are
// zeros. Thread t takes row t % R and R / 4 inputs from column (t / R) * R / 4.
template <int R, typename T>
inline void load_x_tile(threadgroup T* xs, const device T* x, int M, int K, int m0, int k0,
                        uint tid) {
  constexpr int XV = R * BK / GEMM_THREADS;  // 16 (R = 64) or 8 (R = 32) inputs per thread
  const int r = int(tid) % R;
  const int c = int(tid) / R * XV;
  const int m = m0 + r;
  threadgroup T* dst = xs + r * tile_ld<T>() + c;
  if (m >= M) {
    for (int v = 0; v < XV / 4; ++v) {
      *((threadgroup vec<T, 4>*)(dst + 4 * v)) = zeros4<T>();
    }
    return;
  }
  const device T* src = x + m * K + k0 + c;
  for (int v = 0; v < XV / 4; ++v) {
    const int q = 4 * store_slot(v, r, XV / 4);
    vec<T, 4> val;
    for (int e = 0; e < 4; ++e) {
      val[e] = src[q + e];
    }
    *((threadgroup vec<T, 4>*)(dst + q)) = val;
  }
}

// W tile: rows n0 .. n0 + BN of W, inputs k0 .. k0 + BK, decoded with their scale ->
// ws[r * LD + c] in T (row r holds W[n0 + r][k0 ..]: B is read transposed, as in MLX's
// qmm_t). Thread t decodes 16 weights of row t % BN from column (t / BN) * 16. `s` keeps the
// row's scale: read once per group of 128 inputs (every 4th K step).
template <typename T, typename W, typename S>
inline void load_w_tile(threadgroup T* ws, const device W* w, const device S* scales,
                        thread float& s, int N, int K, int units, int n0, int k0, uint tid) {
  const int r = int(tid) % BN;
  const int c = int(tid) / BN * 16;
  const int n = n0 + r;
  threadgroup T* dst = ws + r * tile_ld<T>() + c;
  if (n >= N) {
    for (int v = 0; v < 4; ++v) {
      *((threadgroup vec<T, 4>*)(dst + 4 * v)) = zeros4<T>();
    }
    return;
  }
  if (k0 % GROUP == 0) {
    s = float(scales[n * (K / GROUP) + k0 / GROUP]);
  }
  const auto codes = weight_codes<16>(w + n * units, k0 + c);
  for (int v = 0; v < 4; ++v) {
    const int q = 4 * store_slot(v, r, 4);
    *((threadgroup vec<T, 4>*)(dst + q)) = weights4<T>(codes, q, s);
  }
}
