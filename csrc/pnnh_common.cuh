// Shared pieces of the PNNH CUDA kernels: element types, the CTA tile, cp.async copies into shared
// memory and the warp-level tile product (mma.sync m16n8k16 for fp16/bf16, the same fragment
// ownership computed with FMAs for fp32, so that every kernel shares one epilogue layout).
#pragma once

#ifdef PNNH_EMULATE
#include "cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define PNNH_LAUNCH(kernel, grid, threads, stream, ...) kernel<<<(grid), (threads), 0, (stream)>>>(__VA_ARGS__)
#endif

#include <cstdint>

namespace pnnh {

// One CTA computes a kBlockM x kBlockN output tile with 4 warps in a 2 x 2 grid; each warp owns a
// 32 x 32 sub-tile made of 2 x 4 m16n8 accumulator fragments. The reduction runs in kBlockK slices
// staged through shared memory, two stages deep.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kBlockK = 32;
constexpr int kThreads = 128;
constexpr int kWarpTilesM = 2;  // m16 fragments per warp
constexpr int kWarpTilesN = 4;  // n8 fragments per warp
// Rows of a shared tile are padded by 16 bytes' worth of elements: cp.async destinations stay
// 16-byte aligned and the fragment loads of the 8 row groups of a warp hit distinct banks.
template <typename T>
constexpr int padded_k() {
  return kBlockK + 16 / static_cast<int>(sizeof(T));
}
template <typename T>
constexpr int vector_width() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

// Accumulators of one thread: [m16 fragment][n8 fragment][4 values].
using Accumulators = float[kWarpTilesM][kWarpTilesN][4];

// ReLU as torch.relu computes it: NaN stays NaN (fmaxf(NaN, 0.f) is 0.f, which would turn a diverged
// layer's output into zeros and hide it from a training run's NaN check).
__device__ __forceinline__ float relu_keeping_nan(float v) { return v < 0.f ? 0.f : v; }

// The gradient g through a ReLU whose output (or input) is v, as PyTorch's threshold_backward: zero
// where v <= 0, g elsewhere, so a NaN v passes g on and a NaN g where v <= 0 is dropped.
__device__ __forceinline__ float relu_gradient(float g, float v) { return v <= 0.f ? 0.f : g; }

__device__ __forceinline__ void zero(Accumulators& acc) {
#pragma unroll
  for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kWarpTilesN; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.f;
}

// Where fragment value v of accumulator (i, j) lives in the CTA tile (the mma.sync C layout:
// rows group and group + 8, columns 2 * lane_in_group and the one after it).
struct FragmentCoords {
  int row0, col0;  // of value 0 of fragment (0, 0)
  __device__ __forceinline__ FragmentCoords() {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    row0 = (warp / 2) * 32 + lane / 4;
    col0 = (warp % 2) * 32 + (lane % 4) * 2;
  }
  __device__ __forceinline__ int row(int i, int v) const { return row0 + i * 16 + (v >= 2 ? 8 : 0); }
  __device__ __forceinline__ int col(int j, int v) const { return col0 + j * 8 + (v & 1); }
};

// Calls f(i, j, v, row, col) for every accumulator value this thread owns: acc[i][j][v] sits at
// (row, col) of the CTA tile. Fully unrolled, so the accumulators stay in registers.
template <class F>
__device__ __forceinline__ void for_each_fragment_value(F f) {
  const FragmentCoords at;
#pragma unroll
  for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kWarpTilesN; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) f(i, j, v, at.row(i, v), at.col(j, v));
}

// Splits the pixel index first + threadIdx.x (for threads below kBlockM) of a [batch, height, width]
// grid into its image, row and column; image -1 past ``pixels``. The caller synchronises.
__device__ __forceinline__ void decode_tile_row(int64_t first, int64_t pixels, int height, int width, int* image,
                                                int* row, int* col) {
  if (threadIdx.x >= kBlockM) return;
  const int64_t p = first + threadIdx.x;
  const int64_t per_image = static_cast<int64_t>(height) * width;
  const int rest = static_cast<int>(p % per_image);
  image[threadIdx.x] = p < pixels ? static_cast<int>(p / per_image) : -1;
  row[threadIdx.x] = rest / width;
  col[threadIdx.x] = rest % width;
}

// ---------------------------------------------------------------------------------------------
// Global -> shared copies

#ifndef PNNH_EMULATE
__device__ __forceinline__ void cp_async_16(void* smem, const void* global, bool fill) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = fill ? 16 : 0;  // 0: the 16 bytes are zero-filled, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}
#else
inline void cp_async_16(void* smem, const void* global, bool fill) {
  if (fill) {
    std::memcpy(smem, global, 16);
  } else {
    std::memset(smem, 0, 16);
  }
}
inline void cp_async_commit() {}
template <int Pending>
inline void cp_async_wait() {}
#endif

// Copy one 16-byte chunk of a row: ``valid`` elements of ``src`` (nullptr: a row outside the
// tensor), zero beyond. ``vectorised``: the row start and stride are 16-byte aligned (checked by
// the launcher), so a full chunk goes through cp.async; ragged ends and unaligned rows are copied
// element by element.
// ``base``: any valid global address of the tensor, named by a zero-filling cp.async that reads
// nothing.
template <typename T>
__device__ __forceinline__ void copy_chunk(T* dst, const T* src, int valid, bool vectorised, const T* base) {
  constexpr int kVec = vector_width<T>();
  if (vectorised && (src == nullptr || valid >= kVec)) {
    cp_async_16(dst, src != nullptr ? src : base, src != nullptr);
    return;
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) dst[e] = (src != nullptr && e < valid) ? src[e] : Num<T>::from_float(0.f);
}

// Fill a [rows][padded_k] shared tile from per-row source pointers: row r reads
// ``row_source(r)`` (nullptr for zeros) with ``valid`` elements left in the reduction.
template <typename T, int Rows, class RowSource>
__device__ __forceinline__ void load_tile(T* tile, int valid, bool vectorised, const T* base,
                                          RowSource row_source) {
  constexpr int kVec = vector_width<T>();
  constexpr int kChunksPerRow = kBlockK / kVec;
  constexpr int kChunks = Rows * kChunksPerRow;
  for (int q = threadIdx.x; q < kChunks; q += kThreads) {
    const int r = q / kChunksPerRow, chunk = q % kChunksPerRow;
    const T* row = row_source(r);
    const int left = valid - chunk * kVec;
    copy_chunk(tile + r * padded_k<T>() + chunk * kVec, (row != nullptr && left > 0) ? row + chunk * kVec : nullptr,
               left, vectorised, base);
  }
}

// ---------------------------------------------------------------------------------------------
// Warp tile products over one kBlockK slice of shared A [M rows][K] and B [N rows][K] (both with the
// reduction dimension contiguous).

template <typename T>
struct WarpProduct;

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

#ifndef PNNH_EMULATE
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
template <>
inline void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emulation::mma_16816<__half>(c, a, b);
}
template <>
inline void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emulation::mma_16816<__nv_bfloat16>(c, a, b);
}
#endif

// acc += A[warp rows][k0 : k0 + kBlockK] * B[warp cols][k0 : k0 + kBlockK]^T on tensor cores.
template <typename T>
__device__ __forceinline__ void tile_product_mma(Accumulators& acc, const T* a, int lda, const T* b, int ldb) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, pair = (lane % 4) * 2;
  const T* a_warp = a + ((warp / 2) * 32 + group) * lda + pair;
  const T* b_warp = b + ((warp % 2) * 32 + group) * ldb + pair;
#pragma unroll
  for (int k = 0; k < kBlockK; k += 16) {
    uint32_t af[kWarpTilesM][4];
    uint32_t bf[kWarpTilesN][2];
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i) {
      const T* p = a_warp + i * 16 * lda + k;
      af[i][0] = *reinterpret_cast<const uint32_t*>(p);
      af[i][1] = *reinterpret_cast<const uint32_t*>(p + 8 * lda);
      af[i][2] = *reinterpret_cast<const uint32_t*>(p + 8);
      af[i][3] = *reinterpret_cast<const uint32_t*>(p + 8 * lda + 8);
    }
#pragma unroll
    for (int j = 0; j < kWarpTilesN; ++j) {
      const T* p = b_warp + j * 8 * ldb + k;
      bf[j][0] = *reinterpret_cast<const uint32_t*>(p);
      bf[j][1] = *reinterpret_cast<const uint32_t*>(p + 8);
    }
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kWarpTilesN; ++j) mma_16816<T>(acc[i][j], af[i], bf[j]);
  }
}

// The fp32 path: the same fragment ownership, products formed with FMAs (full fp32, no TF32).
__device__ __forceinline__ void tile_product_fma(Accumulators& acc, const float* a, int lda, const float* b,
                                                 int ldb) {
  const FragmentCoords at;
#pragma unroll 4
  for (int k = 0; k < kBlockK; ++k) {
    float av[kWarpTilesM][2], bv[kWarpTilesN][2];
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i) {
      av[i][0] = a[at.row(i, 0) * lda + k];
      av[i][1] = a[at.row(i, 2) * lda + k];
    }
#pragma unroll
    for (int j = 0; j < kWarpTilesN; ++j) {
      bv[j][0] = b[at.col(j, 0) * ldb + k];
      bv[j][1] = b[at.col(j, 1) * ldb + k];
    }
#pragma unroll
    for (int i = 0; i < kWarpTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kWarpTilesN; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[i][j][v] = fmaf(av[i][v >> 1], bv[j][v & 1], acc[i][j][v]);
  }
}

template <typename T>
__device__ __forceinline__ void tile_product(Accumulators& acc, const T* a, int lda, const T* b, int ldb) {
  tile_product_mma<T>(acc, a, lda, b, ldb);
}
template <>
__device__ __forceinline__ void tile_product<float>(Accumulators& acc, const float* a, int lda, const float* b,
                                                    int ldb) {
  tile_product_fma(acc, a, lda, b, ldb);
}

// A reduction of ``steps`` kBlockK slices, two shared-memory stages deep: the copies of slice s + 1
// are in flight (cp.async) while slice s is multiplied. ``load(stage_a, stage_b, s)`` issues the
// copies of slice s; A [kBlockM][padded_k] and B [kBlockN][padded_k] per stage.
template <typename T, class Load>
__device__ __forceinline__ void pipelined_product(Accumulators& acc, T* smem_a, T* smem_b, int steps, Load load) {
  constexpr int kStageA = kBlockM * padded_k<T>();
  constexpr int kStageB = kBlockN * padded_k<T>();
  if (steps <= 0) return;
  load(smem_a, smem_b, 0);
  cp_async_commit();
  for (int s = 0; s < steps; ++s) {
    const int stage = s & 1;
    if (s + 1 < steps) load(smem_a + (stage ^ 1) * kStageA, smem_b + (stage ^ 1) * kStageB, s + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    tile_product<T>(acc, smem_a + stage * kStageA, padded_k<T>(), smem_b + stage * kStageB, padded_k<T>());
    __syncthreads();
  }
  cp_async_wait<0>();
}

// The same with A resident in shared memory (a tile the CTA computed, such as the code): only B's
// slices are copied; slice s multiplies columns [s * kBlockK, (s + 1) * kBlockK) of ``a``.
template <typename T, class LoadB>
__device__ __forceinline__ void pipelined_product_resident_a(Accumulators& acc, const T* a, int lda, T* smem_b,
                                                             int steps, LoadB load_b) {
  constexpr int kStageB = kBlockN * padded_k<T>();
  if (steps <= 0) return;
  load_b(smem_b, 0);
  cp_async_commit();
  for (int s = 0; s < steps; ++s) {
    const int stage = s & 1;
    if (s + 1 < steps) load_b(smem_b + (stage ^ 1) * kStageB, s + 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    tile_product<T>(acc, a + s * kBlockK, lda, smem_b + stage * kStageB, padded_k<T>());
    __syncthreads();
  }
  cp_async_wait<0>();
}

// Shared memory of one CTA: two stages of A and B; the epilogues reuse it (code tile, statistics).
template <typename T>
constexpr int operand_smem_bytes() {
  return 2 * (kBlockM + kBlockN) * padded_k<T>() * static_cast<int>(sizeof(T));
}
constexpr int kStatsStride = kBlockN + 1;  // float [kBlockM][kStatsStride] for column statistics
template <typename T>
constexpr int smem_bytes() {
  return operand_smem_bytes<T>() > kBlockM * kStatsStride * 4 ? operand_smem_bytes<T>()
                                                               : kBlockM * kStatsStride * 4;
}

}  // namespace pnnh
