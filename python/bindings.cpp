// pnnh_kernels._C: the CUDA kernels for Python, without libtorch. Tensors are passed as device
// pointers (Python ints from tensor.data_ptr(), 0 for "absent"), the stream as
// torch.cuda.current_stream().cuda_stream. Launch errors raise RuntimeError naming the kernel;
// grids beyond CUDA's limits raise ValueError.
#include <array>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "pnnh_kernels.h"

namespace py = pybind11;
using pnnh::ConvShape;
using pnnh::DType;

namespace {

template <typename T>
T* pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

cudaStream_t stream_of(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

DType dtype_of(int code) {
  if (code < 0 || code > 2) throw py::value_error("dtype: expected 0 (float32), 1 (float16) or 2 (bfloat16)");
  return static_cast<DType>(code);
}

// (device count, "" or the CUDA error that prevented counting): is_available() explains itself.
std::tuple<int, std::string> device_count() {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return {0, std::string(cudaGetErrorName(error)) + ": " + cudaGetErrorString(error)};
  }
  return {count, ""};
}

std::tuple<int, int> compute_capability(int device) {
  cudaDeviceProp properties{};
  const cudaError_t error = cudaGetDeviceProperties(&properties, device);
  if (error != cudaSuccess) throw std::runtime_error(std::string("cudaGetDeviceProperties: ") + cudaGetErrorString(error));
  return {properties.major, properties.minor};
}

}  // namespace

#ifndef PNNH_MODULE_NAME
#define PNNH_MODULE_NAME _C
#endif

PYBIND11_MODULE(PNNH_MODULE_NAME, m) {
  m.doc() = "PNNH fused CUDA kernels (pointer-level interface; see pnnh_kernels.cuda)";

  // module_local: the emulation module (_C_emu) may be loaded beside _C in one process.
  py::class_<ConvShape>(m, "ConvShape", py::module_local())
      .def(py::init([](int64_t batch, int height, int width, int in_channels, int out_height, int out_width,
                       int out_channels, int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h,
                       int pad_w, int dilation_h, int dilation_w) {
             return ConvShape{batch,    height,   width,    in_channels, out_height, out_width, out_channels, kernel_h,
                              kernel_w, stride_h, stride_w, pad_h,       pad_w,      dilation_h, dilation_w};
           }),
           py::arg("batch"), py::arg("height"), py::arg("width"), py::arg("in_channels"), py::arg("out_height"),
           py::arg("out_width"), py::arg("out_channels"), py::arg("kernel_h"), py::arg("kernel_w"),
           py::arg("stride_h"), py::arg("stride_w"), py::arg("pad_h"), py::arg("pad_w"), py::arg("dilation_h"),
           py::arg("dilation_w"))
      .def_readonly("batch", &ConvShape::batch)
      .def_readonly("in_channels", &ConvShape::in_channels)
      .def_readonly("out_channels", &ConvShape::out_channels);

  m.def(
      "forward",
      [](const ConvShape& shape, int code_channels, int mode, bool relu, int dtype, uintptr_t x, uintptr_t weight,
         uintptr_t scale, uintptr_t shift, uintptr_t encoder_weight, uintptr_t encoder_bias,
         uintptr_t decoder_weight, uintptr_t y, uintptr_t z, uintptr_t partial_mean, uintptr_t partial_m2,
         uintptr_t code, uintptr_t stream) {
        if (mode < 0 || mode > 2) throw py::value_error("mode: expected 0 (fused), 1 (statistics) or 2 (apply)");
        pnnh::ForwardArgs args{shape,
                               code_channels,
                               static_cast<pnnh::ForwardMode>(mode),
                               relu,
                               pointer<const void>(x),
                               pointer<const void>(weight),
                               pointer<const float>(scale),
                               pointer<const float>(shift),
                               pointer<const void>(encoder_weight),
                               pointer<const float>(encoder_bias),
                               pointer<const void>(decoder_weight),
                               pointer<void>(y),
                               pointer<void>(z),
                               pointer<float>(partial_mean),
                               pointer<float>(partial_m2),
                               pointer<void>(code)};
        pnnh::launch_forward(args, dtype_of(dtype), stream_of(stream));
      },
      "The fused forward (modes: 0 fused, 1 statistics, 2 apply).");

  m.def(
      "coder_backward",
      [](const ConvShape& shape, int code_channels, int dtype, uintptr_t x, uintptr_t encoder_weight,
         uintptr_t encoder_bias, uintptr_t decoder_t, uintptr_t grad, uintptr_t code, uintptr_t grad_pre,
         uintptr_t stream) {
        pnnh::CoderBackwardArgs args{shape,
                                     code_channels,
                                     pointer<const void>(x),
                                     pointer<const void>(encoder_weight),
                                     pointer<const float>(encoder_bias),
                                     pointer<const void>(decoder_t),
                                     pointer<const void>(grad),
                                     pointer<void>(code),
                                     pointer<void>(grad_pre)};
        pnnh::launch_coder_backward(args, dtype_of(dtype), stream_of(stream));
      },
      "The recomputed code and the gradient at the encoder's pre-activation.");

  m.def(
      "dgrad",
      [](const ConvShape& shape, int code_channels, int dtype, uintptr_t grad, uintptr_t weight,
         uintptr_t grad_pre, uintptr_t encoder_weight_t, uintptr_t grad_input, uintptr_t learner,
         uintptr_t coefficients, uintptr_t stream) {
        pnnh::DgradArgs args{shape,
                             code_channels,
                             pointer<const void>(grad),
                             pointer<const void>(weight),
                             pointer<const void>(grad_pre),
                             pointer<const void>(encoder_weight_t),
                             pointer<void>(grad_input),
                             pointer<const void>(learner),
                             pointer<const float>(coefficients)};
        pnnh::launch_dgrad(args, dtype_of(dtype), stream_of(stream));
      },
      "The input gradient (with learner and coefficients: of training BatchNorm's dz, formed on load).");

  m.def(
      "wgrad",
      [](const ConvShape& shape, int grad_channels, int64_t pixels_per_split, int splits, int dtype,
         uintptr_t image, uintptr_t grad, uintptr_t out, uintptr_t final_out, std::array<int64_t, 4> final_strides,
         uintptr_t learner, uintptr_t coefficients, uintptr_t stream) {
        if (final_out != 0 && splits != 1) throw py::value_error("final_out: needs exactly one split");
        pnnh::WgradArgs args{shape,
                             grad_channels,
                             pixels_per_split,
                             splits,
                             pointer<const void>(image),
                             pointer<const void>(grad),
                             pointer<float>(out),
                             pointer<void>(final_out),
                             {final_strides[0], final_strides[1], final_strides[2], final_strides[3]},
                             pointer<const void>(learner),
                             pointer<const float>(coefficients)};
        pnnh::launch_wgrad(args, dtype_of(dtype), stream_of(stream));
      },
      "Per-split partial weight gradients, fp32, or with one split the gradient itself (final_out).");

  m.def(
      "bn_finalize_forward",
      [](int tiles, int channels, int tile_rows, int64_t pixels, float eps, int param_dtype, uintptr_t partial_mean,
         uintptr_t partial_m2, uintptr_t weight, uintptr_t bias, uintptr_t mean, uintptr_t variance, uintptr_t rstd,
         uintptr_t scale, uintptr_t shift, uintptr_t stream) {
        pnnh::BatchNormForwardArgs args{tiles,
                                        channels,
                                        tile_rows,
                                        pixels,
                                        eps,
                                        pointer<const float>(partial_mean),
                                        pointer<const float>(partial_m2),
                                        pointer<const void>(weight),
                                        pointer<const void>(bias),
                                        pointer<float>(mean),
                                        pointer<float>(variance),
                                        pointer<float>(rstd),
                                        pointer<float>(scale),
                                        pointer<float>(shift)};
        pnnh::launch_bn_finalize_forward(args, dtype_of(param_dtype), stream_of(stream));
      },
      "Batch mean, variance, rstd, scale and shift from the statistics pass's per-tile partials.");

  m.def(
      "bn_running_update",
      [](int channels, float momentum, float unbiased_factor, int param_dtype, uintptr_t running_mean,
         uintptr_t running_var, uintptr_t mean, uintptr_t variance, uintptr_t stream) {
        pnnh::RunningUpdateArgs args{channels,
                                     momentum,
                                     unbiased_factor,
                                     pointer<void>(running_mean),
                                     pointer<void>(running_var),
                                     pointer<const float>(mean),
                                     pointer<const float>(variance)};
        pnnh::launch_bn_running_update(args, dtype_of(param_dtype), stream_of(stream));
      },
      "The running statistics, updated in place.");

  m.def(
      "bn_backward_reduce",
      [](int64_t pixels, int channels, int tile_rows, int dtype, uintptr_t grad, uintptr_t output, uintptr_t learner,
         uintptr_t mean, uintptr_t sum_dp, uintptr_t sum_dpz, uintptr_t dp_out, uintptr_t stream) {
        pnnh::BatchNormReduceArgs args{pixels,
                                       channels,
                                       tile_rows,
                                       pointer<const void>(grad),
                                       pointer<const void>(output),
                                       pointer<const void>(learner),
                                       pointer<const float>(mean),
                                       pointer<float>(sum_dp),
                                       pointer<float>(sum_dpz),
                                       pointer<void>(dp_out)};
        pnnh::launch_bn_backward_reduce(args, dtype_of(dtype), stream_of(stream));
      },
      "Per-tile sums of dp and dp * (z - mean) (and dp itself when dp_out is given).");

  m.def(
      "bn_finalize_backward",
      [](int tiles, int channels, int64_t pixels, int param_dtype, uintptr_t sum_dp, uintptr_t sum_dpz, uintptr_t mean,
         uintptr_t rstd, uintptr_t weight, uintptr_t grad_weight, uintptr_t grad_bias, uintptr_t coefficients,
         uintptr_t grad_learner_bias, uintptr_t stream) {
        pnnh::BatchNormBackwardArgs args{tiles,
                                         channels,
                                         pixels,
                                         pointer<const float>(sum_dp),
                                         pointer<const float>(sum_dpz),
                                         pointer<const float>(mean),
                                         pointer<const float>(rstd),
                                         pointer<const void>(weight),
                                         pointer<void>(grad_weight),
                                         pointer<void>(grad_bias),
                                         pointer<float>(coefficients),
                                         pointer<float>(grad_learner_bias)};
        pnnh::launch_bn_finalize_backward(args, dtype_of(param_dtype), stream_of(stream));
      },
      "The gradients of gamma and beta (and of the learner's bias) and the coefficients of dz.");

  m.def(
      "wgrad_reduce",
      [](int splits, int kernel_h, int kernel_w, int c_x, int c_g, int dtype, uintptr_t partial, uintptr_t out,
         std::array<int64_t, 4> out_strides, uintptr_t stream) {
        pnnh::WgradReduceArgs args{splits,      kernel_h, kernel_w, c_x, c_g, pointer<const float>(partial),
                                   pointer<void>(out), {out_strides[0], out_strides[1], out_strides[2], out_strides[3]}};
        pnnh::launch_wgrad_reduce(args, dtype_of(dtype), stream_of(stream));
      },
      "The weight gradient from the split partials, in the weight's layout and dtype.");

  m.def("device_count", &device_count, "(number of CUDA devices, the CUDA error when counting failed)");
  m.def("compute_capability", &compute_capability, py::arg("device"));
  m.def("tile_rows", &pnnh::tile_rows, "Pixels per CTA tile (rows of the statistics partials).");
  m.def(
      "tile_sizes",
      [] {
        const pnnh::TileSizes t = pnnh::tile_sizes();
        py::dict sizes;
        sizes["block_m"] = t.block_m;
        sizes["block_n"] = t.block_n;
        sizes["block_k"] = t.block_k;
        sizes["max_grid_yz"] = t.max_grid_yz;
        return sizes;
      },
      "The CTA tile (block_m, block_n, block_k) and CUDA's largest grid y/z dimension.");
  m.def("kernel_names", &pnnh::kernel_names);
  m.attr("cuda_architectures") = PNNH_CUDA_ARCHITECTURES;
  m.attr("cuda_version") = CUDART_VERSION;
#ifdef PNNH_EMULATE
  m.attr("emulated") = true;
#else
  m.attr("emulated") = false;
#endif
}
