// The cpp backend's moment ops registered with the dispatcher, their autograd in C++:
//
//   fastdfd_cpu::tap(x, mean, var, weight?, bias?, eps, groups, write_y, act=0, slope=0, residual?) -> (y, S1, S2)
//   fastdfd_cpu::tap_backward(x, dy?, dS1, dS2, mean, var, weight?, bias?, eps, groups, act=0, slope=0, residual?)
//       -> (dx, dr)   (dr empty without a residual or dy)
//   fastdfd_cpu::finalize(S1, S2, count, var, eps, offsets, kind) -> [L, G]
//   fastdfd_cpu::finalize_backward(S1, S2, count, var, eps, offsets, dout, kind) -> (dS1, dS2)
//
// Same contract as the Python custom ops of fastdfd/ops/moment/custom_op.py (any dtype of the
// statistics, any layout of x), the same kernels (moment_cpu.cpp). Why a second registration:
// eager, the Python custom-op path costs about 100 us per tap forward and 500 us per forward and
// backward on a tiny layer (torch.library's Python dispatch, autograd's Python node, the casts and
// the layout rule in Python), against 6 us for the kernel call itself; on a teacher of 50 small
// layers that is most of the step. Here the whole eager path runs in C++. Under torch.compile the
// Python path is traced instead (fastdfd/ops/moment/dispatch.py): these ops have no fake kernels.
// The residual (y = a(BN(x) + r), a basic block's add and ReLU in the tap's pass) is the optional last argument.
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "moment_cpu.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
namespace impl = fastdfd::moment_cpu;

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Statistics, weights and incoming sums in the accumulation dtype, contiguous (no copy when they are).
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) { return t.detach().to(acc).contiguous(); }
c10::optional<at::Tensor> as_acc(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return c10::nullopt;
  return as_acc(*t, acc);
}

// kernels/moment/layout.py, in C++: x as the kernels may address it (kernel_layout).
bool is_dense(const at::Tensor& x) {
  if (x.numel() == 0) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims that move the address
  for (int64_t d = 0; d < x.dim(); ++d)
    if (x.size(d) != 1) dims.emplace_back(x.stride(d), x.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return true;
}

// (sn, sc, sp) when every kernel may use x in place (dense, spatial dims flatten, p or c unit-stride).
bool kernel_strides(const at::Tensor& x, int64_t s[3]) {
  if (!is_dense(x)) return false;
  int64_t sp = 1, inner = -1, inner_size = 0;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {  // innermost first: each outer stride = inner stride * size
    if (x.size(d) == 1) continue;
    if (inner < 0) sp = x.stride(d);
    else if (x.stride(d) != inner * inner_size) return false;
    inner = x.stride(d), inner_size = x.size(d);
  }
  s[0] = x.stride(0), s[1] = x.stride(1), s[2] = sp;
  return sp == 1 || (s[1] == 1 && x.size(1) > 1);
}

at::Tensor kernel_layout(const at::Tensor& x, int64_t s[3]) {
  if (kernel_strides(x, s)) return x;
  at::Tensor c = x.contiguous();
  TORCH_CHECK(kernel_strides(c, s), "fastdfd cpp: contiguous x ", c.sizes(), " has no kernel layout");
  return c;
}

// dy with exactly x's strides and dtype (layout.py like_strides): autograd's dy may be an expand or a slice.
at::Tensor like_strides(const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fastdfd: gradient of shape ", t.sizes(), " for an input of shape ", x.sizes());
  if (t.strides() == x.strides() && t.scalar_type() == x.scalar_type() && t.device() == x.device()) return t;
  return at::empty_strided(x.sizes(), x.strides(), x.options()).copy_(t);
}

// ------------------------------------------------------------------------ CPU kernels (ops)
// The residual in the kernels' layout (x's strides); its dtype must already be x's (no silent cast).
c10::optional<at::Tensor> residual_like(const c10::optional<at::Tensor>& r, const at::Tensor& xk) {
  if (!r.has_value() || !r->defined()) return c10::nullopt;
  TORCH_CHECK(r->sizes() == xk.sizes() && r->scalar_type() == xk.scalar_type() && r->device() == xk.device(),
              "fastdfd cpp tap: residual ", r->scalar_type(), " ", r->sizes(), " on ", r->device(),
              " must have x's dtype, shape and device (", xk.scalar_type(), " ", xk.sizes(), " on ", xk.device(), ")");
  return like_strides(*r, xk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tap_cpu(const at::Tensor& x, const at::Tensor& mean,
                                                       const at::Tensor& var, const c10::optional<at::Tensor>& weight,
                                                       const c10::optional<at::Tensor>& bias, double eps,
                                                       int64_t groups, bool write_y, int64_t act, double slope,
                                                       const c10::optional<at::Tensor>& residual) {
  const auto acc = acc_of(x.scalar_type());
  int64_t s[3];
  const at::Tensor xk = kernel_layout(x, s);
  auto out = impl::tap_forward(xk, as_acc(mean, acc), as_acc(var, acc), as_acc(weight, acc), as_acc(bias, acc), eps,
                               groups, write_y, s[0], s[1], s[2], act, slope, residual_like(residual, xk));
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> tap_backward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& dy,
                                                    const at::Tensor& ds1, const at::Tensor& ds2,
                                                    const at::Tensor& mean, const at::Tensor& var,
                                                    const c10::optional<at::Tensor>& weight,
                                                    const c10::optional<at::Tensor>& bias, double eps, int64_t groups,
                                                    int64_t act, double slope,
                                                    const c10::optional<at::Tensor>& residual) {
  const auto acc = acc_of(x.scalar_type());
  int64_t s[3];
  const at::Tensor xk = kernel_layout(x, s);
  c10::optional<at::Tensor> dyk;
  if (dy.has_value() && dy->defined()) dyk = like_strides(*dy, xk);
  auto out = impl::tap_backward(xk, dyk, as_acc(ds1, acc), as_acc(ds2, acc), as_acc(mean, acc), as_acc(var, acc),
                                as_acc(weight, acc), as_acc(bias, acc), eps, groups, s[0], s[1], s[2], act, slope,
                                residual_like(residual, xk));
  return {out[0], out[1]};
}

at::Tensor finalize_cpu(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count, const at::Tensor& var,
                        const at::Tensor& eps, const at::Tensor& offsets, int64_t kind) {
  const auto acc = s1.scalar_type();
  return impl::finalize_forward(s1.contiguous(), s2.contiguous(), as_acc(count, acc), as_acc(var, acc),
                                as_acc(eps, acc), offsets.contiguous(), kind);
}

std::tuple<at::Tensor, at::Tensor> finalize_backward_cpu(const at::Tensor& s1, const at::Tensor& s2,
                                                         const at::Tensor& count, const at::Tensor& var,
                                                         const at::Tensor& eps, const at::Tensor& offsets,
                                                         const at::Tensor& dout, int64_t kind) {
  const auto acc = s1.scalar_type();
  auto out = impl::finalize_backward(s1.contiguous(), s2.contiguous(), as_acc(count, acc), as_acc(var, acc),
                                     as_acc(eps, acc), offsets.contiguous(), as_acc(dout, acc), kind);
  return {out[0], out[1]};
}

// a'(z) in aten ops, for the BN affine's gradients only (a user training the teacher's BN): the kernels'
// act_slope (moment_cpu.cpp), torch's values at the kinks.
at::Tensor activation_slope(const at::Tensor& z, int64_t act, double slope) {
  switch (act) {
    case 1: return (z > 0).to(z.scalar_type());
    case 2: return ((z > 0) & (z < 6)).to(z.scalar_type());
    case 3: return at::where(z > 0, at::ones_like(z), at::full_like(z, slope));
    case 4: {
      const at::Tensor s = at::sigmoid(z);
      return s * (1 + z * (1 - s));
    }
    default: return at::ones_like(z);
  }
}

c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

// ---------------------------------------------------------------------------------- autograd
// The formulas of custom_op.py's _tap_grad and _finalize_grad.
class Tap : public torch::autograd::Function<Tap> {
 public:
  // An absent weight or bias is no input of the node (ExtractVariables), so the gradients wanted are
  // recorded here rather than read back by edge index.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& mean,
                               const at::Tensor& var, const c10::optional<at::Tensor>& weight,
                               const c10::optional<at::Tensor>& bias, double eps, int64_t groups, bool write_y,
                               int64_t act, double slope, const c10::optional<at::Tensor>& residual) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const bool res = write_y && residual.has_value() && residual->defined();
    auto [y, s1, s2] = tap_cpu(x, mean, var, weight, bias, eps, groups, write_y, act, slope,
                               res ? residual : c10::nullopt);
    // the residual is read again backward only for a'(u); with the identity its gradient is dy itself
    ctx->save_for_backward({x, mean, var, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            res && act != 0 ? *residual : at::Tensor()});
    ctx->saved_data["r_grad"] = res && residual->requires_grad();
    ctx->saved_data["x_grad"] = x.requires_grad();
    ctx->saved_data["w_grad"] = weight.has_value() && weight->defined() && weight->requires_grad();
    ctx->saved_data["b_grad"] = bias.has_value() && bias->defined() && bias->requires_grad();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["write_y"] = write_y;
    ctx->saved_data["act"] = act;
    ctx->saved_data["slope"] = slope;
    return {y, s1, s2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &var = saved[2], &weight = saved[3], &bias = saved[4];
    const at::Tensor& residual = saved[5];  // defined when a residual went through a non-identity activation
    const double eps = ctx->saved_data["eps"].toDouble(), slope = ctx->saved_data["slope"].toDouble();
    const int64_t act = ctx->saved_data["act"].toInt();
    const int64_t groups = ctx->saved_data["groups"].toInt(), c = x.size(1);
    const auto acc = acc_of(x.scalar_type());
    const at::Tensor dy = ctx->saved_data["write_y"].toBool() ? grads[0] : at::Tensor();
    auto sums = [&](const at::Tensor& g) { return g.defined() ? g : at::zeros({groups, c}, x.options().dtype(acc)); };
    at::Tensor dx, dw, db, dr;
    const bool want_w = ctx->saved_data["w_grad"].toBool(), want_b = ctx->saved_data["b_grad"].toBool();
    const bool want_r = ctx->saved_data["r_grad"].toBool();
    if (ctx->saved_data["x_grad"].toBool() || (want_r && residual.defined() && dy.defined())) {
      auto [dx_, dr_] = tap_backward_cpu(x, maybe(dy), sums(grads[1]), sums(grads[2]), mean, var, maybe(weight),
                                         maybe(bias), eps, groups, act, slope, maybe(residual));
      if (ctx->saved_data["x_grad"].toBool()) dx = dx_;
      if (want_r && residual.defined() && dy.defined()) dr = dr_;
    }
    if (want_r && !residual.defined()) dr = dy;  // identity activation: d(BN(x) + r)/dr = 1 (undefined: no dy)
    if (dy.defined() && (want_w || want_b)) {
      std::vector<int64_t> dims{0}, shape{1, c};
      for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d), shape.push_back(1);
      at::Tensor dya = dy.to(acc);
      const at::Tensor xhat = (x.to(acc) - mean.to(acc).view(shape)) * at::rsqrt(var.to(acc).view(shape) + eps);
      if (act != 0) {  // with an activation epilogue the affine's gradients see dz = dy a'(u), u = BN(x) [+ r]
        at::Tensor z = xhat;
        if (weight.defined()) z = z * weight.to(acc).view(shape);
        if (bias.defined()) z = z + bias.to(acc).view(shape);
        if (residual.defined()) z = z + residual.to(acc);
        dya = dya * activation_slope(z, act, slope);
      }
      if (want_w) dw = (dya * xhat).sum(dims).to(weight.scalar_type());
      if (want_b) db = dya.sum(dims).to(weight.defined() ? weight.scalar_type() : dy.scalar_type());
    }
    return {dx, at::Tensor(), at::Tensor(), dw, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), dr};
  }
};

class Finalize : public torch::autograd::Function<Finalize> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& s1, const at::Tensor& s2,
                            const at::Tensor& count, const at::Tensor& var, const at::Tensor& eps,
                            const at::Tensor& offsets, int64_t kind) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({s1, s2, count, var, eps, offsets});
    ctx->saved_data["kind"] = kind;
    return finalize_cpu(s1, s2, count, var, eps, offsets, kind);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const int64_t layers = v[5].numel() - 1, g = v[0].size(0);
    const at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros({layers, g}, v[0].options());
    auto [ds1, ds2] = finalize_backward_cpu(v[0], v[1], v[2], v[3], v[4], v[5], dout, ctx->saved_data["kind"].toInt());
    return {ds1, ds2, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> tap_autograd(const at::Tensor& x, const at::Tensor& mean,
                                                            const at::Tensor& var,
                                                            const c10::optional<at::Tensor>& weight,
                                                            const c10::optional<at::Tensor>& bias, double eps,
                                                            int64_t groups, bool write_y, int64_t act, double slope,
                                                            const c10::optional<at::Tensor>& residual) {
  auto out = Tap::apply(x, mean, var, weight, bias, eps, groups, write_y, act, slope, residual);
  return {out[0], out[1], out[2]};
}

at::Tensor finalize_autograd(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count,
                             const at::Tensor& var, const at::Tensor& eps, const at::Tensor& offsets, int64_t kind) {
  return Finalize::apply(s1, s2, count, var, eps, offsets, kind);
}

}  // namespace

TORCH_LIBRARY(fastdfd_cpu, m) {
  m.def("tap(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, int groups, bool write_y,"
        " int act=0, float slope=0., Tensor? residual=None) -> (Tensor, Tensor, Tensor)");
  m.def("tap_backward(Tensor x, Tensor? dy, Tensor ds1, Tensor ds2, Tensor mean, Tensor var, Tensor? weight,"
        " Tensor? bias, float eps, int groups, int act=0, float slope=0., Tensor? residual=None) -> (Tensor, Tensor)");
  m.def("finalize(Tensor s1, Tensor s2, Tensor count, Tensor var, Tensor eps, Tensor offsets, int kind) -> Tensor");
  m.def("finalize_backward(Tensor s1, Tensor s2, Tensor count, Tensor var, Tensor eps, Tensor offsets, Tensor dout,"
        " int kind) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdfd_cpu, CPU, m) {
  m.impl("tap", tap_cpu);
  m.impl("tap_backward", tap_backward_cpu);
  m.impl("finalize", finalize_cpu);
  m.impl("finalize_backward", finalize_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastdfd_cpu, Autograd, m) {
  m.impl("tap", tap_autograd);
  m.impl("finalize", finalize_autograd);
}
