// The PNNH backward: the coder's recomputed code and pre-activation gradient, the input gradient
// (transposed implicit GEMM plus the encoder's term at the strided positions) and the weight
// gradients (per-split partial sums over pixels, summed in a fixed order by the caller).
#include "pnnh_common.cuh"
#include "pnnh_kernels.h"
#include "pnnh_launch.h"

namespace pnnh {
namespace {

// code = relu(W_E x_s + b_E) and grad_pre = (W_D^T dp) * (pre > 0) for 64 pixels x 64 code channels.
template <typename T>
__global__ void __launch_bounds__(kThreads) pnnh_coder_backward_kernel(CoderBackwardArgs args, Vectorised vec) {
  __shared__ __align__(16) unsigned char smem[smem_bytes<T>()];
  __shared__ int64_t row_input[kBlockM];
  T* smem_a = reinterpret_cast<T*>(smem);
  T* smem_b = smem_a + 2 * kBlockM * padded_k<T>();
  const ConvShape& s = args.shape;
  const int64_t pixels = s.batch * s.out_height * s.out_width;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int b0 = blockIdx.y * kBlockN;
  const int c_b = args.code_channels;
  const T* x = static_cast<const T*>(args.x);
  const T* we = static_cast<const T*>(args.encoder_weight);
  const T* dt = static_cast<const T*>(args.decoder_t);
  const T* grad = static_cast<const T*>(args.grad);

  if (threadIdx.x < kBlockM) {
    const int64_t m = m0 + threadIdx.x;
    const int64_t per_image = static_cast<int64_t>(s.out_height) * s.out_width;
    const int64_t image = m / per_image;
    const int rest = static_cast<int>(m % per_image);
    const int ih = (rest / s.out_width) * s.stride_h, iw = (rest % s.out_width) * s.stride_w;
    row_input[threadIdx.x] = m < pixels ? ((image * s.height + ih) * s.width + iw) * s.in_channels : -1;
  }
  __syncthreads();

  Accumulators pre, grad_code;
  zero(pre);
  zero(grad_code);
  const int channel_slices = (s.in_channels + kBlockK - 1) / kBlockK;
  pipelined_product<T>(pre, smem_a, smem_b, channel_slices, [&](T* sa, T* sb, int step) {
    const int c0 = step * kBlockK;
    load_tile<T, kBlockM>(sa, s.in_channels - c0, vec.x, x, [&](int r) -> const T* {
      return row_input[r] >= 0 ? x + row_input[r] + c0 : nullptr;
    });
    load_tile<T, kBlockN>(sb, s.in_channels - c0, vec.encoder, we, [&](int r) -> const T* {
      return b0 + r < c_b ? we + static_cast<int64_t>(b0 + r) * s.in_channels + c0 : nullptr;
    });
  });
  const int out_slices = (s.out_channels + kBlockK - 1) / kBlockK;
  pipelined_product<T>(grad_code, smem_a, smem_b, out_slices, [&](T* sa, T* sb, int step) {
    const int c0 = step * kBlockK;
    load_tile<T, kBlockM>(sa, s.out_channels - c0, vec.grad, grad, [&](int r) -> const T* {
      return m0 + r < pixels ? grad + (m0 + r) * s.out_channels + c0 : nullptr;
    });
    load_tile<T, kBlockN>(sb, s.out_channels - c0, vec.decoder, dt, [&](int r) -> const T* {
      return b0 + r < c_b ? dt + static_cast<int64_t>(b0 + r) * s.out_channels + c0 : nullptr;
    });
  });

  T* code = static_cast<T*>(args.code);
  T* grad_pre = static_cast<T*>(args.grad_pre);
  for_each_fragment_value([&](int i, int j, int v, int r, int c) {
    if (m0 + r >= pixels || b0 + c >= c_b) return;
    float value = pre[i][j][v] + (args.encoder_bias != nullptr ? args.encoder_bias[b0 + c] : 0.f);
    const int64_t o = (m0 + r) * c_b + b0 + c;
    if (code != nullptr) code[o] = Num<T>::from_float(relu_keeping_nan(value));  // only a trainable coder needs it
    grad_pre[o] = Num<T>::from_float(relu_gradient(grad_code[i][j][v], value));
  });
}

// dx for 64 input pixels x 64 input channels: every tap's output pixel that reads this input
// pixel, times the tap's weights; plus W_E^T grad_pre where the pixel is a strided (coder) sample.
// The A tile of the input gradient with training BatchNorm's dz formed as it is loaded:
// dz = a * grad + b * z + c per output channel (grad is dp, already masked), zero for rows outside
// the tensor and channels past C_out. Ordinary loads and stores (the affine sits between the global
// read and the shared-memory write, where cp.async has no room); consecutive threads take
// consecutive channels of a row.
template <typename T, class RowSource>
__device__ __forceinline__ void load_batch_norm_grad_tile(T* tile, const T* grad, const T* learner,
                                                          const float* coefficients, int c0, int channels,
                                                          RowSource row_source) {
  for (int q = threadIdx.x; q < kBlockM * kBlockK; q += kThreads) {
    const int r = q / kBlockK, k = q % kBlockK;
    const T* row = row_source(r);
    float value = 0.f;
    if (row != nullptr && c0 + k < channels) {
      const int64_t at = (row - grad) + k;
      const int c = c0 + k;
      value = coefficients[c] * Num<T>::to_float(grad[at]) + coefficients[channels + c] * Num<T>::to_float(learner[at]) +
              coefficients[2 * channels + c];
    }
    tile[r * padded_k<T>() + k] = Num<T>::from_float(value);
  }
}

// The B tile of the input gradient, rows = input channels n0.., columns = the output-channel slice
// c0.., from the weight as the module holds it (channels_last, [C_out, KH, KW, C_in]: contiguous in
// C_in, so it cannot be copied row by row): ordinary loads, consecutive threads on consecutive input
// channels (coalesced), stored transposed. No per-step permuted copy of the weight.
template <typename T>
__device__ __forceinline__ void load_weight_columns(T* tile, const T* weight, int n0, int c0, int tap, int taps,
                                                    int in_channels, int out_channels) {
  for (int q = threadIdx.x; q < kBlockN * kBlockK; q += kThreads) {
    const int r = q % kBlockN, k = q / kBlockN;
    const int ci = n0 + r, co = c0 + k;
    tile[r * padded_k<T>() + k] = (ci < in_channels && co < out_channels)
                                      ? weight[(static_cast<int64_t>(co) * taps + tap) * in_channels + ci]
                                      : Num<T>::from_float(0.f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pnnh_conv_dgrad_kernel(DgradArgs args, Vectorised vec) {
  __shared__ __align__(16) unsigned char smem[smem_bytes<T>()];
  __shared__ int row_image[kBlockM], row_h[kBlockM], row_w[kBlockM];
  T* smem_a = reinterpret_cast<T*>(smem);
  T* smem_b = smem_a + 2 * kBlockM * padded_k<T>();
  const ConvShape& s = args.shape;
  const int64_t pixels = s.batch * s.height * s.width;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int n0 = blockIdx.y * kBlockN;
  const T* grad = static_cast<const T*>(args.grad);
  const T* weight = static_cast<const T*>(args.weight);
  const T* learner = static_cast<const T*>(args.learner);
  const int taps = s.kernel_h * s.kernel_w;

  decode_tile_row(p0, pixels, s.height, s.width, row_image, row_h, row_w);
  __syncthreads();

  Accumulators acc;
  zero(acc);
  const int out_slices = (s.out_channels + kBlockK - 1) / kBlockK;
  pipelined_product<T>(acc, smem_a, smem_b, taps * out_slices, [&](T* sa, T* sb, int step) {
    const int tap = step / out_slices, c0 = (step % out_slices) * kBlockK;
    const int ky = tap / s.kernel_w, kx = tap % s.kernel_w;
    auto source_row = [&](int r) -> const T* {
      const int image = row_image[r];
      if (image < 0) return nullptr;
      const int hy = row_h[r] + s.pad_h - ky * s.dilation_h, wx = row_w[r] + s.pad_w - kx * s.dilation_w;
      if (hy < 0 || wx < 0 || hy % s.stride_h != 0 || wx % s.stride_w != 0) return nullptr;
      const int oh = hy / s.stride_h, ow = wx / s.stride_w;
      if (oh >= s.out_height || ow >= s.out_width) return nullptr;
      return grad + ((static_cast<int64_t>(image) * s.out_height + oh) * s.out_width + ow) * s.out_channels + c0;
    };
    if (learner != nullptr) {
      load_batch_norm_grad_tile<T>(sa, grad, learner, args.coefficients, c0, s.out_channels, source_row);
    } else {
      load_tile<T, kBlockM>(sa, s.out_channels - c0, vec.grad, grad, source_row);
    }
    load_weight_columns<T>(sb, weight, n0, c0, tap, taps, s.in_channels, s.out_channels);
  });
  const int c_b = args.code_channels;
  if (c_b > 0) {
    const T* grad_pre = static_cast<const T*>(args.grad_pre);
    const T* wet = static_cast<const T*>(args.encoder_weight_t);
    pipelined_product<T>(acc, smem_a, smem_b, (c_b + kBlockK - 1) / kBlockK, [&](T* sa, T* sb, int step) {
      const int c0 = step * kBlockK;
      load_tile<T, kBlockM>(sa, c_b - c0, vec.pre, grad_pre, [&](int r) -> const T* {
        const int image = row_image[r], h = row_h[r], w = row_w[r];
        if (image < 0 || h % s.stride_h != 0 || w % s.stride_w != 0) return nullptr;
        const int oh = h / s.stride_h, ow = w / s.stride_w;
        if (oh >= s.out_height || ow >= s.out_width) return nullptr;
        return grad_pre + ((static_cast<int64_t>(image) * s.out_height + oh) * s.out_width + ow) * c_b + c0;
      });
      load_tile<T, kBlockN>(sb, c_b - c0, vec.encoder, wet, [&](int r) -> const T* {
        const int ci = n0 + r;
        return ci < s.in_channels ? wet + static_cast<int64_t>(ci) * c_b + c0 : nullptr;
      });
    });
  }

  T* dx = static_cast<T*>(args.grad_input);
  for_each_fragment_value([&](int i, int j, int v, int r, int c) {
    if (p0 + r < pixels && n0 + c < s.in_channels) {
      dx[(p0 + r) * s.in_channels + n0 + c] = Num<T>::from_float(acc[i][j][v]);
    }
  });
}

// Partial weight gradients: out[split][tap][cx][cg] = sum over the split's pixels of
// image_tap[pixel][cx] * grad[pixel][cg]. The reduction runs over pixels, which are not contiguous
// in either operand, so the slices are transposed into shared memory element by element.
template <typename T>
__global__ void __launch_bounds__(kThreads) pnnh_conv_wgrad_kernel(WgradArgs args) {
  constexpr int kLd = padded_k<T>();
  __shared__ __align__(16) T tile_a[kBlockM * kLd];
  __shared__ __align__(16) T tile_b[kBlockN * kLd];
  __shared__ int64_t image_offset[kBlockK], grad_offset[kBlockK];
  const ConvShape& s = args.shape;
  const int taps = s.kernel_h * s.kernel_w;
  const int split = blockIdx.z / taps, tap = blockIdx.z % taps;
  const int ky = tap / s.kernel_w, kx = tap % s.kernel_w;
  const int x0 = blockIdx.x * kBlockM, g0 = blockIdx.y * kBlockN;
  const int c_x = s.in_channels, c_g = args.grad_channels;
  const int64_t pixels = s.batch * s.out_height * s.out_width;
  const int64_t begin = static_cast<int64_t>(split) * args.pixels_per_split;
  const int64_t end = begin + args.pixels_per_split < pixels ? begin + args.pixels_per_split : pixels;
  const T* image = static_cast<const T*>(args.image);
  const T* grad = static_cast<const T*>(args.grad);
  const T* learner = static_cast<const T*>(args.learner);
  const float* coefficients = args.coefficients;
  const T zero_value = Num<T>::from_float(0.f);

  Accumulators acc;
  zero(acc);
  for (int64_t q0 = begin; q0 < end; q0 += kBlockK) {
    if (threadIdx.x < kBlockK) {
      const int64_t q = q0 + threadIdx.x;
      int64_t image_at = -1, grad_at = -1;
      if (q < end) {
        const int64_t per_image = static_cast<int64_t>(s.out_height) * s.out_width;
        const int64_t n = q / per_image;
        const int rest = static_cast<int>(q % per_image);
        const int ih = (rest / s.out_width) * s.stride_h - s.pad_h + ky * s.dilation_h;
        const int iw = (rest % s.out_width) * s.stride_w - s.pad_w + kx * s.dilation_w;
        if (ih >= 0 && ih < s.height && iw >= 0 && iw < s.width) image_at = ((n * s.height + ih) * s.width + iw) * c_x;
        grad_at = q * c_g;
      }
      image_offset[threadIdx.x] = image_at;
      grad_offset[threadIdx.x] = grad_at;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < kBlockK * kBlockM; e += kThreads) {
      const int k = e / kBlockM, c = e % kBlockM;
      const int64_t at = image_offset[k];
      tile_a[c * kLd + k] = (at >= 0 && x0 + c < c_x) ? image[at + x0 + c] : zero_value;
    }
    for (int e = threadIdx.x; e < kBlockK * kBlockN; e += kThreads) {
      const int k = e / kBlockN, c = e % kBlockN;
      const int64_t at = grad_offset[k];
      T value = zero_value;
      if (at >= 0 && g0 + c < c_g) {
        value = grad[at + g0 + c];
        if (learner != nullptr) {  // training BatchNorm: dz = a * dp + b * z + c, formed here
          const int g = g0 + c;
          value = Num<T>::from_float(coefficients[g] * Num<T>::to_float(value) +
                                     coefficients[c_g + g] * Num<T>::to_float(learner[at + g]) +
                                     coefficients[2 * c_g + g]);
        }
      }
      tile_b[c * kLd + k] = value;
    }
    __syncthreads();
    tile_product<T>(acc, tile_a, kLd, tile_b, kLd);
    __syncthreads();
  }

  if (args.final_out != nullptr) {  // one split: the gradient itself, in the weight's layout and dtype
    T* final_out = static_cast<T*>(args.final_out);
    const int64_t at_tap = ky * args.final_strides[2] + kx * args.final_strides[3];
    for_each_fragment_value([&](int i, int j, int v, int r, int c) {
      if (x0 + r < c_x && g0 + c < c_g)
        final_out[(g0 + c) * args.final_strides[0] + (x0 + r) * args.final_strides[1] + at_tap] =
            Num<T>::from_float(acc[i][j][v]);
    });
    return;
  }
  float* out = args.out + (static_cast<int64_t>(split) * taps + tap) * c_x * c_g;
  for_each_fragment_value([&](int i, int j, int v, int r, int c) {
    if (x0 + r < c_x && g0 + c < c_g) out[static_cast<int64_t>(x0 + r) * c_g + g0 + c] = acc[i][j][v];
  });
}

}  // namespace

#define PNNH_DISPATCH(dtype, KERNEL, ...)                                  \
  switch (dtype) {                                                         \
    case DType::kFloat32:                                                  \
      PNNH_LAUNCH(KERNEL<float>, grid, kThreads, stream, __VA_ARGS__);           \
      break;                                                               \
    case DType::kFloat16:                                                  \
      PNNH_LAUNCH(KERNEL<__half>, grid, kThreads, stream, __VA_ARGS__);          \
      break;                                                               \
    case DType::kBFloat16:                                                 \
      PNNH_LAUNCH(KERNEL<__nv_bfloat16>, grid, kThreads, stream, __VA_ARGS__);   \
      break;                                                               \
  }

void launch_coder_backward(const CoderBackwardArgs& args, DType dtype, cudaStream_t stream) {
  const ConvShape& s = args.shape;
  const int64_t pixels = s.batch * s.out_height * s.out_width;
  const dim3 grid(static_cast<unsigned>((pixels + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>((args.code_channels + kBlockN - 1) / kBlockN));
  check_grid(grid, "pnnh_coder_backward_kernel");
  if (pixels == 0 || args.code_channels == 0) return;
  const int width = element_bytes(dtype);
  Vectorised vec;
  vec.x = rows_vectorisable(args.x, s.in_channels, width);
  vec.encoder = rows_vectorisable(args.encoder_weight, s.in_channels, width);
  vec.grad = rows_vectorisable(args.grad, s.out_channels, width);
  vec.decoder = rows_vectorisable(args.decoder_t, s.out_channels, width);
  PNNH_DISPATCH(dtype, pnnh_coder_backward_kernel, args, vec)
  check_launch("pnnh_coder_backward_kernel", dtype);
}

void launch_dgrad(const DgradArgs& args, DType dtype, cudaStream_t stream) {
  const ConvShape& s = args.shape;
  const int64_t pixels = s.batch * s.height * s.width;
  const dim3 grid(static_cast<unsigned>((pixels + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>((s.in_channels + kBlockN - 1) / kBlockN));
  check_grid(grid, "pnnh_conv_dgrad_kernel");
  if (pixels == 0 || s.in_channels == 0) return;
  const int width = element_bytes(dtype);
  Vectorised vec;
  vec.grad = rows_vectorisable(args.grad, s.out_channels, width);
  vec.pre = rows_vectorisable(args.grad_pre, args.code_channels, width);
  vec.encoder = rows_vectorisable(args.encoder_weight_t, args.code_channels, width);
  PNNH_DISPATCH(dtype, pnnh_conv_dgrad_kernel, args, vec)
  check_launch("pnnh_conv_dgrad_kernel", dtype);
}

void launch_wgrad(const WgradArgs& args, DType dtype, cudaStream_t stream) {
  const ConvShape& s = args.shape;
  const int taps = s.kernel_h * s.kernel_w;
  const dim3 grid(static_cast<unsigned>((s.in_channels + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>((args.grad_channels + kBlockN - 1) / kBlockN),
                  static_cast<unsigned>(args.splits * taps));
  check_grid(grid, "pnnh_conv_wgrad_kernel");
  if (s.in_channels == 0 || args.grad_channels == 0 || args.splits == 0) return;
  PNNH_DISPATCH(dtype, pnnh_conv_wgrad_kernel, args)
  check_launch("pnnh_conv_wgrad_kernel", dtype);
}

int tile_rows() { return kBlockM; }

TileSizes tile_sizes() { return {kBlockM, kBlockN, kBlockK, kMaxGridYZ}; }

std::vector<std::string> kernel_names() {
  return {"pnnh_conv_forward_kernel",    "pnnh_coder_backward_kernel",  "pnnh_conv_dgrad_kernel",
          "pnnh_conv_wgrad_kernel",      "bn_finalize_forward_kernel",  "bn_running_update_kernel",
          "bn_backward_reduce_kernel",   "bn_finalize_backward_kernel",
          "wgrad_reduce_kernel"};
}

}  // namespace pnnh
