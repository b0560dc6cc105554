// Launch-side helpers shared by the kernel files: 16-byte vectorisation checks and error reporting.
#pragma once

#ifdef PNNH_EMULATE
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <stdexcept>
#include <string>

#include "pnnh_kernels.h"

namespace pnnh {

// Which operands may be copied in 16-byte cp.async chunks (row starts and strides 16-byte aligned).
struct Vectorised {
  bool x = false, weight = false, encoder = false, decoder = false, grad = false, pre = false;
};

inline int element_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

// Rows of ``row_elements`` elements starting at ``base``: every row start is 16-byte aligned.
inline bool rows_vectorisable(const void* base, int64_t row_elements, int element_size) {
  if (base == nullptr) return false;
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && (row_elements * element_size) % 16 == 0;
}

inline void check_grid(const dim3& grid, const char* kernel) {
  if (grid.y > kMaxGridYZ || grid.z > kMaxGridYZ) {
    throw std::invalid_argument(std::string(kernel) + ": grid " + std::to_string(grid.x) + " x " +
                                std::to_string(grid.y) + " x " + std::to_string(grid.z) +
                                " exceeds CUDA's 65535 limit in y or z (too many channels or taps)");
  }
}

inline void check_launch(const char* kernel, DType dtype) {
#ifdef PNNH_EMULATE
  (void)kernel;
  (void)dtype;
  return;  // the emulation ran the kernel on the host: there is no launch to check
#endif
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string(kernel) + "<" + dtype_name(dtype) + ">: " + cudaGetErrorName(error) +
                             ": " + cudaGetErrorString(error));
  }
}

}  // namespace pnnh
