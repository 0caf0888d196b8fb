// pybind11 binding of the framework-free CUDA kernels (moment_tap_cuda.cu): unpacks tensors,
// allocates outputs, and passes raw pointers, sizes and the caller's stream (an integer from
// Python: torch.cuda.current_stream().cuda_stream). Includes no CUDA header, so it compiles
// against a CPU build of torch too (checked in CI); it only loads with a CUDA build.
#include <torch/extension.h>

#include "moment_tap_cuda.h"

namespace {

fastdfd::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return fastdfd::DType::Float32;
    case at::kHalf: return fastdfd::DType::Float16;
    case at::kBFloat16: return fastdfd::DType::BFloat16;
    default: TORCH_CHECK(false, "fastdfd cuda backend: unsupported dtype ", x.scalar_type());
  }
}

fastdfd::TapShape shape_of(const at::Tensor& x, int64_t groups, int64_t sn, int64_t sc, int64_t sp) {
  TORCH_CHECK(x.dim() >= 2 && groups >= 1 && x.size(0) % groups == 0, "x must be [N, C, *] with N % groups == 0");
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, n * c == 0 ? 0 : x.numel() / (n * c), groups, sn, sc, sp};
}

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
  const fastdfd::TapShape s = shape_of(x, groups, sn, sc, sp);
  const int64_t splits = fastdfd::tap_forward_splits(s, static_cast<int>(sm_count));
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor part1 = at::empty({groups, splits, s.C}, f32), part2 = at::empty({groups, splits, s.C}, f32);
  at::Tensor y = write_y ? at::empty_like(x) : at::empty({0}, x.options());
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
  const fastdfd::TapShape s = shape_of(x, groups, sn, sc, sp);
  at::Tensor dx = at::empty_like(x);
  check(fastdfd::tap_backward(dtype_of(x), x.data_ptr(), dy.has_value() ? dy->data_ptr() : nullptr, dx.data_ptr(),
                              ds1.data_ptr<float>(), ds2.data_ptr<float>(), mean.data_ptr<float>(),
                              var.data_ptr<float>(), opt<float>(weight), static_cast<float>(eps), s,
                              as_stream(stream)),
        "tap_backward");
  return dx;
}

at::Tensor finalize_forward(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count, const at::Tensor& var,
                            const at::Tensor& eps, const at::Tensor& offsets, int64_t kind, int64_t stream) {
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
  const int64_t L = offsets.numel() - 1, G = s1.size(0), Ct = s1.size(1);
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
