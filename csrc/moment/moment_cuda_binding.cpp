// pybind11 binding of the framework-free CUDA kernels (moment_cuda.cu): unpacks tensors,
// allocates outputs, and passes raw pointers, sizes and the caller's stream (an integer from
// Python: torch.cuda.current_stream(x.device).cuda_stream). Includes no CUDA header, so it
// compiles against a CPU build of torch too (checked in CI); it only loads with a CUDA build.
//
// Every entry point runs under a device guard on its input's device, so kernels launch on the
// GPU that holds the tensors, not the caller's current one. c10::OptionalDeviceGuard is the
// device-generic form of at::cuda::OptionalCUDAGuard (the same CUDA guard implementation,
// reached through c10's registry), which keeps this file free of CUDA headers.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>

#include "moment_cuda.h"

namespace {

fastdfd::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return fastdfd::DType::Float32;
    case at::kHalf: return fastdfd::DType::Float16;
    case at::kBFloat16: return fastdfd::DType::BFloat16;
    default: TORCH_CHECK(false, "fastdfd cuda backend: unsupported dtype ", x.scalar_type());
  }
}

// The layout contract with kernels/moment/layout.py kernel_layout, checked again here: a wrong
// stride is an out-of-bounds write. x non-overlapping and dense (y/dx get x's exact strides, so
// they span the same elements), (sn, sc, sp) x's own strides, spatial dims flattening.
void check_layout(const at::Tensor& x, int64_t sn, int64_t sc, int64_t sp) {
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fastdfd cuda tap: x ", x.sizes(), " with strides ", x.strides(),
              " is not non-overlapping and dense (slices, batch strides and expands must be made contiguous first)");
  TORCH_CHECK(x.size(0) == 1 || x.stride(0) == sn, "fastdfd cuda tap: stride_n ", sn, " is not x's ", x.stride(0));
  TORCH_CHECK(x.size(1) == 1 || x.stride(1) == sc, "fastdfd cuda tap: stride_c ", sc, " is not x's ", x.stride(1));
  int64_t inner = sp;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) == 1) continue;
    TORCH_CHECK(x.stride(d) == inner, "fastdfd cuda tap: spatial dims of x ", x.sizes(), " with strides ",
                x.strides(), " do not flatten with stride_p ", sp);
    inner *= x.size(d);
  }
}

void check_f32(const at::Tensor& t, int64_t n, const at::Device& dev, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n && t.device() == dev,
              "fastdfd cuda: ", what, " must be a contiguous fp32 tensor of ", n, " values on ", dev, ", got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

fastdfd::TapShape shape_of(const at::Tensor& x, int64_t groups, int64_t sn, int64_t sc, int64_t sp) {
  TORCH_CHECK(x.dim() >= 2 && groups >= 1 && x.size(0) % groups == 0, "x must be [N, C, *] with N % groups == 0");
  TORCH_CHECK(x.is_cuda(), "fastdfd cuda tap: x must be a CUDA tensor");
  TORCH_CHECK(x.numel() > 0, "fastdfd cuda tap: x ", x.sizes(), " is empty");
  check_layout(x, sn, sc, sp);
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, x.numel() / (n * c), groups, sn, sc, sp};
}

at::Tensor empty_as(const at::Tensor& x) { return at::empty_strided(x.sizes(), x.strides(), x.options()); }

cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check(int err, const char* what) { TORCH_CHECK(err == 0, "fastdfd ", what, ": CUDA error ", err); }

template <typename T>
const T* opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::vector<at::Tensor> tap_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    double eps, int64_t groups, bool write_y, int64_t sn, int64_t sc, int64_t sp,
                                    int64_t sm_count, int64_t stream) {
  const c10::OptionalDeviceGuard guard(x.device());
  const fastdfd::TapShape s = shape_of(x, groups, sn, sc, sp);
  check_f32(mean, s.C, x.device(), "mean");
  if (write_y) check_f32(var, s.C, x.device(), "var");
  if (weight.has_value()) check_f32(*weight, s.C, x.device(), "weight");
  if (bias.has_value()) check_f32(*bias, s.C, x.device(), "bias");
  const int64_t splits = fastdfd::tap_forward_splits(s, static_cast<int>(sm_count));
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor part1 = at::empty({groups, splits, s.C}, f32), part2 = at::empty({groups, splits, s.C}, f32);
  at::Tensor y = write_y ? empty_as(x) : at::empty({0}, x.options());
  check(fastdfd::tap_forward(dtype_of(x), x.data_ptr(), write_y ? y.data_ptr() : nullptr, part1.data_ptr<float>(),
                             part2.data_ptr<float>(), mean.data_ptr<float>(), var.data_ptr<float>(), opt<float>(weight),
                             opt<float>(bias), static_cast<float>(eps), s, splits, as_stream(stream)),
        "tap_forward");
  if (splits == 1) return {y, part1.view({groups, s.C}), part2.view({groups, s.C})};
  return {y, part1.sum(1), part2.sum(1)};
}

at::Tensor tap_backward(const at::Tensor& x, const c10::optional<at::Tensor>& dy, const at::Tensor& ds1,
                        const at::Tensor& ds2, const at::Tensor& mean, const at::Tensor& var,
                        const c10::optional<at::Tensor>& weight, double eps, int64_t groups, int64_t sn, int64_t sc,
                        int64_t sp, int64_t stream) {
  const c10::OptionalDeviceGuard guard(x.device());
  const fastdfd::TapShape s = shape_of(x, groups, sn, sc, sp);
  if (dy.has_value()) {
    TORCH_CHECK(dy->sizes() == x.sizes() && dy->strides() == x.strides() && dy->scalar_type() == x.scalar_type() &&
                    dy->device() == x.device(),
                "fastdfd cuda tap: dy ", dy->scalar_type(), " ", dy->sizes(), " with strides ", dy->strides(), " on ",
                dy->device(), " must have x's dtype, shape, strides and device (", x.scalar_type(), " ", x.sizes(),
                ", ", x.strides(), ", ", x.device(), ")");
  }
  check_f32(ds1, groups * s.C, x.device(), "ds1");
  check_f32(ds2, groups * s.C, x.device(), "ds2");
  check_f32(mean, s.C, x.device(), "mean");
  check_f32(var, s.C, x.device(), "var");
  if (weight.has_value()) check_f32(*weight, s.C, x.device(), "weight");
  at::Tensor dx = empty_as(x);
  check(fastdfd::tap_backward(dtype_of(x), x.data_ptr(), dy.has_value() ? dy->data_ptr() : nullptr, dx.data_ptr(),
                              ds1.data_ptr<float>(), ds2.data_ptr<float>(), mean.data_ptr<float>(),
                              var.data_ptr<float>(), opt<float>(weight), static_cast<float>(eps), s,
                              as_stream(stream)),
        "tap_backward");
  return dx;
}

void check_finalize(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count, const at::Tensor& var,
                    const at::Tensor& eps, const at::Tensor& offsets) {
  TORCH_CHECK(s1.dim() == 2 && s1.is_cuda(), "fastdfd cuda finalize: s1 must be a [G, C_total] CUDA tensor");
  const int64_t G = s1.size(0), Ct = s1.size(1);
  check_f32(s1, G * Ct, s1.device(), "s1");
  check_f32(s2, G * Ct, s1.device(), "s2");
  check_f32(count, Ct, s1.device(), "count");
  check_f32(var, Ct, s1.device(), "var");
  check_f32(eps, Ct, s1.device(), "eps");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() && offsets.numel() >= 2 &&
                  offsets.device() == s1.device(),
              "fastdfd cuda finalize: offsets must be a contiguous int32 tensor [L + 1] on ", s1.device());
}

at::Tensor finalize_forward(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count, const at::Tensor& var,
                            const at::Tensor& eps, const at::Tensor& offsets, int64_t kind, int64_t stream) {
  const c10::OptionalDeviceGuard guard(s1.device());
  check_finalize(s1, s2, count, var, eps, offsets);
  const int64_t L = offsets.numel() - 1, G = s1.size(0), Ct = s1.size(1);
  at::Tensor out = at::empty({L, G}, s1.options());
  check(fastdfd::finalize_forward(s1.data_ptr<float>(), s2.data_ptr<float>(), count.data_ptr<float>(),
                                  var.data_ptr<float>(), eps.data_ptr<float>(), offsets.data_ptr<int32_t>(), L, G, Ct,
                                  static_cast<int>(kind), out.data_ptr<float>(), as_stream(stream)),
        "finalize_forward");
  return out;
}

std::vector<at::Tensor> finalize_backward(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count,
                                          const at::Tensor& var, const at::Tensor& eps, const at::Tensor& offsets,
                                          const at::Tensor& dout, int64_t kind, int64_t stream) {
  const c10::OptionalDeviceGuard guard(s1.device());
  check_finalize(s1, s2, count, var, eps, offsets);
  const int64_t L = offsets.numel() - 1, G = s1.size(0), Ct = s1.size(1);
  check_f32(dout, L * G, s1.device(), "dout");
  at::Tensor ds1 = at::empty_like(s1), ds2 = at::empty_like(s2);
  check(fastdfd::finalize_backward(s1.data_ptr<float>(), s2.data_ptr<float>(), count.data_ptr<float>(),
                                   var.data_ptr<float>(), eps.data_ptr<float>(), offsets.data_ptr<int32_t>(), L, G,
                                   Ct, static_cast<int>(kind), dout.data_ptr<float>(), ds1.data_ptr<float>(),
                                   ds2.data_ptr<float>(), as_stream(stream)),
        "finalize_backward");
  return {ds1, ds2};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdfd cuda backend: fused BN moment tap and all-layers finalize (framework-free kernels)";
  m.def("tap_forward", &tap_forward);
  m.def("tap_backward", &tap_backward);
  m.def("finalize_forward", &finalize_forward);
  m.def("finalize_backward", &finalize_backward);
}
