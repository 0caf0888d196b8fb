// The `cpp` backend of fastdfd: the moment tap and the all-layers finalize on the CPU.
//
// Same contract as the Triton kernels (kernels/moment/tap.py, kernels/moment/finalize.py);
// the math is stated in fastdfd/ops/moment/reference.py. x is addressed as [N, C, P] with strides
// (sn, sc, sp), normalised by the Python side (kernels/moment/layout.py kernel_layout) to a
// non-overlapping, dense tensor with sp == 1 (NCHW-like) or sc == 1 (channels_last-like);
// check_layout verifies that again, and y/dx get x's exact strides.
//
// Forward, one read of x: y = a(u), u = (x - mu_r) * gamma * rsqrt(var_r + eps) + beta [+ r] (optional; r an
// optional residual of x's shape and strides, a the activation epilogue, identity by default) and, per
// (segment g, channel c), S1 = sum (x - mu_r), S2 = sum (x - mu_r)^2.
// Backward, one pass: dz = dy a'(u), dx = dz * gamma * rsqrt(var_r + eps) + dS1[g, c] + 2 (x - mu_r) dS2[g, c],
// and with a residual dr = dz (u recomputed from the x and r the pass reads).
//
// Parallelism (ATen's parallel_for), both passes in x's memory order: the forward cuts each
// segment's rows (P values of an (image, channel) in NCHW, C values of an (image, position) in
// channels_last) into chunks whose per-channel partial sums are added up afterwards in double;
// the backward is elementwise over the rows. Each row is a vectorisable inner loop. Sums run in
// float over one row (NCHW) or 256 rows (channels_last) for fp32/fp16/bf16 input (double for
// fp64), then in double.
#include "moment_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

struct Geometry {
  int64_t N, C, P, G, rows;  // rows = N / G, the images of one segment
  int64_t sn, sc, sp;
  bool channels_last() const { return sc == 1 && C > 1; }
};

// The layout contract with the Python side (kernels/moment/layout.py kernel_layout), checked here
// again because a wrong stride is an out-of-bounds write: x must be non-overlapping and dense
// (so y/dx, allocated with x's exact strides, span the same elements), (sn, sc, sp) must be
// x's own strides, and the unit-stride axis must be p (NCHW-like) or c (channels_last-like).
void check_layout(const at::Tensor& x, int64_t sn, int64_t sc, int64_t sp) {
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fastdfd cpp tap: x ", x.sizes(), " with strides ", x.strides(),
              " is not non-overlapping and dense (slices, batch strides and expands must be made contiguous first)");
  TORCH_CHECK(x.size(0) == 1 || x.stride(0) == sn, "fastdfd cpp tap: stride_n ", sn, " is not x's ", x.stride(0));
  TORCH_CHECK(x.size(1) == 1 || x.stride(1) == sc, "fastdfd cpp tap: stride_c ", sc, " is not x's ", x.stride(1));
  int64_t inner = sp;  // spatial dims must flatten: innermost (non-1) has stride sp, each outer = inner * size
  bool unit_seen = false;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) == 1) continue;
    TORCH_CHECK(x.stride(d) == inner, "fastdfd cpp tap: spatial dims of x ", x.sizes(), " with strides ", x.strides(),
                " do not flatten with stride_p ", sp);
    inner *= x.size(d);
    unit_seen = true;
  }
  TORCH_CHECK(unit_seen || sp == 1, "fastdfd cpp tap: x has no spatial extent but stride_p is ", sp);
  TORCH_CHECK(sp == 1 || (sc == 1 && x.size(1) > 1),
              "fastdfd cpp tap: neither p (stride ", sp, ") nor c (stride ", sc, ") is x's unit-stride axis");
}

void check_stats(const at::Tensor& t, int64_t c, at::ScalarType acc, const char* what) {
  TORCH_CHECK(t.scalar_type() == acc && t.is_contiguous() && t.numel() == c, "fastdfd cpp: ", what,
              " must be a contiguous ", acc, " tensor of ", c, " values, got ", t.scalar_type(), " ", t.sizes());
}

Geometry geometry(const at::Tensor& x, int64_t groups, int64_t sn, int64_t sc, int64_t sp) {
  TORCH_CHECK(x.dim() >= 2, "x must be [N, C, *spatial]");
  TORCH_CHECK(x.device().is_cpu(), "fastdfd cpp tap: x must be a CPU tensor");
  TORCH_CHECK(groups >= 1 && x.size(0) % groups == 0, "batch must split into groups");
  TORCH_CHECK(x.numel() > 0, "fastdfd cpp tap: x ", x.sizes(), " is empty");
  check_layout(x, sn, sc, sp);
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, x.numel() / (n * c), groups, n / groups, sn, sc, sp};
}

// Per-channel affine of the eval BN: y = d * scale + shift with d = x - mu_r.
template <typename A>
void bn_affine(const A* var, const A* w, const A* b, double eps, int64_t C, std::vector<A>& scale,
               std::vector<A>& shift) {
  scale.resize(C);
  shift.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = static_cast<A>(1.0 / std::sqrt(static_cast<double>(var[c]) + eps)) * (w ? w[c] : A(1));
    shift[c] = b ? b[c] : A(0);
  }
}

// The activation epilogue y = a(z), z the BN output, in the forward's store; the backward multiplies dy by
// a'(z), z recomputed from the x it reads anyway. Ids as ACTIVATION_IDS in kernels/moment/layout.py; the
// math and the derivatives at the kinks (torch's) are fastdfd/ops/moment/activation.py's. A template
// argument, so each activation's inner loops stay branch-free and vectorisable.
enum Act { IDENTITY = 0, RELU = 1, RELU6 = 2, LEAKY_RELU = 3, SILU = 4 };

template <int ACT, typename A>
inline A act_value(A z, A slope) {
  if constexpr (ACT == RELU) return std::max(z, A(0));  // max(NaN, 0) is NaN, as torch's relu
  else if constexpr (ACT == RELU6) return std::min(std::max(z, A(0)), A(6));
  else if constexpr (ACT == LEAKY_RELU) return z > A(0) ? z : z * slope;
  else if constexpr (ACT == SILU) return z / (A(1) + std::exp(-z));
  else return z;
}

template <int ACT, typename A>
inline A act_slope(A z, A slope) {
  if constexpr (ACT == RELU) return z > A(0) ? A(1) : A(0);
  else if constexpr (ACT == RELU6) return (z > A(0) && z < A(6)) ? A(1) : A(0);
  else if constexpr (ACT == LEAKY_RELU) return z > A(0) ? A(1) : slope;
  else if constexpr (ACT == SILU) {
    const A sg = A(1) / (A(1) + std::exp(-z));
    return sg * (A(1) + z * (A(1) - sg));
  } else return A(1);
}

// Calls f with the activation id as a compile-time constant.
template <typename F>
void with_activation(int64_t act, F&& f) {
  switch (act) {
    case IDENTITY: f(std::integral_constant<int, IDENTITY>{}); break;
    case RELU: f(std::integral_constant<int, RELU>{}); break;
    case RELU6: f(std::integral_constant<int, RELU6>{}); break;
    case LEAKY_RELU: f(std::integral_constant<int, LEAKY_RELU>{}); break;
    case SILU: f(std::integral_constant<int, SILU>{}); break;
    default: TORCH_CHECK(false, "fastdfd cpp tap: unknown activation id ", act, " (0-4)");
  }
}

// Calls f with whether a residual is added, as a compile-time constant (branch-free inner loops again).
template <typename F>
void with_residual(bool residual, F&& f) {
  if (residual) f(std::true_type{});
  else f(std::false_type{});
}

// Both passes walk x in memory order. A "row" is x's unit-stride run: the P values of one
// (image, channel) in NCHW-like x, the C values of one (image, position) in channels_last-like x.
// Rows are numbered within a segment so that consecutive numbers are neighbours in memory:
// image-major when the image stride is the larger (NCHW, NHWC), image-minor otherwise (a
// (C, N, H, W) tensor seen through a permute). Walking channel by channel instead, jumping an
// image's stride between short rows, left the forward at 2-30x the time of a plain copy of x.
struct Rows {
  int64_t per_segment, length;  // rows of one segment, values per row
  int64_t other, s_other;       // the row's second index (channel, or position): count and stride
  bool image_major;
};
Rows rows_of(const Geometry& g) {
  const int64_t other = g.channels_last() ? g.P : g.C, s_other = g.channels_last() ? g.sp : g.sc;
  return {g.rows * other, g.channels_last() ? g.C : g.P, other, s_other, g.sn >= s_other};
}
// The second index of row r (the channel, in NCHW-like x).
inline int64_t row_other(const Geometry& g, const Rows& R, int64_t r) {
  return R.image_major ? r % R.other : r / g.rows;
}
// Offset of row r of segment grp.
inline int64_t row_offset(const Geometry& g, const Rows& R, int64_t grp, int64_t r) {
  const int64_t image = R.image_major ? r / R.other : r % g.rows;
  return (grp * g.rows + image) * g.sn + row_other(g, R, r) * R.s_other;
}

// Chunks per segment for the forward's reduction: enough tasks for every thread, never empty.
int64_t chunks_for(const Geometry& g, const Rows& rows) {
  const int64_t want = std::max<int64_t>(1, 4 * at::get_num_threads() / std::max<int64_t>(1, g.G));
  return std::max<int64_t>(1, std::min(rows.per_segment, want));
}

// Rows summed in float before they are added into the double partials (channels_last), which
// bounds the float sums' length whatever the batch.
constexpr int64_t kFlushRows = 256;

template <typename T, int ACT, bool RES>
void tap_forward_impl(const T* x, T* y, typename Acc<T>::type* s1, typename Acc<T>::type* s2,
                      const typename Acc<T>::type* mean, const typename Acc<T>::type* var,
                      const typename Acc<T>::type* w, const typename Acc<T>::type* b, const Geometry& g, double eps,
                      typename Acc<T>::type slope, const T* res) {
  using A = typename Acc<T>::type;
  std::vector<A> scale, shift;
  if (y) bn_affine(var, w, b, eps, g.C, scale, shift);
  const Rows rows = rows_of(g);
  const int64_t chunks = chunks_for(g, rows), L = rows.length;
  // per (segment, chunk) task: its per-channel partial sums, added up in double afterwards
  std::vector<double> part1(g.G * chunks * g.C, 0.0), part2(g.G * chunks * g.C, 0.0);
  at::parallel_for(0, g.G * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> b1, b2;  // channels_last: float block sums, one per channel
    if (g.channels_last()) b1.resize(g.C), b2.resize(g.C);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t grp = t / chunks, k = t % chunks;
      const int64_t r0 = k * rows.per_segment / chunks, r1 = (k + 1) * rows.per_segment / chunks;
      double* p1 = part1.data() + t * g.C;
      double* p2 = part2.data() + t * g.C;
      if (!g.channels_last()) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t c = row_other(g, rows, r), off = row_offset(g, rows, grp, r);
          const T* xr = x + off;
          const A mu = mean[c];
          A a1 = 0, a2 = 0;
          if (y) {
            T* yr = y + off;
            const T* rr = RES ? res + off : nullptr;
            const A sc = scale[c], sh = shift[c];
#pragma omp simd reduction(+ : a1, a2)
            for (int64_t p = 0; p < L; ++p) {
              const A d = static_cast<A>(xr[p]) - mu;
              a1 += d;
              a2 += d * d;
              A u = d * sc + sh;
              if constexpr (RES) u += static_cast<A>(rr[p]);
              yr[p] = static_cast<T>(act_value<ACT>(u, slope));
            }
          } else {
#pragma omp simd reduction(+ : a1, a2)
            for (int64_t p = 0; p < L; ++p) {
              const A d = static_cast<A>(xr[p]) - mu;
              a1 += d;
              a2 += d * d;
            }
          }
          p1[c] += a1;
          p2[c] += a2;
        }
        continue;
      }
      for (int64_t f0 = r0; f0 < r1; f0 += kFlushRows) {
        std::fill(b1.begin(), b1.end(), A(0));
        std::fill(b2.begin(), b2.end(), A(0));
        A* q1 = b1.data();
        A* q2 = b2.data();
        for (int64_t r = f0; r < std::min(r1, f0 + kFlushRows); ++r) {
          const int64_t off = row_offset(g, rows, grp, r);
          const T* xr = x + off;
          if (y) {
            T* yr = y + off;
            const T* rr = RES ? res + off : nullptr;
#pragma omp simd
            for (int64_t c = 0; c < L; ++c) {
              const A d = static_cast<A>(xr[c]) - mean[c];
              q1[c] += d;
              q2[c] += d * d;
              A u = d * scale[c] + shift[c];
              if constexpr (RES) u += static_cast<A>(rr[c]);
              yr[c] = static_cast<T>(act_value<ACT>(u, slope));
            }
          } else {
#pragma omp simd
            for (int64_t c = 0; c < L; ++c) {
              const A d = static_cast<A>(xr[c]) - mean[c];
              q1[c] += d;
              q2[c] += d * d;
            }
          }
        }
        for (int64_t c = 0; c < g.C; ++c) p1[c] += q1[c], p2[c] += q2[c];
      }
    }
  });
  for (int64_t grp = 0; grp < g.G; ++grp) {
    for (int64_t c = 0; c < g.C; ++c) {
      double a1 = 0, a2 = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        a1 += part1[(grp * chunks + k) * g.C + c];
        a2 += part2[(grp * chunks + k) * g.C + c];
      }
      s1[grp * g.C + c] = static_cast<A>(a1);
      s2[grp * g.C + c] = static_cast<A>(a2);
    }
  }
}

// Values per backward task: large enough that a task's overhead is noise, small enough to balance.
constexpr int64_t kBackwardGrainValues = 16384;

// RES: a residual r was added before the activation; dr = dy a'(u) is written beside dx (only called with dy).
template <typename T, int ACT, bool RES>
void tap_backward_impl(const T* x, const T* dy, T* dx, const typename Acc<T>::type* ds1,
                       const typename Acc<T>::type* ds2, const typename Acc<T>::type* mean,
                       const typename Acc<T>::type* var, const typename Acc<T>::type* w,
                       const typename Acc<T>::type* b, const Geometry& g, double eps, typename Acc<T>::type slope,
                       const T* res, T* dres) {
  using A = typename Acc<T>::type;
  std::vector<A> scale, shift;  // shift (beta) only enters through a'(z)
  bn_affine(var, w, b, eps, g.C, scale, shift);
  std::vector<A> g2(g.G * g.C);  // 2 dS2, the factor of (x - mu_r)
  for (int64_t i = 0; i < g.G * g.C; ++i) g2[i] = 2 * ds2[i];
  const Rows rows = rows_of(g);
  const int64_t L = rows.length, grain = std::max<int64_t>(1, kBackwardGrainValues / L);
  at::parallel_for(0, g.G * rows.per_segment, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t grp = t / rows.per_segment, r = t % rows.per_segment, off = row_offset(g, rows, grp, r);
      const T* xr = x + off;
      T* dxr = dx + off;
      const T* dyr = dy ? dy + off : nullptr;
      const T* rr = RES ? res + off : nullptr;
      T* drr = RES ? dres + off : nullptr;
      if (!g.channels_last()) {
        const int64_t c = row_other(g, rows, r);
        const A mu = mean[c], c1 = ds1[grp * g.C + c], c2 = g2[grp * g.C + c], sc = scale[c], sh = shift[c];
        if (dyr) {
#pragma omp simd
          for (int64_t p = 0; p < L; ++p) {
            const A d = static_cast<A>(xr[p]) - mu;
            A u = d * sc + sh;
            if constexpr (RES) u += static_cast<A>(rr[p]);
            const A dz = static_cast<A>(dyr[p]) * act_slope<ACT>(u, slope);
            dxr[p] = static_cast<T>(dz * sc + c1 + d * c2);
            if constexpr (RES) drr[p] = static_cast<T>(dz);
          }
        } else {
#pragma omp simd
          for (int64_t p = 0; p < L; ++p) dxr[p] = static_cast<T>(c1 + (static_cast<A>(xr[p]) - mu) * c2);
        }
        continue;
      }
      const A* c1 = ds1 + grp * g.C;
      const A* c2 = g2.data() + grp * g.C;
      if (dyr) {
#pragma omp simd
        for (int64_t c = 0; c < L; ++c) {
          const A d = static_cast<A>(xr[c]) - mean[c];
          A u = d * scale[c] + shift[c];
          if constexpr (RES) u += static_cast<A>(rr[c]);
          const A dz = static_cast<A>(dyr[c]) * act_slope<ACT>(u, slope);
          dxr[c] = static_cast<T>(dz * scale[c] + c1[c] + d * c2[c]);
          if constexpr (RES) drr[c] = static_cast<T>(dz);
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < L; ++c) dxr[c] = static_cast<T>(c1[c] + (static_cast<A>(xr[c]) - mean[c]) * c2[c]);
      }
    }
  });
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// y / dx: exactly x's strides (x is dense, so these span the same elements the kernel writes).
at::Tensor empty_as(const at::Tensor& x) { return at::empty_strided(x.sizes(), x.strides(), x.options()); }

template <typename A>
const A* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<A>() : nullptr;
}

// dy and the residual are addressed with x's offsets: they must have its dtype, shape and strides.
void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.strides() == x.strides() && t.scalar_type() == x.scalar_type() &&
                  t.device() == x.device(),
              "fastdfd cpp tap: ", what, " ", t.scalar_type(), " ", t.sizes(), " with strides ", t.strides(),
              " must have x's dtype, shape and strides (", x.scalar_type(), " ", x.sizes(), ", ", x.strides(), ")");
}

}  // namespace

// The entry points, shared with the op registrations of moment_library_cpu.cpp (moment_cpu.h).
namespace fastdfd::moment_cpu {

std::vector<at::Tensor> tap_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    double eps, int64_t groups, bool write_y, int64_t sn, int64_t sc, int64_t sp,
                                    int64_t act, double slope, const c10::optional<at::Tensor>& residual) {
  follow_torch_threads();
  const Geometry g = geometry(x, groups, sn, sc, sp);
  const bool res = write_y && residual.has_value() && residual->defined();  // without y there is nothing to add to
  if (res) check_like_x(*residual, x, "residual");
  check_stats(mean, g.C, acc_type(x), "mean");
  if (write_y) check_stats(var, g.C, acc_type(x), "var");
  if (weight.has_value()) check_stats(*weight, g.C, acc_type(x), "weight");
  if (bias.has_value()) check_stats(*bias, g.C, acc_type(x), "bias");
  auto opts = x.options().dtype(acc_type(x));
  at::Tensor s1 = at::empty({groups, g.C}, opts), s2 = at::empty({groups, g.C}, opts);
  at::Tensor y = write_y ? empty_as(x) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastdfd_tap_forward", [&] {
    using A = typename Acc<scalar_t>::type;
    with_activation(write_y ? act : IDENTITY, [&](auto a) {  // without y there is nothing to activate
      with_residual(res, [&](auto r) {
        tap_forward_impl<scalar_t, decltype(a)::value, decltype(r)::value>(
            x.data_ptr<scalar_t>(), write_y ? y.data_ptr<scalar_t>() : nullptr, s1.data_ptr<A>(), s2.data_ptr<A>(),
            mean.data_ptr<A>(), var.data_ptr<A>(), opt_ptr<A>(weight), opt_ptr<A>(bias), g, eps,
            static_cast<A>(slope), res ? residual->data_ptr<scalar_t>() : nullptr);
      });
    });
  });
  return {write_y ? y : at::empty({0}, x.options()), s1, s2};
}

std::vector<at::Tensor> tap_backward(const at::Tensor& x, const c10::optional<at::Tensor>& dy, const at::Tensor& ds1,
                                     const at::Tensor& ds2, const at::Tensor& mean, const at::Tensor& var,
                                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                     double eps, int64_t groups, int64_t sn, int64_t sc, int64_t sp, int64_t act,
                                     double slope, const c10::optional<at::Tensor>& residual) {
  follow_torch_threads();
  const Geometry g = geometry(x, groups, sn, sc, sp);
  if (dy.has_value()) check_like_x(*dy, x, "dy");
  // the residual's gradient dr = dy a'(u) comes from this pass; without dy there is none
  const bool res = dy.has_value() && residual.has_value() && residual->defined();
  if (res) check_like_x(*residual, x, "residual");
  check_stats(ds1, groups * g.C, acc_type(x), "ds1");
  check_stats(ds2, groups * g.C, acc_type(x), "ds2");
  check_stats(mean, g.C, acc_type(x), "mean");
  check_stats(var, g.C, acc_type(x), "var");
  if (weight.has_value()) check_stats(*weight, g.C, acc_type(x), "weight");
  if (bias.has_value()) check_stats(*bias, g.C, acc_type(x), "bias");
  at::Tensor dx = empty_as(x);
  at::Tensor dr = res ? empty_as(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastdfd_tap_backward", [&] {
    using A = typename Acc<scalar_t>::type;
    with_activation(dy.has_value() ? act : IDENTITY, [&](auto a) {  // without dy the activation is not in the graph
      with_residual(res, [&](auto r) {
        tap_backward_impl<scalar_t, decltype(a)::value, decltype(r)::value>(
            x.data_ptr<scalar_t>(), dy.has_value() ? dy->data_ptr<scalar_t>() : nullptr, dx.data_ptr<scalar_t>(),
            ds1.data_ptr<A>(), ds2.data_ptr<A>(), mean.data_ptr<A>(), var.data_ptr<A>(), opt_ptr<A>(weight),
            opt_ptr<A>(bias), g, eps, static_cast<A>(slope), res ? residual->data_ptr<scalar_t>() : nullptr,
            res ? dr.data_ptr<scalar_t>() : nullptr);
      });
    });
  });
  return {dx, dr};
}

// ------------------------------------------------------------------------------ finalize
// Kind ids as KIND_IDS in kernels/moment/layout.py (kl 0, kl_reverse 1, l2 2, mse 3).
enum Kind { KL = 0, KL_REVERSE = 1, L2 = 2, MSE = 3 };

template <typename A>
void finalize_impl(const A* s1, const A* s2, const A* count, const A* var, const A* eps, const int32_t* offsets,
                   int64_t L, int64_t G, int64_t Ct, int kind, const A* dout, A* out, A* ds1, A* ds2) {
  at::parallel_for(0, L * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t lg = begin; lg < end; ++lg) {
      const int64_t l = lg / G, grp = lg % G, lo = offsets[l], hi = offsets[l + 1];
      const A* r1 = s1 + grp * Ct;
      const A* r2 = s2 + grp * Ct;
      double acc1 = 0, acc2 = 0;  // kl terms or sum dv^2; sum d^2
      for (int64_t c = lo; c < hi; ++c) {
        const double d = r1[c] / count[c], vb = r2[c] / count[c] - d * d;
        const double vbe = vb + eps[c], vre = var[c] + eps[c], dv = vb - var[c];
        if (kind == KL) acc1 += 0.5 * std::log(vre / vbe) + (vbe + d * d) / (2 * vre) - 0.5;
        else if (kind == KL_REVERSE) acc1 += 0.5 * std::log(vbe / vre) + (vre + d * d) / (2 * vbe) - 0.5;
        else {
          acc1 += dv * dv;
          acc2 += d * d;
        }
      }
      const double n_dv = std::sqrt(acc1), n_d = std::sqrt(acc2), width = static_cast<double>(hi - lo);
      if (out) {
        double v = acc1;
        if (kind == L2) v = n_dv + n_d;
        if (kind == MSE) v = (acc1 + acc2) / width;
        out[l * G + grp] = static_cast<A>(v);
        continue;
      }
      const double up = dout[l * G + grp];
      for (int64_t c = lo; c < hi; ++c) {
        const double m = count[c], d = r1[c] / m, vb = r2[c] / m - d * d;
        const double vbe = vb + eps[c], vre = var[c] + eps[c], dv = vb - var[c];
        double a, b;  // dD/dd and dD/dvar_b
        if (kind == KL) {
          a = d / vre;
          b = 0.5 * (1 / vre - 1 / vbe);
        } else if (kind == KL_REVERSE) {
          a = d / vbe;
          b = 0.5 / vbe - (vre + d * d) / (2 * vbe * vbe);
        } else if (kind == L2) {
          a = n_d > 0 ? d / n_d : 0;
          b = n_dv > 0 ? dv / n_dv : 0;
        } else {
          a = 2 * d / width;
          b = 2 * dv / width;
        }
        ds1[grp * Ct + c] = static_cast<A>(up * (a - 2 * d * b) / m);
        ds2[grp * Ct + c] = static_cast<A>(up * b / m);
      }
    }
  });
}

void check_finalize(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count, const at::Tensor& var,
                    const at::Tensor& eps, const at::Tensor& offsets) {
  TORCH_CHECK(s1.dim() == 2 && s1.device().is_cpu(), "fastdfd cpp finalize: s1 must be a [G, C_total] CPU tensor");
  const int64_t G = s1.size(0), Ct = s1.size(1);
  const auto acc = s1.scalar_type();
  check_stats(s1, G * Ct, acc, "s1");
  check_stats(s2, G * Ct, acc, "s2");
  check_stats(count, Ct, acc, "count");
  check_stats(var, Ct, acc, "var");
  check_stats(eps, Ct, acc, "eps");
  TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.is_contiguous() && offsets.numel() >= 2,
              "fastdfd cpp finalize: offsets must be a contiguous int32 tensor [L + 1]");
}

at::Tensor finalize_forward(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count,
                            const at::Tensor& var, const at::Tensor& eps, const at::Tensor& offsets,
                            int64_t kind) {
  follow_torch_threads();
  check_finalize(s1, s2, count, var, eps, offsets);
  const int64_t L = offsets.numel() - 1, G = s1.size(0), Ct = s1.size(1);
  at::Tensor out = at::empty({L, G}, s1.options());
  AT_DISPATCH_FLOATING_TYPES(s1.scalar_type(), "fastdfd_finalize_forward", [&] {
    finalize_impl<scalar_t>(s1.data_ptr<scalar_t>(), s2.data_ptr<scalar_t>(), count.data_ptr<scalar_t>(),
                            var.data_ptr<scalar_t>(), eps.data_ptr<scalar_t>(), offsets.data_ptr<int32_t>(), L, G,
                            Ct, static_cast<int>(kind), nullptr, out.data_ptr<scalar_t>(), nullptr, nullptr);
  });
  return out;
}

std::vector<at::Tensor> finalize_backward(const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& count,
                                          const at::Tensor& var, const at::Tensor& eps, const at::Tensor& offsets,
                                          const at::Tensor& dout, int64_t kind) {
  follow_torch_threads();
  check_finalize(s1, s2, count, var, eps, offsets);
  const int64_t L = offsets.numel() - 1, G = s1.size(0), Ct = s1.size(1);
  check_stats(dout, L * G, s1.scalar_type(), "dout");
  at::Tensor ds1 = at::empty_like(s1), ds2 = at::empty_like(s2);
  AT_DISPATCH_FLOATING_TYPES(s1.scalar_type(), "fastdfd_finalize_backward", [&] {
    finalize_impl<scalar_t>(s1.data_ptr<scalar_t>(), s2.data_ptr<scalar_t>(), count.data_ptr<scalar_t>(),
                            var.data_ptr<scalar_t>(), eps.data_ptr<scalar_t>(), offsets.data_ptr<int32_t>(), L, G,
                            Ct, static_cast<int>(kind), dout.data_ptr<scalar_t>(), nullptr, ds1.data_ptr<scalar_t>(),
                            ds2.data_ptr<scalar_t>());
  });
  return {ds1, ds2};
}

}  // namespace fastdfd::moment_cpu

void bind_moment_ops(pybind11::module_& m) {
  using namespace fastdfd::moment_cpu;
  m.def("tap_forward", &tap_forward);
  m.def("tap_backward", &tap_backward);
  m.def("finalize_forward", &finalize_forward);
  m.def("finalize_backward", &finalize_backward);
}
