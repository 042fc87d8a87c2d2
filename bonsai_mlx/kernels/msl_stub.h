// Metal Shading Language front-end stub for the clang syntax check (msl_check.py, see
// docs/kernels.md). It stands in for `#include <metal_stdlib>` and MLX's utils header, which
// mx.fast.metal_kernel puts before every kernel. Unlike the emulator's shim, nothing here runs:
// it declares, with the signatures of Apple's MSL specification, what our kernels may call,
// and makes Metal's address spaces real clang address spaces, so that passing a `constant`
// or `threadgroup` pointer where a `device` one is expected fails to compile, as it does
// with Apple's compiler. `thread` is the default address space (locals live there).
// Compile with: clang++ -x c++ -std=c++17 --target=aarch64-linux-gnu -march=armv8.6-a+bf16
//               -fsyntax-only -Wno-unknown-attributes
#pragma once

#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#define thread
#define METAL_FUNC inline __attribute__((always_inline))

// ---- scalar types ------------------------------------------------------------------------
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;  // 64-bit, as in MSL
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef ulong size_t;
typedef _Float16 half;
typedef half float16_t;
typedef __bf16 bfloat;  // MSL 3.1's bfloat; clang 14 allows conversions, not arithmetic
typedef bfloat bfloat16_t;  // as MLX's utils header defines it on Metal >= 3.1

// ---- vector types ------------------------------------------------------------------------
namespace metal {
template <typename T, int N>
using vec = T __attribute__((ext_vector_type(N)));
}  // namespace metal
#define BONSAI_MSL_VECTORS(T, name)                       \
  typedef T name##2 __attribute__((ext_vector_type(2))); \
  typedef T name##3 __attribute__((ext_vector_type(3))); \
  typedef T name##4 __attribute__((ext_vector_type(4)));
BONSAI_MSL_VECTORS(char, char)
BONSAI_MSL_VECTORS(uchar, uchar)
BONSAI_MSL_VECTORS(short, short)
BONSAI_MSL_VECTORS(ushort, ushort)
BONSAI_MSL_VECTORS(int, int)
BONSAI_MSL_VECTORS(uint, uint)
BONSAI_MSL_VECTORS(long, long)
BONSAI_MSL_VECTORS(ulong, ulong)
BONSAI_MSL_VECTORS(half, half)
BONSAI_MSL_VECTORS(bfloat, bfloat)
BONSAI_MSL_VECTORS(float, float)
#undef BONSAI_MSL_VECTORS

namespace metal {

// ---- synchronisation ---------------------------------------------------------------------
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
mem_flags operator|(mem_flags, mem_flags);
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

// ---- SIMD-group functions ----------------------------------------------------------------
template <typename T> T simd_sum(T data);
template <typename T> T simd_product(T data);
template <typename T> T simd_max(T data);
template <typename T> T simd_min(T data);
template <typename T> T simd_and(T data);
template <typename T> T simd_or(T data);
template <typename T> T simd_xor(T data);
template <typename T> T simd_prefix_exclusive_sum(T data);
template <typename T> T simd_prefix_inclusive_sum(T data);
template <typename T> T simd_broadcast(T data, ushort broadcast_lane_id);
template <typename T> T simd_broadcast_first(T data);
template <typename T> T simd_shuffle(T data, ushort simd_lane_id);
template <typename T> T simd_shuffle_down(T data, ushort delta);
template <typename T> T simd_shuffle_up(T data, ushort delta);
template <typename T> T simd_shuffle_xor(T data, ushort mask);
bool simd_all(bool expr);
bool simd_any(bool expr);
bool simd_is_first();

// ---- simdgroup_matrix --------------------------------------------------------------------
template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  simdgroup_matrix() thread = default;
  explicit simdgroup_matrix(T diagonal_value) thread;
  thread vec<T, 2>& thread_elements() thread;
};
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;

template <typename T, int Cols, int Rows>
simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T value);
// The source's element type is the matrix's: a simdgroup_matrix<float> does not load from a
// `threadgroup half*` (nor from `constant` or `thread` memory).
template <typename T, int Cols, int Rows>
void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const device T* src,
                    ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                    bool transpose_matrix = false);
template <typename T, int Cols, int Rows>
void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const threadgroup T* src,
                    ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                    bool transpose_matrix = false);
template <typename T, int Cols, int Rows>
void simdgroup_store(thread simdgroup_matrix<T, Cols, Rows> a, device T* dst,
                     ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                     bool transpose_matrix = false);
template <typename T, int Cols, int Rows>
void simdgroup_store(thread simdgroup_matrix<T, Cols, Rows> a, threadgroup T* dst,
                     ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                     bool transpose_matrix = false);
// Declared with independent element types (MLX's steel kernels mix them); shapes must chain.
template <typename TD, typename TA, typename TB, typename TC, int Cols, int Rows, int K>
void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, Cols, Rows>& d,
                                   thread const simdgroup_matrix<TA, K, Rows>& a,
                                   thread const simdgroup_matrix<TB, Cols, K>& b,
                                   thread const simdgroup_matrix<TC, Cols, Rows>& c);
template <typename TD, typename TA, typename TB, int Cols, int Rows, int K>
void simdgroup_multiply(thread simdgroup_matrix<TD, Cols, Rows>& d,
                        thread const simdgroup_matrix<TA, K, Rows>& a,
                        thread const simdgroup_matrix<TB, Cols, K>& b);

// ---- math (scalars and vectors of float / half) ------------------------------------------
#define BONSAI_MSL_UNARY(f) template <typename T> T f(T x);
BONSAI_MSL_UNARY(abs)
BONSAI_MSL_UNARY(fabs)
BONSAI_MSL_UNARY(exp)
BONSAI_MSL_UNARY(exp2)
BONSAI_MSL_UNARY(log)
BONSAI_MSL_UNARY(log2)
BONSAI_MSL_UNARY(sqrt)
BONSAI_MSL_UNARY(rsqrt)
BONSAI_MSL_UNARY(sin)
BONSAI_MSL_UNARY(cos)
BONSAI_MSL_UNARY(tanh)
BONSAI_MSL_UNARY(floor)
BONSAI_MSL_UNARY(ceil)
BONSAI_MSL_UNARY(round)
BONSAI_MSL_UNARY(rint)
BONSAI_MSL_UNARY(trunc)
#undef BONSAI_MSL_UNARY
template <typename T> T min(T x, T y);
template <typename T> T max(T x, T y);
template <typename T> T fmin(T x, T y);
template <typename T> T fmax(T x, T y);
template <typename T> T pow(T x, T y);
template <typename T> T clamp(T x, T minval, T maxval);
template <typename T> T fma(T a, T b, T c);
template <typename T> T mix(T x, T y, T a);
template <typename T> T select(T a, T b, bool c);
template <typename T> bool isnan(T x);
template <typename T> bool isinf(T x);
template <typename T, typename U> T as_type(U x);
template <typename T>
struct numeric_limits {
  static constexpr T min();
  static constexpr T max();
  static constexpr T lowest();
  static constexpr T epsilon();
  static constexpr T infinity();
};
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

// ---- atomics (atomic_outputs) ------------------------------------------------------------
enum memory_order { memory_order_relaxed };
template <typename T>
struct atomic {
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
template <typename T>
T atomic_fetch_add_explicit(volatile device atomic<T>* object, T operand, memory_order order);
template <typename T>
T atomic_fetch_add_explicit(volatile threadgroup atomic<T>* object, T operand,
                            memory_order order);
template <typename T>
void atomic_store_explicit(volatile device atomic<T>* object, T desired, memory_order order);
template <typename T>
T atomic_load_explicit(const volatile device atomic<T>* object, memory_order order);

}  // namespace metal

using namespace metal;
