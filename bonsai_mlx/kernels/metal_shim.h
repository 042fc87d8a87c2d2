// Metal Shading Language shim for the bonsai-mlx CPU emulator (see docs/emulator.md).
//
// Lets the body of an `mx.fast.metal_kernel` compile as C++20 with g++, and runs every
// threadgroup as a set of fibers (one per Metal thread, on one OS thread) that switch at
// barriers and SIMD-group operations, so `threadgroup_barrier` and the simdgroup functions
// have their real semantics. Only the subset of MSL documented in docs/emulator.md exists.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>


// ----------------------------------------------------------------------------------------
// Scalar types
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;
typedef _Float16 float16_t;

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  static bfloat16_t from_bits(uint16_t b) {
    bfloat16_t r;
    r.bits = b;
    return r;
  }
  bfloat16_t(float f) {  // round to nearest even, NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = uint16_t(u >> 16);
    }
  }
  template <class U, class = std::enable_if_t<std::is_arithmetic_v<U> || std::is_same_v<U, half>>>
  bfloat16_t(U v) : bfloat16_t(float(v)) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
typedef bfloat16_t bfloat;

#define BONSAI_BF16_BINOP(op)                                                             \
  inline bfloat16_t operator op(bfloat16_t a, bfloat16_t b) {                             \
    return bfloat16_t(float(a) op float(b));                                              \
  }                                                                                       \
  inline float operator op(bfloat16_t a, float b) { return float(a) op b; }               \
  inline float operator op(float a, bfloat16_t b) { return a op float(b); }               \
  inline float operator op(bfloat16_t a, half b) { return float(a) op float(b); }         \
  inline float operator op(half a, bfloat16_t b) { return float(a) op float(b); }         \
  inline bfloat16_t operator op(bfloat16_t a, int b) { return bfloat16_t(float(a) op b); } \
  inline bfloat16_t operator op(int a, bfloat16_t b) { return bfloat16_t(a op float(b)); } \
  inline bfloat16_t operator op(bfloat16_t a, uint b) {                                   \
    return bfloat16_t(float(a) op float(b));                                              \
  }                                                                                       \
  inline bfloat16_t operator op(uint a, bfloat16_t b) {                                   \
    return bfloat16_t(float(a) op float(b));                                              \
  }                                                                                       \
  inline bfloat16_t& operator op##=(bfloat16_t& a, bfloat16_t b) {                        \
    a = bfloat16_t(float(a) op float(b));                                                 \
    return a;                                                                             \
  }                                                                                       \
  inline bfloat16_t& operator op##=(bfloat16_t& a, float b) {                             \
    a = bfloat16_t(float(a) op b);                                                        \
    return a;                                                                             \
  }
BONSAI_BF16_BINOP(+)
BONSAI_BF16_BINOP(-)
BONSAI_BF16_BINOP(*)
BONSAI_BF16_BINOP(/)
#undef BONSAI_BF16_BINOP
inline bfloat16_t operator-(bfloat16_t a) { return bfloat16_t::from_bits(a.bits ^ 0x8000u); }
#define BONSAI_BF16_CMP(op)                                                                     \
  inline bool operator op(bfloat16_t a, bfloat16_t b) { return float(a) op float(b); }         \
  inline bool operator op(bfloat16_t a, float b) { return float(a) op b; }                      \
  inline bool operator op(float a, bfloat16_t b) { return a op float(b); }                      \
  inline bool operator op(bfloat16_t a, int b) { return float(a) op float(b); }                 \
  inline bool operator op(int a, bfloat16_t b) { return float(a) op float(b); }
BONSAI_BF16_CMP(<)
BONSAI_BF16_CMP(>)
BONSAI_BF16_CMP(<=)
BONSAI_BF16_CMP(>=)
BONSAI_BF16_CMP(==)
BONSAI_BF16_CMP(!=)
#undef BONSAI_BF16_CMP

// ----------------------------------------------------------------------------------------
// Vector types: vec<T, N> with .x .y .z .w, element-wise arithmetic, [] indexing.
namespace metal {
template <class T, int N>
struct vec_storage;
template <class T>
struct vec_storage<T, 2> {
  T x, y;
};
template <class T>
struct vec_storage<T, 3> {
  T x, y, z;
};
template <class T>
struct vec_storage<T, 4> {
  T x, y, z, w;
};

template <class T, int N>
struct vec : vec_storage<T, N> {
  vec() = default;
  vec(T s) {  // broadcast
    for (int i = 0; i < N; ++i) (*this)[i] = s;
  }
  template <class... A, class = std::enable_if_t<sizeof...(A) == N && (N > 1)>>
  vec(A... a) {
    T v[N] = {T(a)...};
    for (int i = 0; i < N; ++i) (*this)[i] = v[i];
  }
  template <class U>
  explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; ++i) (*this)[i] = T(o[i]);
  }
  T& operator[](int i) { return reinterpret_cast<T*>(this)[i]; }
  const T& operator[](int i) const { return reinterpret_cast<const T*>(this)[i]; }
};

#define BONSAI_VEC_BINOP(op)                                                        \
  template <class T, int N>                                                         \
  vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {                   \
    vec<T, N> r;                                                                    \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] op b[i]);                             \
    return r;                                                                       \
  }                                                                                 \
  template <class T, int N, class S, class = std::enable_if_t<!std::is_class_v<S>>> \
  vec<T, N> operator op(const vec<T, N>& a, S b) {                                  \
    vec<T, N> r;                                                                    \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] op T(b));                             \
    return r;                                                                       \
  }                                                                                 \
  template <class T, int N, class S, class = std::enable_if_t<!std::is_class_v<S>>> \
  vec<T, N> operator op(S a, const vec<T, N>& b) {                                  \
    vec<T, N> r;                                                                    \
    for (int i = 0; i < N; ++i) r[i] = T(T(a) op b[i]);                             \
    return r;                                                                       \
  }                                                                                 \
  template <class T, int N, class B>                                                \
  vec<T, N>& operator op##=(vec<T, N>& a, const B& b) {                             \
    a = a op b;                                                                     \
    return a;                                                                       \
  }
BONSAI_VEC_BINOP(+)
BONSAI_VEC_BINOP(-)
BONSAI_VEC_BINOP(*)
BONSAI_VEC_BINOP(/)
#undef BONSAI_VEC_BINOP
template <class T, int N>
vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; ++i) r[i] = T(-a[i]);
  return r;
}
}  // namespace metal

#define BONSAI_VEC_ALIASES(T, name) \
  typedef metal::vec<T, 2> name##2; \
  typedef metal::vec<T, 3> name##3; \
  typedef metal::vec<T, 4> name##4;
BONSAI_VEC_ALIASES(float, float)
BONSAI_VEC_ALIASES(half, half)
BONSAI_VEC_ALIASES(bfloat16_t, bfloat)
BONSAI_VEC_ALIASES(int, int)
BONSAI_VEC_ALIASES(uint, uint)
BONSAI_VEC_ALIASES(short, short)
BONSAI_VEC_ALIASES(ushort, ushort)
BONSAI_VEC_ALIASES(char, char)
BONSAI_VEC_ALIASES(uchar, uchar)
BONSAI_VEC_ALIASES(ulong, ulong)
BONSAI_VEC_ALIASES(long, long)
BONSAI_VEC_ALIASES(bool, bool)
#undef BONSAI_VEC_ALIASES

// ----------------------------------------------------------------------------------------
// Fiber runtime: one fiber per Metal thread of the current threadgroup.
namespace bonsai_emu {

enum State : int { READY = 0, WAIT_TG = 1, WAIT_SIMD = 2, DONE = 3 };
constexpr int kSimdWidth = 32;
constexpr size_t kThreadgroupMemory = 32768;  // Apple GPUs: 32 KiB per threadgroup
constexpr size_t kStackSize = 256 * 1024;

struct Fiber {
  void* sp;
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  int state;
  unsigned simd_ops;  // count of SIMD-group rendezvous, gives the exchange buffer parity
  size_t tg_offset;   // bump pointer into the threadgroup arena
  char* stack;
  // Metal thread attributes, named as in MSL.
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid;
  uint3 threadgroups_per_grid, threads_per_grid, threads_per_threadgroup, grid_origin, grid_size;
  uint3 dispatch_threads_per_threadgroup;
  uint thread_index_in_simdgroup, simdgroup_index_in_threadgroup, simdgroups_per_threadgroup;
  uint threads_per_simdgroup, thread_index_in_threadgroup, thread_execution_width;
  uint thread_index_in_quadgroup, quadgroup_index_in_threadgroup, quadgroups_per_threadgroup;
  uint dispatch_simdgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};

struct Simd {
  int alive, waiting;
  uint32_t present[2];
  alignas(16) unsigned char slot[2][kSimdWidth][64];
};

struct Runtime {
  Fiber* fibers = nullptr;
  int nfibers = 0;
  Simd* simds = nullptr;
  int tg_alive = 0, tg_waiting = 0;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
  Fiber* cur = nullptr;
  alignas(64) unsigned char arena[kThreadgroupMemory];
  bool abort = false;
  char error[512] = {0};
  void (*entry)(Fiber*) = nullptr;
};
inline Runtime R;

#if defined(__x86_64__)
extern "C" void bonsai_ctx_switch(void** save_sp, void* load_sp);
extern "C" void bonsai_fiber_trampoline();
asm(R"(
.text
.p2align 4
.globl bonsai_ctx_switch
.hidden bonsai_ctx_switch
.type bonsai_ctx_switch,@function
bonsai_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size bonsai_ctx_switch, .-bonsai_ctx_switch
.p2align 4
.globl bonsai_fiber_trampoline
.hidden bonsai_fiber_trampoline
.type bonsai_fiber_trampoline,@function
bonsai_fiber_trampoline:
  movq %r12, %rdi
  call bonsai_fiber_main
  ud2
.size bonsai_fiber_trampoline, .-bonsai_fiber_trampoline
)");
#endif

inline void to_scheduler(Fiber* f) {
#if defined(__x86_64__)
  bonsai_ctx_switch(&f->sp, R.sched_sp);
#else
  swapcontext(&f->ctx, &R.sched_ctx);
#endif
}

[[noreturn]] inline void fail(const char* msg) {
  std::snprintf(R.error, sizeof(R.error), "%s", msg);
  R.abort = true;
  Fiber* f = R.cur;
  f->state = DONE;
  to_scheduler(f);
  __builtin_unreachable();
}

inline Fiber* cur() { return R.cur; }

inline void release_simd(int s) {
  Simd& g = R.simds[s];
  g.waiting = 0;
  int base = s * kSimdWidth;
  for (int i = base; i < base + kSimdWidth && i < R.nfibers; ++i)
    if (R.fibers[i].state == WAIT_SIMD) R.fibers[i].state = READY;
}

inline void release_tg() {
  R.tg_waiting = 0;
  for (int i = 0; i < R.nfibers; ++i)
    if (R.fibers[i].state == WAIT_TG) R.fibers[i].state = READY;
}

// All live lanes of the calling thread's SIMD-group meet here. Before arriving, a lane
// writes its contribution to slot[parity][lane]; after this returns, every live lane's
// contribution is visible and `present` says which lanes are live.
inline int simd_rendezvous_begin() {
  Fiber* f = cur();
  int p = int(f->simd_ops & 1u);
  return p;
}
inline void simd_rendezvous_end() {
  Fiber* f = cur();
  Simd& g = R.simds[f->simdgroup_index_in_threadgroup];
  int p = int(f->simd_ops & 1u);
  f->simd_ops++;
  if (g.waiting == 0) g.present[p] = 0;
  g.present[p] |= 1u << f->thread_index_in_simdgroup;
  g.waiting++;
  if (g.waiting == g.alive) {
    release_simd(int(f->simdgroup_index_in_threadgroup));
    return;
  }
  f->state = WAIT_SIMD;
  to_scheduler(f);
}

template <class T>
inline void simd_publish(int p, const T& v) {
  static_assert(sizeof(T) <= 64, "SIMD exchange of a value larger than 64 bytes");
  Fiber* f = cur();
  std::memcpy(R.simds[f->simdgroup_index_in_threadgroup].slot[p][f->thread_index_in_simdgroup],
              &v, sizeof(T));
}
template <class T>
inline T simd_read(int p, int lane) {
  T v;
  std::memcpy(&v, R.simds[cur()->simdgroup_index_in_threadgroup].slot[p][lane], sizeof(T));
  return v;
}
inline uint32_t simd_present(int p) { return R.simds[cur()->simdgroup_index_in_threadgroup].present[p]; }

template <class A>
inline A& tg_alloc() {
  Fiber* f = cur();
  size_t off = (f->tg_offset + alignof(A) - 1) / alignof(A) * alignof(A);
  if (off + sizeof(A) > kThreadgroupMemory)
    fail("threadgroup memory exceeds 32 KiB (the Apple GPU limit)");
  f->tg_offset = off + sizeof(A);
  return *reinterpret_cast<A*>(R.arena + off);
}

}  // namespace bonsai_emu

extern "C" __attribute__((visibility("hidden"), used)) inline void bonsai_fiber_main(
    bonsai_emu::Fiber* f) {
  using namespace bonsai_emu;
  R.entry(f);
  // Every thread of a threadgroup must reach each threadgroup_barrier (MSL); a thread that
  // returns while others wait at one is a divergent barrier.
  if (R.tg_waiting > 0)
    fail("divergent threadgroup_barrier: a thread returned while others wait at a barrier");
  f->state = DONE;
  R.tg_alive--;
  Simd& g = R.simds[f->simdgroup_index_in_threadgroup];
  g.alive--;
  if (g.waiting > 0 && g.waiting == g.alive) release_simd(int(f->simdgroup_index_in_threadgroup));
  to_scheduler(f);
  __builtin_unreachable();
}

#if !defined(__x86_64__)
inline void bonsai_fiber_start_uc(unsigned lo, unsigned hi) {
  uintptr_t p = (uintptr_t(hi) << 32) | uintptr_t(lo);
  bonsai_fiber_main(reinterpret_cast<bonsai_emu::Fiber*>(p));
}
#endif

// ----------------------------------------------------------------------------------------
// Address spaces, attributes and synchronisation
#define METAL_FUNC inline __attribute__((always_inline))
#define device
#define constant
#define thread
#define threadgroup
#define ray_data

namespace metal {
enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

inline void threadgroup_barrier(mem_flags = mem_flags::mem_none) {
  using namespace bonsai_emu;
  Fiber* f = cur();
  if (R.tg_alive != R.nfibers)
    fail("divergent threadgroup_barrier: reached after some threads of the threadgroup returned");
  R.tg_waiting++;
  if (R.tg_waiting == R.tg_alive) {
    release_tg();
    return;
  }
  f->state = WAIT_TG;
  to_scheduler(f);
}

inline void simdgroup_barrier(mem_flags = mem_flags::mem_none) {
  bonsai_emu::simd_rendezvous_begin();
  bonsai_emu::simd_rendezvous_end();
}

// ---- SIMD-group functions (width 32; inactive lanes do not contribute) -----------------
#define BONSAI_SIMD_REDUCE(fname, expr)                                 \
  template <class T>                                                    \
  T fname(T x) {                                                        \
    using namespace bonsai_emu;                                         \
    int p = simd_rendezvous_begin();                                    \
    simd_publish(p, x);                                                 \
    simd_rendezvous_end();                                              \
    uint32_t m = simd_present(p);                                       \
    bool first = true;                                                  \
    T acc = x;                                                          \
    for (int l = 0; l < kSimdWidth; ++l) {                              \
      if (!(m >> l & 1u)) continue;                                     \
      T v = simd_read<T>(p, l);                                         \
      if (first) {                                                      \
        acc = v;                                                        \
        first = false;                                                  \
      } else {                                                          \
        acc = expr;                                                     \
      }                                                                 \
    }                                                                   \
    return acc;                                                         \
  }
BONSAI_SIMD_REDUCE(simd_sum, T(acc + v))
BONSAI_SIMD_REDUCE(simd_product, T(acc * v))
BONSAI_SIMD_REDUCE(simd_max, (v > acc ? v : acc))
BONSAI_SIMD_REDUCE(simd_min, (v < acc ? v : acc))
BONSAI_SIMD_REDUCE(simd_and, T(acc & v))
BONSAI_SIMD_REDUCE(simd_or, T(acc | v))
BONSAI_SIMD_REDUCE(simd_xor, T(acc ^ v))
#undef BONSAI_SIMD_REDUCE

// Value of `x` in lane `src`; a lane reading an inactive or out-of-range lane keeps its own.
template <class T>
T bonsai_simd_gather(T x, int src) {
  using namespace bonsai_emu;
  int p = simd_rendezvous_begin();
  simd_publish(p, x);
  simd_rendezvous_end();
  uint32_t m = simd_present(p);
  if (src < 0 || src >= kSimdWidth || !(m >> src & 1u)) return x;
  return simd_read<T>(p, src);
}
template <class T>
T simd_shuffle(T x, ushort lane) {
  return bonsai_simd_gather(x, int(lane));
}
template <class T>
T simd_broadcast(T x, ushort lane) {
  return bonsai_simd_gather(x, int(lane));
}
template <class T>
T simd_shuffle_down(T x, ushort delta) {
  return bonsai_simd_gather(x, int(bonsai_emu::cur()->thread_index_in_simdgroup) + int(delta));
}
template <class T>
T simd_shuffle_up(T x, ushort delta) {
  return bonsai_simd_gather(x, int(bonsai_emu::cur()->thread_index_in_simdgroup) - int(delta));
}
template <class T>
T simd_shuffle_xor(T x, ushort mask) {
  return bonsai_simd_gather(x, int(bonsai_emu::cur()->thread_index_in_simdgroup ^ mask));
}
template <class T>
T simd_broadcast_first(T x) {
  using namespace bonsai_emu;
  int p = simd_rendezvous_begin();
  simd_publish(p, x);
  simd_rendezvous_end();
  uint32_t m = simd_present(p);
  return simd_read<T>(p, __builtin_ctz(m));
}
template <class T>
T simd_prefix_exclusive_sum(T x) {
  using namespace bonsai_emu;
  int p = simd_rendezvous_begin();
  simd_publish(p, x);
  simd_rendezvous_end();
  uint32_t m = simd_present(p);
  T acc = T(0);
  for (uint l = 0; l < cur()->thread_index_in_simdgroup; ++l)
    if (m >> l & 1u) acc = T(acc + simd_read<T>(p, int(l)));
  return acc;
}
template <class T>
T simd_prefix_inclusive_sum(T x) {
  return T(simd_prefix_exclusive_sum(x) + x);
}
inline bool simd_all(bool b) { return simd_min(int(b)) != 0; }
inline bool simd_any(bool b) { return simd_max(int(b)) != 0; }
inline bool simd_is_first() {
  return simd_broadcast_first(bonsai_emu::cur()->thread_index_in_simdgroup) ==
         bonsai_emu::cur()->thread_index_in_simdgroup;
}

// ---- simdgroup_matrix: 8x8, each lane holds two elements as on Apple GPUs ---------------
// Lane l holds row fm, columns fn and fn + 1 (the layout MLX's steel GEMM relies on).
inline int bonsai_frag_row(uint lane) { return int((lane / 4 & 4) + (lane / 2) % 4); }
inline int bonsai_frag_col(uint lane) { return int((lane / 4 & 2) * 2 + (lane % 2) * 2); }

template <class T, int Rows, int Cols>
struct simdgroup_matrix {
  static_assert(Rows == 8 && Cols == 8, "only 8x8 simdgroup matrices are supported");
  vec<T, 2> frag;
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diag) {  // diagonal matrix, as in MSL
    uint lane = bonsai_emu::cur()->thread_index_in_simdgroup;
    int r = bonsai_frag_row(lane), c = bonsai_frag_col(lane);
    frag[0] = r == c ? diag : T(0);
    frag[1] = r == c + 1 ? diag : T(0);
  }
  thread vec<T, 2>& thread_elements() { return frag; }
  const vec<T, 2>& thread_elements() const { return frag; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat16_t, 8, 8> simdgroup_bfloat8x8;

template <class T, int Rows, int Cols>
simdgroup_matrix<T, Rows, Cols> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, Rows, Cols> m;
  m.frag[0] = v;
  m.frag[1] = v;
  return m;
}

// Element (r, c) of the matrix is src[(origin.y + r) * elements_per_row + origin.x + c];
// with transpose_matrix, element (r, c) is the source's (c, r).
template <class T, class U>
void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const U* src, ulong elements_per_row = 8,
                    ulong2 matrix_origin = ulong2(0, 0), bool transpose_matrix = false) {
  uint lane = bonsai_emu::cur()->thread_index_in_simdgroup;
  int r = bonsai_frag_row(lane), c = bonsai_frag_col(lane);
  for (int j = 0; j < 2; ++j) {
    ulong row = transpose_matrix ? ulong(c + j) : ulong(r);
    ulong col = transpose_matrix ? ulong(r) : ulong(c + j);
    d.frag[j] = T(src[(matrix_origin.y + row) * elements_per_row + matrix_origin.x + col]);
  }
}
template <class T, class U>
void simdgroup_store(const simdgroup_matrix<T, 8, 8>& a, U* dst, ulong elements_per_row = 8,
                     ulong2 matrix_origin = ulong2(0, 0), bool transpose_matrix = false) {
  uint lane = bonsai_emu::cur()->thread_index_in_simdgroup;
  int r = bonsai_frag_row(lane), c = bonsai_frag_col(lane);
  for (int j = 0; j < 2; ++j) {
    ulong row = transpose_matrix ? ulong(c + j) : ulong(r);
    ulong col = transpose_matrix ? ulong(r) : ulong(c + j);
    dst[(matrix_origin.y + row) * elements_per_row + matrix_origin.x + col] = U(a.frag[j]);
  }
}

// d = a * b + c, computed cooperatively: lanes exchange their fragments of a and b.
template <class TD, class TA, class TB, class TC>
void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d,
                                   const simdgroup_matrix<TA, 8, 8>& a,
                                   const simdgroup_matrix<TB, 8, 8>& b,
                                   const simdgroup_matrix<TC, 8, 8>& c) {
  using namespace bonsai_emu;
  float mine[4] = {float(a.frag[0]), float(a.frag[1]), float(b.frag[0]), float(b.frag[1])};
  float cc[2] = {float(c.frag[0]), float(c.frag[1])};
  int p = simd_rendezvous_begin();
  simd_publish(p, mine);
  simd_rendezvous_end();
  if (simd_present(p) != 0xffffffffu)
    fail("simdgroup_multiply_accumulate needs all 32 lanes of the SIMD-group");
  float A[8][8], B[8][8];
  for (int l = 0; l < kSimdWidth; ++l) {
    float v[4];
    std::memcpy(v, R.simds[cur()->simdgroup_index_in_threadgroup].slot[p][l], sizeof(v));
    int r = bonsai_frag_row(uint(l)), col = bonsai_frag_col(uint(l));
    A[r][col] = v[0];
    A[r][col + 1] = v[1];
    B[r][col] = v[2];
    B[r][col + 1] = v[3];
  }
  uint lane = cur()->thread_index_in_simdgroup;
  int r = bonsai_frag_row(lane), col = bonsai_frag_col(lane);
  for (int j = 0; j < 2; ++j) {
    float acc = cc[j];
    for (int k = 0; k < 8; ++k) acc += A[r][k] * B[k][col + j];
    d.frag[j] = TD(acc);
  }
}
template <class TD, class TA, class TB>
void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                        const simdgroup_matrix<TB, 8, 8>& b) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, 8, 8>(TD(0)));
}

// ---- math -------------------------------------------------------------------------------
template <class T>
struct bonsai_math_type {
  using type = std::conditional_t<std::is_same_v<T, double>, double, float>;
};
#define BONSAI_UNARY(fname, impl)                                \
  template <class T, class = std::enable_if_t<!std::is_class_v<T> || std::is_same_v<T, bfloat16_t>>> \
  inline T fname(T x) {                                          \
    using F = typename bonsai_math_type<T>::type;                \
    return T(impl(F(x)));                                        \
  }
BONSAI_UNARY(exp, std::exp)
BONSAI_UNARY(exp2, std::exp2)
BONSAI_UNARY(log, std::log)
BONSAI_UNARY(log2, std::log2)
BONSAI_UNARY(sqrt, std::sqrt)
BONSAI_UNARY(rsqrt, F(1) / std::sqrt)
BONSAI_UNARY(sin, std::sin)
BONSAI_UNARY(cos, std::cos)
BONSAI_UNARY(tanh, std::tanh)
BONSAI_UNARY(floor, std::floor)
BONSAI_UNARY(ceil, std::ceil)
BONSAI_UNARY(round, std::round)
BONSAI_UNARY(rint, std::rint)
BONSAI_UNARY(trunc, std::trunc)
BONSAI_UNARY(fabs, std::fabs)
#undef BONSAI_UNARY
template <class T>
inline T abs(T x) {
  return x < T(0) ? T(-x) : x;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T fmax(T a, T b) {
  return a < b ? b : a;
}
template <class T>
inline T fmin(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
template <class T>
inline T pow(T a, T b) {
  return T(std::pow(float(a), float(b)));
}
template <class T>
inline T fma(T a, T b, T c) {
  return T(std::fma(float(a), float(b), float(c)));
}
template <class T>
inline T mix(T a, T b, T t) {
  return T(a + (b - a) * t);
}
template <class T>
inline T select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T>
inline bool isnan(T x) {
  return std::isnan(float(x));
}
template <class T>
inline bool isinf(T x) {
  return std::isinf(float(x));
}
template <class To, class From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To r;
  std::memcpy(&r, &x, sizeof(To));
  return r;
}
namespace fast {
using metal::cos;
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::max;
using metal::min;
using metal::pow;
using metal::rsqrt;
using metal::sin;
using metal::sqrt;
using metal::tanh;
}  // namespace fast
namespace precise = fast;

template <class T>
struct numeric_limits : std::numeric_limits<T> {};

// ---- atomics (fibers of one threadgroup never run concurrently, so plain ops suffice) ----
enum memory_order { memory_order_relaxed };
template <class T>
struct atomic {
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
template <class T, class U>
inline T atomic_fetch_add_explicit(atomic<T>* o, U v, memory_order) {
  T old = o->value;
  o->value = T(old + T(v));
  return old;
}
template <class T, class U>
inline T atomic_fetch_max_explicit(atomic<T>* o, U v, memory_order) {
  T old = o->value;
  o->value = old < T(v) ? T(v) : old;
  return old;
}
template <class T, class U>
inline T atomic_fetch_min_explicit(atomic<T>* o, U v, memory_order) {
  T old = o->value;
  o->value = T(v) < old ? T(v) : old;
  return old;
}
template <class T, class U>
inline void atomic_store_explicit(atomic<T>* o, U v, memory_order) {
  o->value = T(v);
}
template <class T>
inline T atomic_load_explicit(const atomic<T>* o, memory_order) {
  return o->value;
}
}  // namespace metal

using namespace metal;

// ----------------------------------------------------------------------------------------
// Launch: run every threadgroup of the grid, one after another.
//
// A memory fault while the kernel runs (an out-of-bounds access that reaches one of the
// inaccessible pages the Python side places around every buffer, a fiber overflowing its
// stack into its guard page, a wild pointer) must not kill the test process: SIGSEGV / SIGBUS
// handlers, on their own signal stack, jump back here and the launch returns 2 with the
// faulting address (fault[0]) and whether it was a write (fault[1]: 1 write, 0 read,
// -1 unknown), for the Python side to name the buffer.
namespace bonsai_emu {

struct Grid {
  long grid[3], tgx, tgy, tgz, tg_threads, ngx, ngy, ngz;
  int max_simds, schedule;
  char* stacks;
  size_t stack_stride;
};

struct FaultState {
  sigjmp_buf jump;
  bool active = false;
  pthread_t owner;  // (not "thread": MSL's address space is a macro here)
  void* volatile addr = nullptr;
  volatile int write = -1;
  long tg[3] = {0, 0, 0};
  struct sigaction old_segv, old_bus;
  stack_t old_altstack;
};
inline FaultState F;

inline void fault_handler(int sig, siginfo_t* info, void* uctx) {
  if (!F.active || !pthread_equal(pthread_self(), F.owner)) {
    // Not a fault of the kernel being emulated: give it to the previous handler.
    sigaction(sig, sig == SIGSEGV ? &F.old_segv : &F.old_bus, nullptr);
    return;
  }
  F.addr = info->si_addr;
#if defined(__linux__) && defined(__x86_64__)
  F.write = (static_cast<ucontext_t*>(uctx)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#else
  (void)uctx;
  F.write = -1;
#endif
  siglongjmp(F.jump, sig);
}

inline void setup_fiber(Fiber& f, int i, const Grid& g, long gx, long gy, long gz, uint sx,
                        uint sy, uint sz, int n, int nsimd) {
  uint lx = uint(i) % sx, ly = uint(i) / sx % sy, lz = uint(i) / (sx * sy);
  f.state = READY;
  f.simd_ops = 0;
  f.tg_offset = 0;
  f.stack = g.stacks + size_t(i) * g.stack_stride;
  f.thread_position_in_threadgroup = uint3(lx, ly, lz);
  f.threadgroup_position_in_grid = uint3(uint(gx), uint(gy), uint(gz));
  f.thread_position_in_grid =
      uint3(uint(gx * g.tgx) + lx, uint(gy * g.tgy) + ly, uint(gz * g.tgz) + lz);
  f.threadgroups_per_grid = uint3(uint(g.ngx), uint(g.ngy), uint(g.ngz));
  f.threads_per_grid = uint3(uint(g.grid[0]), uint(g.grid[1]), uint(g.grid[2]));
  f.grid_size = f.threads_per_grid;
  f.grid_origin = uint3(0u, 0u, 0u);
  f.threads_per_threadgroup = uint3(sx, sy, sz);
  f.dispatch_threads_per_threadgroup = uint3(uint(g.tgx), uint(g.tgy), uint(g.tgz));
  f.thread_index_in_threadgroup = uint(i);
  f.thread_index_in_simdgroup = uint(i) % kSimdWidth;
  f.simdgroup_index_in_threadgroup = uint(i) / kSimdWidth;
  f.simdgroups_per_threadgroup = uint(nsimd);
  f.dispatch_simdgroups_per_threadgroup = uint(g.max_simds);
  f.threads_per_simdgroup = kSimdWidth;
  f.thread_execution_width = kSimdWidth;
  f.thread_index_in_quadgroup = uint(i) % 4;
  f.quadgroup_index_in_threadgroup = uint(i) / 4;
  f.quadgroups_per_threadgroup = uint((n + 3) / 4);
  f.dispatch_quadgroups_per_threadgroup = uint((g.tg_threads + 3) / 4);
#if defined(__x86_64__)
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackSize) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 56);
  for (int k = 0; k < 6; ++k) sp[k] = nullptr;
  sp[3] = &f;  // r12 -> first argument of bonsai_fiber_main
  sp[6] = reinterpret_cast<void*>(&bonsai_fiber_trampoline);
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackSize;
  f.ctx.uc_link = nullptr;
  uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&bonsai_fiber_start_uc), 2,
              unsigned(p & 0xffffffffu), unsigned(p >> 32));
#endif
}

// Schedule: one SIMD-group at a time, run until all its lanes wait at a threadgroup_barrier
// or finish (lanes in order, switching at SIMD-group operations), then the next. A missing
// barrier between SIMD-groups then reads stale or poisoned threadgroup memory. schedule 1
// takes SIMD-groups and lanes in reverse order; schedule 2 is round-robin over all threads.
// Returns whether any fiber ran.
inline bool schedule_round(int n, int nsimd, int schedule) {
  Fiber* fibers = R.fibers;
  bool ran = false;
  for (int si = 0; si < nsimd && !R.abort; ++si) {
    int s = schedule == 1 ? nsimd - 1 - si : si;
    int lo = schedule == 2 ? 0 : s * kSimdWidth;
    int hi = schedule == 2 ? n : std::min(n, lo + kSimdWidth);
    bool progress = true;
    while (progress && !R.abort) {
      progress = false;
      for (int li = lo; li < hi; ++li) {
        int i = schedule == 1 ? hi - 1 - (li - lo) : li;
        Fiber& f = fibers[i];
        if (f.state != READY) continue;
        R.cur = &f;
#if defined(__x86_64__)
        bonsai_ctx_switch(&R.sched_sp, f.sp);
#else
        swapcontext(&R.sched_ctx, &f.ctx);
#endif
        ran = progress = true;
        if (R.abort) break;
        if (schedule == 2) progress = false;  // one pass per round
      }
    }
    if (schedule == 2) break;
  }
  return ran;
}

inline int run_threadgroup(const Grid& g, long gx, long gy, long gz, char* err, int errlen) {
  // Edge threadgroups are smaller: threads outside the grid do not exist.
  uint sx = uint(std::min(g.tgx, g.grid[0] - gx * g.tgx));
  uint sy = uint(std::min(g.tgy, g.grid[1] - gy * g.tgy));
  uint sz = uint(std::min(g.tgz, g.grid[2] - gz * g.tgz));
  int n = int(sx * sy * sz);
  int nsimd = (n + kSimdWidth - 1) / kSimdWidth;
  F.tg[0] = gx, F.tg[1] = gy, F.tg[2] = gz;
  R.nfibers = n;
  R.tg_alive = n;
  R.tg_waiting = 0;
  std::memset(R.arena, 0xff, sizeof(R.arena));  // NaN poison: uninitialised reads show
  for (int s = 0; s < nsimd; ++s) {
    R.simds[s].alive = std::min(kSimdWidth, n - s * kSimdWidth);
    R.simds[s].waiting = 0;
    R.simds[s].present[0] = R.simds[s].present[1] = 0;
  }
  for (int i = 0; i < n; ++i) setup_fiber(R.fibers[i], i, g, gx, gy, gz, sx, sy, sz, n, nsimd);
  int done = 0;
  while (done < n) {
    bool ran = schedule_round(n, nsimd, g.schedule);
    done = 0;
    for (int i = 0; i < n; ++i) done += R.fibers[i].state == DONE;
    if (R.abort) {
      std::snprintf(err, size_t(errlen), "threadgroup (%ld, %ld, %ld): %s", gx, gy, gz, R.error);
      return 1;
    }
    if (!ran && done < n) {
      int tgw = 0, sw = 0;
      for (int i = 0; i < n; ++i) {
        tgw += R.fibers[i].state == WAIT_TG;
        sw += R.fibers[i].state == WAIT_SIMD;
      }
      std::snprintf(err, size_t(errlen),
                    "deadlock in threadgroup (%ld, %ld, %ld): %d threads wait at "
                    "threadgroup_barrier, %d at a SIMD-group operation, %d finished "
                    "(divergent barrier?)",
                    gx, gy, gz, tgw, sw, done);
      return 1;
    }
  }
  return 0;
}

inline int run_grid(const Grid& g, char* err, int errlen) {
  for (long gz = 0; gz < g.ngz; ++gz)
    for (long gy = 0; gy < g.ngy; ++gy)
      for (long gx = 0; gx < g.ngx; ++gx)
        if (int rc = run_threadgroup(g, gx, gy, gz, err, errlen)) return rc;
  return 0;
}

// Fiber stacks, each above an inaccessible guard page (stacks grow down): an overflow faults.
inline char* map_stacks(long count, size_t* stride) {
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  *stride = kStackSize + page;
  size_t bytes = size_t(count) * *stride;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  char* base = static_cast<char*>(p);
  for (long i = 0; i < count; ++i) mprotect(base + size_t(i) * *stride, page, PROT_NONE);
  return base + page;  // stack i: [base + page + i * stride, + kStackSize)
}

inline int launch(const long* grid, const long* tg, int schedule, void (*entry)(Fiber*), char* err,
                  int errlen, long* fault) {
  Grid g;
  for (int a = 0; a < 3; ++a) g.grid[a] = grid[a];
  g.tgx = std::min(tg[0], grid[0]), g.tgy = std::min(tg[1], grid[1]);
  g.tgz = std::min(tg[2], grid[2]);
  g.tg_threads = g.tgx * g.tgy * g.tgz;
  g.ngx = (grid[0] + g.tgx - 1) / g.tgx, g.ngy = (grid[1] + g.tgy - 1) / g.tgy;
  g.ngz = (grid[2] + g.tgz - 1) / g.tgz;
  g.max_simds = int((g.tg_threads + kSimdWidth - 1) / kSimdWidth);
  g.schedule = schedule;
  g.stacks = map_stacks(g.tg_threads, &g.stack_stride);
  if (!g.stacks) {
    std::snprintf(err, size_t(errlen), "out of memory for %ld fiber stacks", g.tg_threads);
    return 1;
  }
  size_t page = size_t(sysconf(_SC_PAGESIZE));
  char* stack_map = g.stacks - page;
  size_t stack_bytes = size_t(g.tg_threads) * g.stack_stride;
  Fiber* fibers = new Fiber[size_t(g.tg_threads)];
  Simd* simds = new Simd[size_t(g.max_simds)];
  R.fibers = fibers;
  R.simds = simds;
  R.entry = entry;
  R.abort = false;
  R.error[0] = 0;

  static char altstack[1 << 16];
  stack_t ss{};
  ss.ss_sp = altstack;
  ss.ss_size = sizeof(altstack);
  sigaltstack(&ss, &F.old_altstack);
  struct sigaction sa{};
  sa.sa_sigaction = &fault_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &F.old_segv);
  sigaction(SIGBUS, &sa, &F.old_bus);
  F.owner = pthread_self();
  F.addr = nullptr;
  F.active = true;
  int rc;
  if (sigsetjmp(F.jump, 1) == 0) {
    rc = run_grid(g, err, errlen);
  } else {
    rc = 2;
    uintptr_t a = reinterpret_cast<uintptr_t>(F.addr);
    uintptr_t lo = reinterpret_cast<uintptr_t>(stack_map);
    // Below a fiber's stack: its guard page, or further down for a huge local array.
    bool stack_guard = a + 4 * kStackSize >= lo && a < lo + stack_bytes &&
                       (a < lo || (a - lo) % g.stack_stride < page);
    std::snprintf(err, size_t(errlen), "threadgroup (%ld, %ld, %ld): %s at address %p",
                  F.tg[0], F.tg[1], F.tg[2],
                  stack_guard ? "stack overflow in a kernel thread (recursion or huge local "
                                "arrays)"
                              : "memory fault",
                  F.addr);
    fault[0] = long(a);
    fault[1] = F.write;
  }
  F.active = false;
  sigaction(SIGSEGV, &F.old_segv, nullptr);
  sigaction(SIGBUS, &F.old_bus, nullptr);
  sigaltstack(&F.old_altstack, nullptr);
  munmap(stack_map, stack_bytes);
  delete[] fibers;
  delete[] simds;
  R.fibers = nullptr;
  R.simds = nullptr;
  return rc;
}

}  // namespace bonsai_emu
