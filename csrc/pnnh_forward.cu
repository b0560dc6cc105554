// The fused PNNH forward: implicit-GEMM learner convolution, then the coder in the epilogue.
//
// One CTA owns 64 output pixels x 64 output channels. Its main loop walks the kernel taps and the
// input channels in 32-wide slices (cp.async, two stages). The coder then runs per 64-channel chunk
// of the code: encode the tile's 64 sampled input pixels (x at the output's strided positions)
// against W_E, add b_E, ReLU, round to the input dtype into shared memory, and multiply that code
// tile by the matching W_D slice into the decode accumulators. The code goes to global memory only
// for training BatchNorm: the statistics pass stores it once per pixel tile, the apply pass reads it. The epilogue applies scale/shift (bias, folded BatchNorm) to the learner, adds the
// decode, applies the ReLU and stores once.
#include <stdexcept>
#include <string>

#include "pnnh_common.cuh"
#include "pnnh_kernels.h"
#include "pnnh_launch.h"

namespace pnnh {
namespace {

// One instantiation per mode (a compile-time parameter), so that each gets its own register
// allocation: with the statistics pass's code store in the same function, the 16-bit sm_90a build
// went over 128 registers (16 bytes spilled). Left to itself ptxas then gave the statistics and
// apply instantiations 72-96 registers and small spills: the bounds ask for at least one CTA per SM
// there (no spills, 96-122 registers), and keep the fused 16-bit kernel at 4 CTAs per SM (<= 128
// registers, as before).
template <typename T, ForwardMode kMode>
__global__ void __launch_bounds__(kThreads, kMode == ForwardMode::kFused && sizeof(T) == 2 ? 4 : 1)
    pnnh_conv_forward_kernel(ForwardArgs args, Vectorised vec) {
  __shared__ __align__(16) unsigned char smem[smem_bytes<T>()];
  __shared__ int row_image[kBlockM], row_oh[kBlockM], row_ow[kBlockM];
  T* smem_a = reinterpret_cast<T*>(smem);
  T* smem_b = smem_a + 2 * kBlockM * padded_k<T>();
  const ConvShape& s = args.shape;
  const int64_t pixels = s.batch * s.out_height * s.out_width;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int n0 = blockIdx.y * kBlockN;
  const T* x = static_cast<const T*>(args.x);

  decode_tile_row(m0, pixels, s.out_height, s.out_width, row_image, row_oh, row_ow);
  __syncthreads();
  // The input pixel a tile row reads at offset (dy, dx) from its strided position; nullptr outside.
  auto input_row = [&](int r, int dy, int dx, int c0) -> const T* {
    const int image = row_image[r];
    if (image < 0) return nullptr;
    const int ih = row_oh[r] * s.stride_h + dy, iw = row_ow[r] * s.stride_w + dx;
    if (ih < 0 || ih >= s.height || iw < 0 || iw >= s.width) return nullptr;
    return x + ((static_cast<int64_t>(image) * s.height + ih) * s.width + iw) * s.in_channels + c0;
  };

  Accumulators learner;
  zero(learner);
  const int channel_slices = (s.in_channels + kBlockK - 1) / kBlockK;
  if constexpr (kMode != ForwardMode::kApply) {
    const T* w = static_cast<const T*>(args.weight);
    const int taps = s.kernel_h * s.kernel_w;
    pipelined_product<T>(learner, smem_a, smem_b, taps * channel_slices, [&](T* sa, T* sb, int step) {
      const int tap = step / channel_slices, c0 = (step % channel_slices) * kBlockK;
      const int dy = (tap / s.kernel_w) * s.dilation_h - s.pad_h;
      const int dx = (tap % s.kernel_w) * s.dilation_w - s.pad_w;
      load_tile<T, kBlockM>(sa, s.in_channels - c0, vec.x, x, [&](int r) { return input_row(r, dy, dx, c0); });
      load_tile<T, kBlockN>(sb, s.in_channels - c0, vec.weight, w, [&](int r) -> const T* {
        const int co = n0 + r;
        return co < s.out_channels ? w + (static_cast<int64_t>(co) * taps + tap) * s.in_channels + c0 : nullptr;
      });
    });
  }
  auto valid = [&](int r, int c) { return m0 + r < pixels && n0 + c < s.out_channels; };
  auto offset = [&](int r, int c) { return (m0 + r) * s.out_channels + n0 + c; };
  // acc = x_s W_E^T for code channels b0 .. b0 + kBlockN (the statistics pass, which stores the
  // code, and the fused pass, which decodes it at once, both compute it).
  auto encoder_product = [&](Accumulators& acc, int b0) {
    const T* we = static_cast<const T*>(args.encoder_weight);
    const int c_b = args.code_channels;
    zero(acc);
    pipelined_product<T>(acc, smem_a, smem_b, channel_slices, [&](T* sa, T* sb, int step) {
      const int c0 = step * kBlockK;
      load_tile<T, kBlockM>(sa, s.in_channels - c0, vec.x, x, [&](int r) { return input_row(r, 0, 0, c0); });
      load_tile<T, kBlockN>(sb, s.in_channels - c0, vec.encoder, we, [&](int r) -> const T* {
        const int b = b0 + r;
        return b < c_b ? we + static_cast<int64_t>(b) * s.in_channels + c0 : nullptr;
      });
    });
  };
  // The code of channel b < C_B from its encoder product: relu(pre + b_E).
  auto code_value = [&](float pre, int b) {
    return relu_keeping_nan(pre + (args.encoder_bias != nullptr ? args.encoder_bias[b] : 0.f));
  };

  if constexpr (kMode == ForwardMode::kStatistics) {
    T* z = static_cast<T*>(args.z);
    float* stats = reinterpret_cast<float*>(smem);  // the operand stages are drained
    for_each_fragment_value([&](int i, int j, int v, int r, int c) {
      float value = learner[i][j][v];
      if (args.shift != nullptr && n0 + c < s.out_channels) value += args.shift[n0 + c];
      if (valid(r, c)) z[offset(r, c)] = Num<T>::from_float(value);
      stats[r * kStatsStride + c] = value;
    });
    __syncthreads();
    // Per channel of the tile: mean and sum of squared deviations over the tile's valid pixels,
    // two passes over shared memory (merged across tiles with Chan's formula on the Python side).
    const int rows = static_cast<int>(pixels - m0 < kBlockM ? pixels - m0 : kBlockM);
    const int c = threadIdx.x;
    if (c < kBlockN && n0 + c < s.out_channels) {
      float sum = 0.f;
      for (int r = 0; r < rows; ++r) sum += stats[r * kStatsStride + c];
      const float mean = sum / rows;
      float m2 = 0.f;
      for (int r = 0; r < rows; ++r) {
        const float d = stats[r * kStatsStride + c] - mean;
        m2 = fmaf(d, d, m2);
      }
      args.partial_mean[static_cast<int64_t>(blockIdx.x) * s.out_channels + n0 + c] = mean;
      args.partial_m2[static_cast<int64_t>(blockIdx.x) * s.out_channels + n0 + c] = m2;
    }
    // Training BatchNorm with a coder: the first column of CTAs also stores the tile's code, once,
    // for the apply pass (which would otherwise recompute it in every one of its C_out / 64 columns).
    const int c_b = args.code_channels;
    if (args.code != nullptr && c_b > 0 && blockIdx.y == 0) {
      T* code = static_cast<T*>(args.code);
      __syncthreads();  // the statistics are done with the shared memory
#pragma unroll 1
      for (int b0 = 0; b0 < c_b; b0 += kBlockN) {
        // The learner's accumulators are spent: they hold the encoder's product.
        encoder_product(learner, b0);
        for_each_fragment_value([&](int i, int j, int v, int r, int c) {
          if (m0 + r >= pixels || b0 + c >= c_b) return;
          code[(m0 + r) * c_b + b0 + c] = Num<T>::from_float(code_value(learner[i][j][v], b0 + c));
        });
      }
    }
    return;
  }

  if constexpr (kMode == ForwardMode::kApply) {
    const T* z = static_cast<const T*>(args.z);
    for_each_fragment_value([&](int i, int j, int v, int r, int c) {
      learner[i][j][v] = valid(r, c) ? Num<T>::to_float(z[offset(r, c)]) : 0.f;
    });
  }

  Accumulators decoded;
  zero(decoded);
  const int c_b = args.code_channels;
  if (c_b > 0) {
    const T* wd = static_cast<const T*>(args.decoder_weight);
    constexpr int kCodeStride = kBlockN + 16 / static_cast<int>(sizeof(T));
    static_assert(kBlockM * kCodeStride <= 2 * kBlockM * padded_k<T>(), "the code tile must fit stage A");
    // The apply pass reads the code the statistics pass stored (the launcher always stores one
    // for it: one code per pixel tile instead of one per column of CTAs).
    for (int b0 = 0; b0 < c_b; b0 += kBlockN) {
      T* code = smem_a;  // [kBlockM][kCodeStride], over the drained A stages
      if constexpr (kMode == ForwardMode::kApply) {
        const T* stored = static_cast<const T*>(args.code);
        for (int q = threadIdx.x; q < kBlockM * kBlockN; q += kThreads) {
          const int r = q / kBlockN, c = q % kBlockN;
          code[r * kCodeStride + c] =
              (m0 + r < pixels && b0 + c < c_b) ? stored[(m0 + r) * c_b + b0 + c] : Num<T>::from_float(0.f);
        }
      } else {
        Accumulators pre;
        encoder_product(pre, b0);
        for_each_fragment_value([&](int i, int j, int v, int r, int c) {
          // Code channels past C_B stay zero: they add nothing to the decode.
          const float value = b0 + c < c_b ? code_value(pre[i][j][v], b0 + c) : 0.f;
          code[r * kCodeStride + c] = Num<T>::from_float(value);
        });
      }
      __syncthreads();
      pipelined_product_resident_a<T>(decoded, code, kCodeStride, smem_b, kBlockN / kBlockK, [&](T* sb, int step) {
        const int k0 = b0 + step * kBlockK;
        load_tile<T, kBlockN>(sb, c_b - k0, vec.decoder, wd, [&](int r) -> const T* {
          const int co = n0 + r;
          return co < s.out_channels ? wd + static_cast<int64_t>(co) * c_b + k0 : nullptr;
        });
      });
    }
  }

  T* y = static_cast<T*>(args.y);
  for_each_fragment_value([&](int i, int j, int v, int r, int c) {
    if (!valid(r, c)) return;
    float value = learner[i][j][v];
    if (args.scale != nullptr) value *= args.scale[n0 + c];
    if (args.shift != nullptr) value += args.shift[n0 + c];
    value += decoded[i][j][v];
    if (args.relu) value = relu_keeping_nan(value);
    y[offset(r, c)] = Num<T>::from_float(value);
  });
}

}  // namespace

void launch_forward(const ForwardArgs& args, DType dtype, cudaStream_t stream) {
  const ConvShape& s = args.shape;
  const int64_t pixels = s.batch * s.out_height * s.out_width;
  const dim3 grid(static_cast<unsigned>((pixels + kBlockM - 1) / kBlockM),
                  static_cast<unsigned>((s.out_channels + kBlockN - 1) / kBlockN));
  const int width = element_bytes(dtype);
  Vectorised vec;
  vec.x = rows_vectorisable(args.x, s.in_channels, width);
  vec.weight = rows_vectorisable(args.weight, s.in_channels, width);
  vec.encoder = rows_vectorisable(args.encoder_weight, s.in_channels, width);
  vec.decoder = rows_vectorisable(args.decoder_weight, args.code_channels, width);
  check_grid(grid, "pnnh_conv_forward_kernel");
  if (pixels == 0 || s.out_channels == 0) return;
  auto launch = [&](auto kernel) { PNNH_LAUNCH(kernel, grid, kThreads, stream, args, vec); };
  auto by_dtype = [&](auto float_kernel, auto half_kernel, auto bfloat_kernel) {
    switch (dtype) {
      case DType::kFloat32:
        launch(float_kernel);
        break;
      case DType::kFloat16:
        launch(half_kernel);
        break;
      case DType::kBFloat16:
        launch(bfloat_kernel);
        break;
    }
  };
  switch (args.mode) {
    case ForwardMode::kFused:
      by_dtype(pnnh_conv_forward_kernel<float, ForwardMode::kFused>,
               pnnh_conv_forward_kernel<__half, ForwardMode::kFused>,
               pnnh_conv_forward_kernel<__nv_bfloat16, ForwardMode::kFused>);
      break;
    case ForwardMode::kStatistics:
      by_dtype(pnnh_conv_forward_kernel<float, ForwardMode::kStatistics>,
               pnnh_conv_forward_kernel<__half, ForwardMode::kStatistics>,
               pnnh_conv_forward_kernel<__nv_bfloat16, ForwardMode::kStatistics>);
      break;
    case ForwardMode::kApply:
      by_dtype(pnnh_conv_forward_kernel<float, ForwardMode::kApply>,
               pnnh_conv_forward_kernel<__half, ForwardMode::kApply>,
               pnnh_conv_forward_kernel<__nv_bfloat16, ForwardMode::kApply>);
      break;
  }
  check_launch("pnnh_conv_forward_kernel", dtype);
}

}  // namespace pnnh
