// Shared helpers for the packed binary / ternary kernels (header of every kernel).
//
// Formats (docs/formats.md): scale-only, one float16 scale per 128 consecutive inputs k.
//   binary  `w` uint32 (N, K/32): bit j of word i of row n is weight (n, 32i + j); 1 -> +s, 0 -> -s.
//   ternary `w` uint8 (N, ceil(K/5)): byte b holds k = 5b .. 5b+4 as base-3 digits, least
//           significant first; digit 0 -> -s, 1 -> 0, 2 -> +s.
// The binary and ternary versions of each helper are overloads on the type of `w`, so one
// kernel body serves both formats.

// Fused GEMM tile: BM x BN outputs per threadgroup of 128 threads (2 x 2 simdgroups, each
// 32 x 32 as 4 x 4 simdgroup matrices of 8 x 8), K consumed BK at a time.
static constant constexpr const int BM = 64;
static constant constexpr const int BN = 64;
static constant constexpr const int BK = 32;
static constant constexpr const int XS_STRIDE = BK + 4;  // padded rows: fewer bank conflicts
static constant constexpr const int WS_STRIDE = BN + 4;
static constant constexpr const int GROUP = 128;

// Small-M kernel: each simdgroup computes GEMV_ROWS output features for all M <= 8 rows.
static constant constexpr const int GEMV_ROWS = 4;
static constant constexpr const int GEMV_MAX_M = 8;

// x tile (BM x BK) -> xs[m][k] as float; rows past M are zero. 128 threads, coalesced.
template <typename T>
inline void load_x_tile(const device T* x, threadgroup float* xs, int M, int K, int m0, int k0,
                        uint tid) {
  for (int i = 0; i < (BM * BK) / 128; ++i) {
    int idx = int(tid) + 128 * i;
    int r = idx / BK;
    int c = idx % BK;
    int m = m0 + r;
    xs[r * XS_STRIDE + c] = m < M ? float(x[ulong(m) * ulong(K) + ulong(k0 + c)]) : 0.0f;
  }
}

// Binary weight tile: rows n0 .. n0+BN, inputs k0 .. k0+BK (one word per row), stored
// transposed as ws[k][n] = W[n][k]. Thread t unpacks 16 bits of row t / 2.
template <typename S>
inline void load_w_tile(const device uint32_t* w, const device S* scales, threadgroup float* ws,
                        int N, int K, int words_per_row, int n0, int k0, uint tid) {
  int nl = int(tid) / 2;
  int h = int(tid) % 2;
  int n = n0 + nl;
  uint bits = 0;
  float s = 0.0f;
  if (n < N) {
    bits = w[ulong(n) * ulong(words_per_row) + ulong(k0 / 32)] >> (16 * h);
    s = float(scales[ulong(n) * ulong(K / GROUP) + ulong(k0 / GROUP)]);
  }
  for (int j = 0; j < 16; ++j) {
    ws[(16 * h + j) * WS_STRIDE + nl] = ((bits >> j) & 1u) ? s : -s;
  }
}

// Ternary weight tile, same shape. Thread t decodes 16 consecutive k of row t / 2.
template <typename S>
inline void load_w_tile(const device uint8_t* w, const device S* scales, threadgroup float* ws,
                        int N, int K, int bytes_per_row, int n0, int k0, uint tid) {
  int nl = int(tid) / 2;
  int h = int(tid) % 2;
  int n = n0 + nl;
  if (n >= N) {
    for (int j = 0; j < 16; ++j) ws[(16 * h + j) * WS_STRIDE + nl] = 0.0f;
    return;
  }
  float s = float(scales[ulong(n) * ulong(K / GROUP) + ulong(k0 / GROUP)]);
  const device uint8_t* row = w + ulong(n) * ulong(bytes_per_row);
  int k = k0 + 16 * h;
  int b = k / 5;
  int d = k % 5;
  uint v = uint(row[b]);
  for (int i = 0; i < d; ++i) v /= 3u;
  for (int j = 0; j < 16; ++j) {
    ws[(16 * h + j) * WS_STRIDE + nl] = float(int(v % 3u) - 1) * s;
    v /= 3u;
    if (++d == 5 && j < 15) {
      d = 0;
      v = uint(row[++b]);
    }
  }
}

// Small-M: the contribution of one packed unit (a binary word: 32 inputs; a ternary byte:
// 5 inputs) of row `n` to acc[m] for m < M. `unit` indexes the unit within the row.
template <typename T, typename S>
inline void gemv_unit(const device uint32_t* w, const device S* scales, const device T* x,
                      thread float* acc, int M, int K, int units_per_row, int n, int unit) {
  uint bits = w[ulong(n) * ulong(units_per_row) + ulong(unit)];
  float s = float(scales[ulong(n) * ulong(K / GROUP) + ulong(unit / 4)]);
  int k = unit * 32;
  for (int m = 0; m < M; ++m) {
    const device T* xr = x + ulong(m) * ulong(K) + ulong(k);
    float dot = 0.0f;
    for (int j = 0; j < 32; ++j) {
      float v = float(xr[j]);
      dot += ((bits >> j) & 1u) ? v : -v;
    }
    acc[m] += s * dot;
  }
}

template <typename T, typename S>
inline void gemv_unit(const device uint8_t* w, const device S* scales, const device T* x,
                      thread float* acc, int M, int K, int units_per_row, int n, int unit) {
  uint v = uint(w[ulong(n) * ulong(units_per_row) + ulong(unit)]);
  for (int i = 0; i < 5; ++i) {
    int k = unit * 5 + i;
    int t = int(v % 3u) - 1;
    v /= 3u;
    if (k >= K || t == 0) continue;
    float s = float(t) * float(scales[ulong(n) * ulong(K / GROUP) + ulong(k / GROUP)]);
    for (int m = 0; m < M; ++m) acc[m] += s * float(x[ulong(m) * ulong(K) + ulong(k)]);
  }
}

// Dequantize: one packed unit of row n -> its dense weights in out (N, K).
template <typename T, typename S>
inline void dequantize_unit(const device uint32_t* w, const device S* scales, device T* out,
                            int K, int units_per_row, int n, int unit) {
  uint bits = w[ulong(n) * ulong(units_per_row) + ulong(unit)];
  float s = float(scales[ulong(n) * ulong(K / GROUP) + ulong(unit / 4)]);
  device T* o = out + ulong(n) * ulong(K) + ulong(unit * 32);
  for (int j = 0; j < 32; ++j) o[j] = T(((bits >> j) & 1u) ? s : -s);
}

template <typename T, typename S>
inline void dequantize_unit(const device uint8_t* w, const device S* scales, device T* out,
                            int K, int units_per_row, int n, int unit) {
  uint v = uint(w[ulong(n) * ulong(units_per_row) + ulong(unit)]);
  for (int i = 0; i < 5; ++i) {
    int k = unit * 5 + i;
    if (k >= K) break;
    float s = float(scales[ulong(n) * ulong(K / GROUP) + ulong(k / GROUP)]);
    out[ulong(n) * ulong(K) + ulong(k)] = T(float(int(v % 3u) - 1) * s);
    v /= 3u;
  }
}
