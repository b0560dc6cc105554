// A CPU emulation of the few CUDA features the PNNH kernels use, so that the kernels' own source can
// be compiled by a host C++ compiler (-DPNNH_EMULATE) and checked against the float64 reference on a
// machine without a GPU. It runs the blocks of a launch one after another, each with one host thread
// per CUDA thread:
//   - __shared__ variables are function-local statics (one block runs at a time);
//   - __syncthreads() is a barrier of the block's threads;
//   - cp.async copies synchronously (so it cannot show a missing wait, only wrong addresses);
//   - mma.sync m16n8k16 gathers the 32 lanes' fragments through a per-warp exchange and computes each
//     lane's outputs from the fragment layout tables of the PTX ISA, independently of how the kernels
//     load their fragments: a kernel that loads the wrong elements produces wrong results here too.
// It is slow (thousands of host threads per launch) and meant for tens of pixels and channels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // the runtime's types and host API (linked statically), not its kernels

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

// What nvcc gives meaning to, as plain C++: every function runs on the host.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace pnnh::emulation {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Index thread_index;
inline thread_local Index block_index;

struct Block {
  std::barrier<>* block_barrier = nullptr;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  // Per warp, per lane: the fragments of the mma being emulated.
  std::vector<uint32_t> a, b;
};
inline Block* current_block = nullptr;

inline void sync_block() { current_block->block_barrier->arrive_and_wait(); }
inline void sync_warp() { current_block->warp_barriers[thread_index.x / 32]->arrive_and_wait(); }

// Run ``kernel()`` for every block of ``grid`` with ``threads`` host threads each.
inline void launch(dim3 grid, unsigned threads, const std::function<void()>& kernel) {
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> block_barrier(threads);
        Block block;
        block.block_barrier = &block_barrier;
        for (unsigned w = 0; w < (threads + 31) / 32; ++w) block.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
        block.a.resize(threads * 4);
        block.b.resize(threads * 2);
        current_block = &block;
        std::vector<std::thread> workers;
        for (unsigned t = 0; t < threads; ++t) {
          workers.emplace_back([&, t] {
            thread_index = {t, 0, 0};
            block_index = {bx, by, bz};
            kernel();
          });
        }
        for (auto& worker : workers) worker.join();
        current_block = nullptr;
      }
}

template <typename T>
float element(uint32_t packed, int half_index) {
  const uint16_t bits = static_cast<uint16_t>(packed >> (16 * half_index));
  if constexpr (std::is_same_v<T, __half>) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  } else {
    const uint32_t widened = static_cast<uint32_t>(bits) << 16;  // bf16 is fp32's top half
    float value;
    std::memcpy(&value, &widened, sizeof(value));
    return value;
  }
}

// d = a * b + c for one m16n8k16 fragment set, the PTX ISA's layouts: lane = 4 * group + t;
// A (16 x 16, row major): register r of lane holds rows group + 8 * (r % 2), columns 2t + 8 * (r / 2)
// and the next; B (16 x 8, column major): register r holds rows (k) 2t + 8r and the next, column group;
// C/D (16 x 8): values 0, 1 at row group, columns 2t, 2t + 1; values 2, 3 at row group + 8.
template <typename T>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Block& block = *current_block;
  const unsigned lane = thread_index.x % 32, warp_base = thread_index.x - lane;
  for (int r = 0; r < 4; ++r) block.a[thread_index.x * 4 + r] = a[r];
  for (int r = 0; r < 2; ++r) block.b[thread_index.x * 2 + r] = b[r];
  sync_warp();
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned group = l / 4, t = l % 4;
    for (int r = 0; r < 4; ++r) {
      const uint32_t packed = block.a[(warp_base + l) * 4 + r];
      const unsigned row = group + 8 * (r % 2), col = 2 * t + 8 * (r / 2);
      A[row][col] = element<T>(packed, 0);
      A[row][col + 1] = element<T>(packed, 1);
    }
    for (int r = 0; r < 2; ++r) {
      const uint32_t packed = block.b[(warp_base + l) * 2 + r];
      const unsigned k = 2 * t + 8 * r;
      B[k][group] = element<T>(packed, 0);
      B[k + 1][group] = element<T>(packed, 1);
    }
  }
  sync_warp();  // every lane has read the exchange before any lane overwrites it
  const unsigned group = lane / 4, t = lane % 4;
  for (int v = 0; v < 4; ++v) {
    const unsigned row = group + (v >= 2 ? 8 : 0), col = 2 * t + (v & 1);
    float sum = c[v];
    for (int k = 0; k < 16; ++k) sum = std::fma(A[row][k], B[k][col], sum);
    c[v] = sum;
  }
}

}  // namespace pnnh::emulation

#define threadIdx (::pnnh::emulation::thread_index)
#define blockIdx (::pnnh::emulation::block_index)
#define __syncthreads() ::pnnh::emulation::sync_block()
#define PNNH_LAUNCH(kernel, grid, threads, stream, ...) \
  ((void)(stream), ::pnnh::emulation::launch((grid), (threads), [&] { kernel(__VA_ARGS__); }))
