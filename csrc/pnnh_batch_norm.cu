// Training-mode BatchNorm around the fused convolution, and the weight gradient's split reduction:
// small per-channel and elementwise kernels (no tensor cores), the CUDA twins of
// pnnh_kernels/triton/batch_norm_kernels.py. Every reduction runs in a fixed order (deterministic).
// dz itself is formed where the input- and weight-gradient kernels load their gradient tiles.
//
// With dp = dy * (y > 0), x_hat = (z - mean) * rstd, gain = gamma * rstd and N pixels,
// dz = gain * (dp - S1 / N - x_hat * S2 * rstd / N) = a * dp + b * z + c, where S1 = sum(dp),
// S2 = sum(dp * (z - mean)), a = gain, b = -gain * rstd^2 * S2 / N, c = -gain * S1 / N - b * mean.
#include "pnnh_common.cuh"
#include "pnnh_kernels.h"
#include "pnnh_launch.h"

namespace pnnh {
namespace {

constexpr int kChannelThreads = 128;  // one thread per channel in the per-channel kernels
constexpr int kElementThreads = 256;

template <typename P>
__device__ __forceinline__ float load_or(const void* pointer, int c, float otherwise) {
  return pointer == nullptr ? otherwise : Num<P>::to_float(static_cast<const P*>(pointer)[c]);
}

// mean, biased variance, rstd, scale and shift per channel from the statistics pass's per-tile means
// and sums of squared deviations (Chan's merge: M2 = sum M2_t + sum n_t (mean_t - mean)^2).
template <typename P>
__global__ void __launch_bounds__(kChannelThreads) bn_finalize_forward_kernel(BatchNormForwardArgs args) {
  const int c = blockIdx.x * kChannelThreads + threadIdx.x;
  if (c >= args.channels) return;
  const int64_t last_rows = args.pixels - static_cast<int64_t>(args.tiles - 1) * args.tile_rows;
  float total = 0.f;
  for (int t = 0; t < args.tiles; ++t) {
    const float rows = static_cast<float>(t == args.tiles - 1 ? last_rows : args.tile_rows);
    total = fmaf(rows, args.partial_mean[static_cast<int64_t>(t) * args.channels + c], total);
  }
  const float mean = total / static_cast<float>(args.pixels);
  float m2 = 0.f;
  for (int t = 0; t < args.tiles; ++t) {
    const float rows = static_cast<float>(t == args.tiles - 1 ? last_rows : args.tile_rows);
    const int64_t o = static_cast<int64_t>(t) * args.channels + c;
    const float d = args.partial_mean[o] - mean;
    m2 += args.partial_m2[o] + rows * d * d;
  }
  const float variance = m2 / static_cast<float>(args.pixels);
  const float rstd = 1.f / sqrtf(variance + args.eps);
  const float scale = rstd * load_or<P>(args.weight, c, 1.f);
  args.mean[c] = mean;
  args.variance[c] = variance;
  args.rstd[c] = rstd;
  args.scale[c] = scale;
  args.shift[c] = load_or<P>(args.bias, c, 0.f) - mean * scale;
}

// nn.BatchNorm2d's running statistics, in place: exponential averages of the mean and of the
// unbiased variance.
template <typename P>
__global__ void __launch_bounds__(kChannelThreads) bn_running_update_kernel(RunningUpdateArgs args) {
  const int c = blockIdx.x * kChannelThreads + threadIdx.x;
  if (c >= args.channels) return;
  P* running_mean = static_cast<P*>(args.running_mean);
  P* running_var = static_cast<P*>(args.running_var);
  const float m = args.momentum;
  const float mean = (1.f - m) * Num<P>::to_float(running_mean[c]) + m * args.mean[c];
  const float var = (1.f - m) * Num<P>::to_float(running_var[c]) + m * args.variance[c] * args.unbiased_factor;
  running_mean[c] = Num<P>::from_float(mean);
  running_var[c] = Num<P>::from_float(var);
}

// Per tile of ``tile_rows`` pixels and per channel: S1 = sum dp, S2 = sum dp * (z - mean); with
// ``dp_out`` also dp itself (the coder's backward reads it).
template <typename T>
__global__ void __launch_bounds__(kChannelThreads) bn_backward_reduce_kernel(BatchNormReduceArgs args) {
  const int c = blockIdx.y * kChannelThreads + threadIdx.x;
  if (c >= args.channels) return;
  const T* dy = static_cast<const T*>(args.grad);
  const T* y = static_cast<const T*>(args.output);
  const T* z = static_cast<const T*>(args.learner);
  T* dp_out = static_cast<T*>(args.dp_out);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * args.tile_rows;
  const int64_t last = first + args.tile_rows < args.pixels ? first + args.tile_rows : args.pixels;
  const float mean = args.mean[c];
  float s1 = 0.f, s2 = 0.f;
  for (int64_t m = first; m < last; ++m) {
    const int64_t o = m * args.channels + c;
    float dp = Num<T>::to_float(dy[o]);
    if (y != nullptr) dp = relu_gradient(dp, Num<T>::to_float(y[o]));
    if (dp_out != nullptr) dp_out[o] = Num<T>::from_float(dp);
    s1 += dp;
    s2 = fmaf(dp, Num<T>::to_float(z[o]) - mean, s2);
  }
  const int64_t p = static_cast<int64_t>(blockIdx.x) * args.channels + c;
  args.sum_dp[p] = s1;
  args.sum_dpz[p] = s2;
}

// The gradients of gamma and beta and the coefficients a, b, c of dz, from the per-tile sums.
template <typename P>
__global__ void __launch_bounds__(kChannelThreads) bn_finalize_backward_kernel(BatchNormBackwardArgs args) {
  const int c = blockIdx.x * kChannelThreads + threadIdx.x;
  if (c >= args.channels) return;
  float s1 = 0.f, s2 = 0.f;
  for (int t = 0; t < args.tiles; ++t) {
    const int64_t o = static_cast<int64_t>(t) * args.channels + c;
    s1 += args.sum_dp[o];
    s2 += args.sum_dpz[o];
  }
  const float rstd = args.rstd[c];
  const float gain = rstd * load_or<P>(args.weight, c, 1.f);
  if (args.grad_weight != nullptr) static_cast<P*>(args.grad_weight)[c] = Num<P>::from_float(s2 * rstd);
  if (args.grad_bias != nullptr) static_cast<P*>(args.grad_bias)[c] = Num<P>::from_float(s1);
  const float n = static_cast<float>(args.pixels);
  const float a = gain;
  const float b = -gain * rstd * rstd * s2 / n;
  const float c_term = -gain * s1 / n - b * args.mean[c];
  args.coefficients[c] = a;
  args.coefficients[args.channels + c] = b;
  args.coefficients[2 * args.channels + c] = c_term;
  if (args.grad_learner_bias != nullptr) args.grad_learner_bias[c] = 0.f * (a + b + c_term);
}

// The weight gradient from the per-split partials [splits, KH, KW, C_x, C_g]: summed in split order
// and stored once in the weight's own layout (strides of [C_g, C_x, KH, KW]) and dtype.
template <typename T>
__global__ void __launch_bounds__(kElementThreads) wgrad_reduce_kernel(WgradReduceArgs args) {
  const int64_t elements = static_cast<int64_t>(args.kernel_h) * args.kernel_w * args.c_x * args.c_g;
  T* out = static_cast<T*>(args.out);
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kElementThreads + threadIdx.x;
  if (e >= elements) return;
  {
    float sum = 0.f;
    for (int s = 0; s < args.splits; ++s) sum += args.partial[s * elements + e];
    const int64_t g = e % args.c_g;
    const int64_t x = (e / args.c_g) % args.c_x;
    const int64_t tap = e / (static_cast<int64_t>(args.c_g) * args.c_x);
    const int64_t target = g * args.out_strides[0] + x * args.out_strides[1] + (tap / args.kernel_w) * args.out_strides[2] +
                           (tap % args.kernel_w) * args.out_strides[3];
    out[target] = Num<T>::from_float(sum);
  }
}

unsigned channel_blocks(int channels) { return static_cast<unsigned>((channels + kChannelThreads - 1) / kChannelThreads); }

// One thread per element (grid.x holds 2^31 - 1 blocks: 5 * 10^11 elements).
unsigned element_blocks(int64_t elements) {
  return static_cast<unsigned>((elements + kElementThreads - 1) / kElementThreads);
}

}  // namespace

#define PNNH_DISPATCH_THREADS(dtype, KERNEL, THREADS, ...)                     \
  switch (dtype) {                                                             \
    case DType::kFloat32:                                                      \
      PNNH_LAUNCH(KERNEL<float>, grid, THREADS, stream, __VA_ARGS__);          \
      break;                                                                   \
    case DType::kFloat16:                                                      \
      PNNH_LAUNCH(KERNEL<__half>, grid, THREADS, stream, __VA_ARGS__);         \
      break;                                                                   \
    case DType::kBFloat16:                                                     \
      PNNH_LAUNCH(KERNEL<__nv_bfloat16>, grid, THREADS, stream, __VA_ARGS__);  \
      break;                                                                   \
  }

void launch_bn_finalize_forward(const BatchNormForwardArgs& args, DType param_dtype, cudaStream_t stream) {
  if (args.channels == 0) return;
  const dim3 grid(channel_blocks(args.channels));
  PNNH_DISPATCH_THREADS(param_dtype, bn_finalize_forward_kernel, kChannelThreads, args)
  check_launch("bn_finalize_forward_kernel", param_dtype);
}

void launch_bn_running_update(const RunningUpdateArgs& args, DType param_dtype, cudaStream_t stream) {
  if (args.channels == 0) return;
  const dim3 grid(channel_blocks(args.channels));
  PNNH_DISPATCH_THREADS(param_dtype, bn_running_update_kernel, kChannelThreads, args)
  check_launch("bn_running_update_kernel", param_dtype);
}

void launch_bn_backward_reduce(const BatchNormReduceArgs& args, DType dtype, cudaStream_t stream) {
  const int64_t tiles = (args.pixels + args.tile_rows - 1) / args.tile_rows;
  if (tiles == 0 || args.channels == 0) return;
  const dim3 grid(static_cast<unsigned>(tiles), channel_blocks(args.channels));
  check_grid(grid, "bn_backward_reduce_kernel");
  PNNH_DISPATCH_THREADS(dtype, bn_backward_reduce_kernel, kChannelThreads, args)
  check_launch("bn_backward_reduce_kernel", dtype);
}

void launch_bn_finalize_backward(const BatchNormBackwardArgs& args, DType param_dtype, cudaStream_t stream) {
  if (args.channels == 0) return;
  const dim3 grid(channel_blocks(args.channels));
  PNNH_DISPATCH_THREADS(param_dtype, bn_finalize_backward_kernel, kChannelThreads, args)
  check_launch("bn_finalize_backward_kernel", param_dtype);
}

void launch_wgrad_reduce(const WgradReduceArgs& args, DType dtype, cudaStream_t stream) {
  const int64_t elements = static_cast<int64_t>(args.kernel_h) * args.kernel_w * args.c_x * args.c_g;
  if (elements == 0) return;
  const dim3 grid(element_blocks(elements));
  PNNH_DISPATCH_THREADS(dtype, wgrad_reduce_kernel, kElementThreads, args)
  check_launch("wgrad_reduce_kernel", dtype);
}

}  // namespace pnnh
