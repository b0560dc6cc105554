// Host-side interface of the PNNH CUDA kernels. Tensors arrive as raw device pointers (the Python
// side allocates them with torch), NHWC for images; shapes, strides and the stream come as plain
// values, so the extension does not link libtorch and works beside any torch version.
#pragma once

#ifdef PNNH_EMULATE
#include "cuda_emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <string>
#include <vector>

namespace pnnh {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct ConvShape {
  int64_t batch;
  int height, width, in_channels;
  int out_height, out_width, out_channels;
  int kernel_h, kernel_w;
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

enum class ForwardMode : int {
  kFused = 0,       // y = act(conv(x) * scale + shift + decode(code))
  kStatistics = 1,  // z = conv(x) + shift, plus per-tile mean and M2 of z per channel
  kApply = 2,       // y = act(z * scale + shift + decode(code)), z read instead of convolving
};

struct ForwardArgs {
  ConvShape shape;
  int code_channels;  // C_B; 0 without a coder
  ForwardMode mode;
  bool relu;
  const void* x;               // [N, H, W, C_in]
  const void* weight;          // [C_out, KH, KW, C_in]
  const float* scale;          // [C_out] or nullptr
  const float* shift;          // [C_out] or nullptr
  const void* encoder_weight;  // [C_B, C_in] or nullptr
  const float* encoder_bias;   // [C_B] or nullptr
  const void* decoder_weight;  // [C_out, C_B] or nullptr
  void* y;                     // [N, OH, OW, C_out] (fused, apply)
  void* z;                     // [N, OH, OW, C_out] (written by statistics, read by apply)
  float* partial_mean;         // [tiles, C_out] (statistics)
  float* partial_m2;           // [tiles, C_out] (statistics)
  void* code;                  // [N, OH, OW, C_B] relu(W_E x_s + b_E): written by statistics (with an
                               // encoder), read by apply instead of the encoder; or nullptr
};

struct CoderBackwardArgs {
  ConvShape shape;
  int code_channels;
  const void* x;               // [N, H, W, C_in]
  const void* encoder_weight;  // [C_B, C_in]
  const float* encoder_bias;   // [C_B] or nullptr
  const void* decoder_t;       // W_D^T [C_B, C_out]
  const void* grad;            // dp = dy masked by the output ReLU, [N, OH, OW, C_out]
  void* code;                  // out: relu(W_E x_s + b_E), [N, OH, OW, C_B], or nullptr (not written)
  void* grad_pre;              // out: (W_D^T dp) * (pre > 0), [N, OH, OW, C_B]
};

struct DgradArgs {
  ConvShape shape;
  int code_channels;
  const void* grad;            // learner gradient at the output (mask and scale applied), NHWC
  const void* weight;          // [C_out, KH, KW, C_in]: the module's channels_last weight, as the forward reads it
  const void* grad_pre;        // [N, OH, OW, C_B] or nullptr
  const void* encoder_weight_t;  // W_E^T [C_in, C_B] or nullptr
  void* grad_input;            // out: [N, H, W, C_in]
  const void* learner;         // z [N, OH, OW, C_out] of training BatchNorm, or nullptr: then the
  const float* coefficients;   // [3, C_out] turn grad into a * grad + b * z + c as it is loaded
};

struct WgradArgs {
  // out[split][tap][cx][cg] = sum over this split's output pixels of image_tap[pixel][cx] * grad[pixel][cg]
  ConvShape shape;             // the image is [N, H, W, C_x], the gradient [N, OH, OW, C_g]
  int grad_channels;           // C_g (shape.out_channels is ignored)
  int64_t pixels_per_split;
  int splits;
  const void* image;
  const void* grad;
  float* out;                  // [splits, KH, KW, C_x, C_g], unless final_out is given
  void* final_out;             // with one split: T, the gradient as the weight [C_g, C_x, KH, KW], or nullptr
  int64_t final_strides[4];    // final_out's strides (elements)
  const void* learner;         // z [N, OH, OW, C_g] of training BatchNorm, or nullptr: then the
  const float* coefficients;   // [3, C_g] turn grad into a * grad + b * z + c as it is loaded
};

// Training-mode BatchNorm (pnnh_batch_norm.cu). Vectors are [C] fp32 unless marked P (the BatchNorm
// parameters' and buffers' dtype, passed to the launcher) or T (the activations' dtype).
struct BatchNormForwardArgs {
  int tiles, channels, tile_rows;
  int64_t pixels;
  float eps;
  const float* partial_mean;  // [tiles, C] per-tile means of z
  const float* partial_m2;    // [tiles, C] per-tile sums of squared deviations
  const void* weight;         // P gamma, or nullptr
  const void* bias;           // P beta, or nullptr
  float* mean;                // out
  float* variance;            // out: biased
  float* rstd;                // out: 1 / sqrt(variance + eps)
  float* scale;               // out: gamma * rstd
  float* shift;               // out: beta - mean * scale
};

struct RunningUpdateArgs {
  int channels;
  float momentum, unbiased_factor;  // unbiased_factor = N / (N - 1)
  void* running_mean;               // P, updated in place
  void* running_var;                // P, updated in place
  const float* mean;
  const float* variance;            // biased
};

struct BatchNormReduceArgs {
  int64_t pixels;
  int channels, tile_rows;
  const void* grad;    // T dy [M, C]
  const void* output;  // T y [M, C] (its ReLU mask), or nullptr without an output ReLU
  const void* learner; // T z [M, C]
  const float* mean;
  float* sum_dp;       // out: [tiles, C]
  float* sum_dpz;      // out: [tiles, C] sums of dp * (z - mean)
  void* dp_out;        // out: T dp [M, C] (the gradient kernels and the coder read it), or nullptr
};

struct BatchNormBackwardArgs {
  int tiles, channels;
  int64_t pixels;
  const float* sum_dp;
  const float* sum_dpz;
  const float* mean;
  const float* rstd;
  const void* weight;   // P gamma, or nullptr
  void* grad_weight;    // out: P, or nullptr
  void* grad_bias;      // out: P, or nullptr
  float* coefficients;  // out: [3, C] a, b, c of dz = a * dp + b * z + c
  // out: [C] fp32, or nullptr: the learner bias's gradient, sum(dz): 0 exactly in theory (the batch
  // mean cancels any per-channel constant), NaN wherever dz is not finite, as PyTorch's sum(dz).
  float* grad_learner_bias;
};

struct WgradReduceArgs {
  int splits, kernel_h, kernel_w, c_x, c_g;
  const float* partial;    // [splits, KH, KW, C_x, C_g]
  void* out;               // T, the weight [C_g, C_x, KH, KW] with these strides (elements)
  int64_t out_strides[4];
};

// Each launcher checks the launch (cudaGetLastError) and throws std::runtime_error naming the kernel.
void launch_forward(const ForwardArgs& args, DType dtype, cudaStream_t stream);
void launch_coder_backward(const CoderBackwardArgs& args, DType dtype, cudaStream_t stream);
void launch_dgrad(const DgradArgs& args, DType dtype, cudaStream_t stream);
void launch_wgrad(const WgradArgs& args, DType dtype, cudaStream_t stream);
void launch_bn_finalize_forward(const BatchNormForwardArgs& args, DType param_dtype, cudaStream_t stream);
void launch_bn_running_update(const RunningUpdateArgs& args, DType param_dtype, cudaStream_t stream);
void launch_bn_backward_reduce(const BatchNormReduceArgs& args, DType dtype, cudaStream_t stream);
void launch_bn_finalize_backward(const BatchNormBackwardArgs& args, DType param_dtype, cudaStream_t stream);
void launch_wgrad_reduce(const WgradReduceArgs& args, DType dtype, cudaStream_t stream);

// Tile sizes the Python side needs (the statistics pass writes one row per kTileRows pixels).
int tile_rows();

constexpr int kMaxGridYZ = 65535;  // CUDA's largest gridDim.y and gridDim.z

// What the launchers size their grids by: the CTA tile (block_m pixels or, in the weight gradient,
// image channels; block_n output, code or gradient channels; block_k the reduction step) and CUDA's
// largest grid y/z dimension.
struct TileSizes {
  int block_m;
  int block_n;
  int block_k;
  int max_grid_yz;
};
TileSizes tile_sizes();
std::vector<std::string> kernel_names();

}  // namespace pnnh
