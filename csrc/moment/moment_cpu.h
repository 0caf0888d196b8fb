// The cpp backend's moment tap and all-layers finalize (moment_cpu.cpp), bound into the
// fastdfd_cpu extension by csrc/fastdfd_cpu.cpp (one extension, one PYBIND11_MODULE).
#pragma once

#include <torch/extension.h>

#include "../cpu_threads.h"

void bind_moment_ops(pybind11::module_& m);

// The kernels' entry points (moment_cpu.cpp). x must already be in the kernels' layout with
// strides (sn, sc, sp) (kernels/moment/layout.py kernel_layout); statistics, weights and sums
// contiguous in the accumulation dtype (fp32; fp64 for fp64 x). act/slope: the activation epilogue
// (ACTIVATION_IDS of kernels/moment/layout.py, leaky_relu's negative slope); residual: an optional tensor with
// x's dtype, shape and strides added before the activation. tap_backward returns {dx, dr} (dr empty
// without a residual or without dy).
namespace fastdfd::moment_cpu {
std::vector<at::Tensor> tap_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    double eps, int64_t groups, bool write_y, int64_t sn, int64_t sc, int64_t sp,
                                    int64_t act, double slope, const c10::optional<at::Tensor>& residual);
std::vector<at::Tensor> tap_backward(const at::Tensor& x, const c10::optional<at::Tensor>& dy, const at::Tensor& ds1,
                                     const at::Tensor& ds2, const at::Tensor& mean, const at::Tensor& var,
                                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                     double eps, int64_t groups, int64_t sn, int64_t sc, int64_t sp, int64_t act,
                                     double slope, const c10::optional<at::Tensor>& residual);
at::Tensor finalize_forward(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count,
                            const at::Tensor& var, const at::Tensor& eps, const at::Tensor& offsets, int64_t kind);
std::vector<at::Tensor> finalize_backward(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count,
                                          const at::Tensor& var, const at::Tensor& eps, const at::Tensor& offsets,
                                          const at::Tensor& dout, int64_t kind);
}  // namespace fastdfd::moment_cpu
