// The fused PNNH forward: implicit-GEMM learner convolution, then the coder in the epilogue.
//
// One CTA owns 64 output pixels x 64 output channels. Its main loop walks the kernel taps and the
// input channels in 32-wide slices (cp.async, two stages). The coder then runs per 64-channel chunk
// of the code: encode the tile's 64 sampled input pixels (x at the output's strided positions)
// against W_E, add b_E, ReLU, round to the input dtype into shared memory, and multiply that code
// tile by the matching W_D slice into the decode accumulators. The code never goes to global
// memory. The epilogue applies scale/shift (bias, folded BatchNorm) to the learner, adds the
// decode, applies the ReLU and stores once.
#include <stdexcept>
#include <string>

#include "pnnh_common.cuh"
#include "pnnh_kernels.h"
#include "pnnh_launch.h"

namespace pnnh {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) pnnh_conv_forward_kernel(ForwardArgs args, Vectorised vec) {
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
  if (args.mode != ForwardMode::kApply) {
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

  if (args.mode == ForwardMode::kStatistics) {
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
    return;
  }

  if (args.mode == ForwardMode::kApply) {
    const T* z = static_cast<const T*>(args.z);
    for_each_fragment_value([&](int i, int j, int v, int r, int c) {
      learner[i][j][v] = valid(r, c) ? Num<T>::to_float(z[offset(r, c)]) : 0.f;
    });
  }

  Accumulators decoded;
  zero(decoded);
  const int c_b = args.code_channels;
  if (c_b > 0) {
    const T* we = static_cast<const T*>(args.encoder_weight);
    const T* wd = static_cast<const T*>(args.decoder_weight);
    constexpr int kCodeStride = kBlockN + 16 / static_cast<int>(sizeof(T));
    static_assert(kBlockM * kCodeStride <= 2 * kBlockM * padded_k<T>(), "the code tile must fit stage A");
    for (int b0 = 0; b0 < c_b; b0 += kBlockN) {
      Accumulators pre;
      zero(pre);
      pipelined_product<T>(pre, smem_a, smem_b, channel_slices, [&](T* sa, T* sb, int step) {
        const int c0 = step * kBlockK;
        load_tile<T, kBlockM>(sa, s.in_channels - c0, vec.x, x, [&](int r) { return input_row(r, 0, 0, c0); });
        load_tile<T, kBlockN>(sb, s.in_channels - c0, vec.encoder, we, [&](int r) -> const T* {
          const int b = b0 + r;
          return b < c_b ? we + static_cast<int64_t>(b) * s.in_channels + c0 : nullptr;
        });
      });
      T* code = smem_a;  // [kBlockM][kCodeStride], over the drained A stages
      for_each_fragment_value([&](int i, int j, int v, int r, int c) {
        float value = 0.f;  // code channels past C_B stay zero: they add nothing to the decode
        if (b0 + c < c_b) {
          value = pre[i][j][v] + (args.encoder_bias != nullptr ? args.encoder_bias[b0 + c] : 0.f);
          value = fmaxf(value, 0.f);
        }
        code[r * kCodeStride + c] = Num<T>::from_float(value);
      });
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
    if (args.relu) value = fmaxf(value, 0.f);
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
  switch (dtype) {
    case DType::kFloat32:
      PNNH_LAUNCH(pnnh_conv_forward_kernel<float>, grid, kThreads, stream, args, vec);
      break;
    case DType::kFloat16:
      PNNH_LAUNCH(pnnh_conv_forward_kernel<__half>, grid, kThreads, stream, args, vec);
      break;
    case DType::kBFloat16:
      PNNH_LAUNCH(pnnh_conv_forward_kernel<__nv_bfloat16>, grid, kThreads, stream, args, vec);
      break;
  }
  check_launch("pnnh_conv_forward_kernel", dtype);
}

}  // namespace pnnh
