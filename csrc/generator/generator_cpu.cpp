// The `cpp` backend of the batched generator layer: K generators' 3x3 convolutions on the CPU.
//
// Same contract as kernels/generator/conv.py (the math is stated there and in
// fastdfd/ops/generator/reference.py::conv_layer_reference): generator-major x [K, B, CIN, h, w],
// prologue a = leaky_relu(x * scale + shift), nearest upsample by UP, conv3x3 (pad 1) with
// W[k] [COUT, CIN, 3, 3] (+ bias, tanh), and per-(k, co) sums of the output and its square.
//
// Why not a grouped convolution: oneDNN's grouped convolution is slow at these shapes (few
// channels per group, and COUT = 1..3 at the output layer), and an upsampled input costs 4x
// the FLOPs it needs. Here the upsample is folded into the weights instead (sub-pixel
// decomposition): output pixel (UP*i + p, UP*j + q) only ever sees stored pixels
// (i + off[p][a], j + off[q][b]) through a combined 2x2 kernel, so each of the UP^2 output
// phases is one GEMM over the *low-resolution* input with 4 taps instead of 9 (2.25x fewer
// FLOPs); UP = 1 is the plain 9-tap case.
//
// No im2col either: per generator (ATen parallel_for over K) the activated input is stored
// channels-last on a zero-padded grid [B, h+1, w+1, CIN] (one zero line and column per image
// pad both sides), flattened. On that grid a tap at
// offset (dy, dx) is a constant row shift, so each (phase, tap) is one sgemm that reads a
// contiguous block of rows in place: out_pad[n] += act_pad[n + shift] @ Weff[tap]. The
// outputs at padding rows are computed and dropped (1.1-1.6x the rows; cheaper than writing
// a 4- or 9-times larger im2col matrix). The backward uses the same shifted blocks: the
// weight gradient is act_pad[rows + shift]^T @ g_pad and the input gradient accumulates
// g_pad @ Weff[tap]^T into dact_pad[rows + shift] (g is zero at padding rows, so garbage
// never leaks in); that is the conv's and the upsample's backward in one, followed by the
// prologue's backward.
//
// A narrow output (COUT < kNarrow: the image layer, 1-3 channels) takes another path. There a
// GEMM of N = COUT runs at a few percent of the machine's rate, and the transposes into and out
// of the channels-last grid (CIN values per pixel, for 3 outputs) cost more than the products:
// measured on 2 cores, 64 -> 3 at 32 px, 10 x 25 images, 212-232 ms forward and 468-481 ms backward,
// the generator's slowest layer. The narrow path stays in NCHW: per image, one GEMM
// P = Wall^T @ a, Wall^T [taps * COUT, CIN] every tap's weights stacked and a [CIN, h * w] the
// activated input, gives every tap's product at every pixel; the output is the shifted sum
// out[co, i, j] = sum_t P[t, co, i + dy_t, j + dx_t] over the taps inside the image (outside,
// the zero padding contributes nothing). The backward stacks the shifted output gradient,
// G[t, co, i, j] = g[co, i - dy_t, j - dx_t] (zero outside), and needs two GEMMs per image:
// dWall^T += G @ a^T and da += Wall @ G. The same products, summed in another order (fp32).
#include "generator_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Taps along one axis for output phase p: low-res offset and the 3x3 kernel rows it combines.
struct AxisTaps {
  int n;            // taps per axis: 2 with the x2 upsample, 3 without
  int off[2][3];    // [phase][tap] offset into the stored (low-res) input
  int rows[2][3][2];  // [phase][tap] kernel rows combined (second is -1 if only one)
};

AxisTaps axis_taps(int64_t up) {
  AxisTaps t{};
  if (up == 1) {
    t.n = 3;
    for (int a = 0; a < 3; ++a) {
      t.off[0][a] = a - 1;
      t.rows[0][a][0] = a;
      t.rows[0][a][1] = -1;
    }
    return t;
  }
  // up == 2: u = 2i + p reads u + d - 1 for kernel row d, i.e. stored row floor((2i+p+d-1)/2)
  t.n = 2;
  t.off[0][0] = -1; t.rows[0][0][0] = 0; t.rows[0][0][1] = -1;  // p = 0, d = 0 -> i - 1
  t.off[0][1] = 0;  t.rows[0][1][0] = 1; t.rows[0][1][1] = 2;   // p = 0, d = 1, 2 -> i
  t.off[1][0] = 0;  t.rows[1][0][0] = 0; t.rows[1][0][1] = 1;   // p = 1, d = 0, 1 -> i
  t.off[1][1] = 1;  t.rows[1][1][0] = 2; t.rows[1][1][1] = -1;  // p = 1, d = 2 -> i + 1
  return t;
}

// LeakyReLU and its derivative without a branch: the signs of a generator's activations are a coin toss, and
// the branch that `v > 0 ? v : v * slope` compiled to was mispredicted about half the time (measured: the
// prologue of the 64 -> 3 layer took longer than its GEMMs). Exact: one of the two terms is zero.
inline float leaky(float v, float slope) { return std::max(v, 0.f) + slope * std::min(v, 0.f); }
inline float leaky_slope(float v, float slope) { return v > 0.f ? 1.f : slope; }
// The output epilogue both forward paths share: the bias, the optional tanh, and the pixel's share of its
// channel's sums (double: the sums run over every image of the generator)
inline float epilogue(float v, float bias, bool tanh_out, double& t1, double& t2) {
  v += bias;
  if (tanh_out) v = std::tanh(v);
  t1 += v;
  t2 += double(v) * v;
  return v;
}

// Below this many output channels a layer takes the narrow path (see the top of the file).
constexpr int64_t kNarrow = 16;
// Channels per block of the NCHW <-> channels-last transposes: 16 floats, one 64-byte cache line.
constexpr int64_t kChannelBlock = 16;

struct Geometry {
  int64_t K, B, CIN, COUT, h, w, up, H, W;
  AxisTaps ax;
  int64_t taps() const { return int64_t(ax.n) * ax.n; }
  bool narrow() const { return COUT < kNarrow; }
  // The grid: per image, h + 1 lines of w + 1 columns; line 0 and column 0 hold zeros and
  // serve as the padding on *both* sides (a neighbour past the last column is the next
  // line's column 0; past the last line, the next image's line 0, or the margin).
  int64_t pw() const { return w + 1; }                 // grid line length
  int64_t rows() const { return B * (h + 1) * pw(); }  // rows of the grid
  int64_t margin() const { return pw() + 1; }          // largest |shift|
  int64_t pad_row(int64_t b, int64_t i, int64_t j) const { return (b * (h + 1) + i + 1) * pw() + j + 1; }
  int64_t shift(int p, int a, int q, int bb) const { return ax.off[p][a] * pw() + ax.off[q][bb]; }
};

}  // namespace

// The BLAS that torch links (MKL, OpenBLAS) exports the Fortran sgemm_; ATen's own gemm is
// not exported to extensions. Weak, so a torch without it still loads this extension and
// takes the at::mm path below (hundreds of small GEMMs per call: the dispatcher's overhead
// then shows, but the results are the same).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

// Row-major C[M, N] = op(A) @ op(B) + beta * C; ``ta``/``tb``: the stored matrix is the transpose.
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t Kd, const float* A, int64_t lda, const float* B,
             int64_t ldb, float beta, float* C, int64_t ldc) {
  if (sgemm_ != nullptr) {
    // row-major C = A B is column-major C^T = B^T A^T
    const char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
    const int m = int(N), n = int(M), k = int(Kd), la = int(ldb), lb = int(lda), lc = int(ldc);
    const float one = 1.f;
    sgemm_(&tra, &trb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opts = torch::TensorOptions().dtype(torch::kFloat);
  auto a = ta ? torch::from_blob(const_cast<float*>(A), {Kd, M}, {lda, 1}, opts).t()
              : torch::from_blob(const_cast<float*>(A), {M, Kd}, {lda, 1}, opts);
  auto b = tb ? torch::from_blob(const_cast<float*>(B), {N, Kd}, {ldb, 1}, opts).t()
              : torch::from_blob(const_cast<float*>(B), {Kd, N}, {ldb, 1}, opts);
  auto c = torch::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == 0.f) {
    c.copy_(torch::mm(a, b));
  } else {
    c.addmm_(a, b);
  }
}

Geometry geometry(const torch::Tensor& x, const torch::Tensor& weight, int64_t up) {
  TORCH_CHECK(up == 1 || up == 2, "upsample must be 1 or 2, got ", up);
  TORCH_CHECK(x.dim() == 5 && weight.dim() == 5 && weight.size(3) == 3 && weight.size(4) == 3,
              "expected x [K, B, CIN, h, w] and weight [K, COUT, CIN, 3, 3]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat,
              "the cpp generator kernels take fp32");
  Geometry g{x.size(0), x.size(1), x.size(2), weight.size(1), x.size(3), x.size(4), up,
             x.size(3) * up, x.size(4) * up, axis_taps(up)};
  TORCH_CHECK(weight.size(0) == g.K && weight.size(2) == g.CIN, "weight does not match x");
  return g;
}

// prologue of generator k into the padded channels-last grid act [margin + rows + margin, CIN]
// (everything outside the image stays zero: the conv's zero padding, after the activation)
void activate(const Geometry& g, const float* x, const float* scale, const float* shift, double slope, float* act) {
  // a transpose (NCHW planes -> channels-last rows), in blocks of kChannelBlock channels so that each
  // write fills whole cache lines of the grid instead of one float per line
  const int64_t hw = g.h * g.w;
  const float sl = float(slope);
  float* grid = act + g.margin() * g.CIN;
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t c0 = 0; c0 < g.CIN; c0 += kChannelBlock) {
      const int64_t c1 = std::min(g.CIN, c0 + kChannelBlock);
      for (int64_t i = 0; i < g.h; ++i) {
        const float* src = x + (b * g.CIN) * hw + i * g.w;
        float* dst = grid + g.pad_row(b, i, 0) * g.CIN;
        for (int64_t j = 0; j < g.w; ++j) {
          for (int64_t c = c0; c < c1; ++c) {
            const float xv = src[c * hw + j];
            if (scale == nullptr) {
              dst[j * g.CIN + c] = xv;
            } else {
              const float v = xv * scale[c] + shift[c];
              dst[j * g.CIN + c] = leaky(v, sl);
            }
          }
        }
      }
    }
  }
}

// combined weights of phase (p, q): weff [taps * CIN, COUT], row (tap, ci)
void phase_weights(const Geometry& g, const float* wk, int p, int q, float* weff) {
  const int n = g.ax.n;
  for (int a = 0; a < n; ++a) {
    for (int bb = 0; bb < n; ++bb) {
      const int64_t t = a * n + bb;
      for (int64_t ci = 0; ci < g.CIN; ++ci) {
        for (int64_t co = 0; co < g.COUT; ++co) {
          const float* wc = wk + (co * g.CIN + ci) * 9;
          float s = 0.f;
          for (int ri = 0; ri < 2; ++ri) {
            const int r = g.ax.rows[p][a][ri];
            if (r < 0) continue;
            for (int si = 0; si < 2; ++si) {
              const int c = g.ax.rows[q][bb][si];
              if (c >= 0) s += wc[r * 3 + c];
            }
          }
          weff[(t * g.CIN + ci) * g.COUT + co] = s;
        }
      }
    }
  }
}

// the inverse for one tap (a, bb) of phase (p, q): add dweff [CIN, COUT] into dW[k] [COUT, CIN, 3, 3]
void phase_tap_backward(const Geometry& g, const float* dweff, int p, int q, int a, int bb, float* dwk) {
  for (int64_t ci = 0; ci < g.CIN; ++ci) {
    for (int64_t co = 0; co < g.COUT; ++co) {
      const float d = dweff[ci * g.COUT + co];
      float* wc = dwk + (co * g.CIN + ci) * 9;
      for (int ri = 0; ri < 2; ++ri) {
        const int r = g.ax.rows[p][a][ri];
        if (r < 0) continue;
        for (int si = 0; si < 2; ++si) {
          const int c = g.ax.rows[q][bb][si];
          if (c >= 0) wc[r * 3 + c] += d;
        }
      }
    }
  }
}

torch::Tensor contiguous_float(const c10::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() && t->numel() > 0 ? t->contiguous().to(torch::kFloat) : torch::Tensor();
}

// Operands are made contiguous, then addressed by the geometry's sizes: check they have them.
void expect_numel(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(!t.defined() || t.numel() == n, "fastdfd cpp generator: ", what, " has ", t.numel(),
              " values, expected ", n);
}

void expect_shape(const torch::Tensor& t, at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(t.sizes() == shape, "fastdfd cpp generator: ", what, " is ", t.sizes(), ", expected ", shape);
}

}  // namespace

namespace {

// the narrow path's stacked weights: weff [taps * CIN, COUT] (row (tap, ci)) -> wallt [taps * COUT, CIN]
void stack_taps(const Geometry& g, const float* weff, float* wallt) {
  for (int64_t t = 0; t < g.taps(); ++t)
    for (int64_t ci = 0; ci < g.CIN; ++ci)
      for (int64_t co = 0; co < g.COUT; ++co)
        wallt[(t * g.COUT + co) * g.CIN + ci] = weff[(t * g.CIN + ci) * g.COUT + co];
}

// the prologue in NCHW, in place of a transpose: a [B, CIN, h * w] = leaky(x * scale + shift), or x
void activate_nchw(const Geometry& g, const float* x, const float* scale, const float* shift, double slope,
                   float* a) {
  const int64_t hw = g.h * g.w;
  const float sl = float(slope);
  for (int64_t b = 0; b < g.B; ++b) {
    for (int64_t c = 0; c < g.CIN; ++c) {
      const float* src = x + (b * g.CIN + c) * hw;
      float* dst = a + (b * g.CIN + c) * hw;
      if (scale == nullptr) {
        std::copy(src, src + hw, dst);
        continue;
      }
      const float sc = scale[c], sh = shift[c];
      for (int64_t e = 0; e < hw; ++e) {
        const float v = src[e] * sc + sh;
        dst[e] = leaky(v, sl);
      }
    }
  }
}

// The narrow path's forward for generator k (see the top of the file): y [B, COUT, H, W] and the double sums
// of y and y^2 per output channel. Scratch: a [B, CIN, hw], weff, wallt [TC, CIN], prod [TC, hw].
void narrow_forward(const Geometry& g, const float* xk, const float* sck, const float* shk, double slope,
                    const float* wk, const float* bk, bool tanh_out, float* yk, double* a1, double* a2, float* a,
                    float* weff, float* wallt, float* prod) {
  const int64_t hw = g.h * g.w, TC = g.taps() * g.COUT;
  activate_nchw(g, xk, sck, shk, slope, a);
  for (int p = 0; p < g.up; ++p) {
    for (int q = 0; q < g.up; ++q) {
      phase_weights(g, wk, p, q, weff);
      stack_taps(g, weff, wallt);
      for (int64_t b = 0; b < g.B; ++b) {
        gemm_rm(false, false, TC, hw, g.CIN, wallt, g.CIN, a + b * g.CIN * hw, hw, 0.f, prod, hw);
        for (int64_t co = 0; co < g.COUT; ++co) {
          const float bias_v = bk ? bk[co] : 0.f;
          double t1 = 0, t2 = 0;
          for (int64_t i = 0; i < g.h; ++i) {
            float* dst = yk + ((b * g.COUT + co) * g.H + i * g.up + p) * g.W + q;
            for (int64_t j = 0; j < g.w; ++j) {
              float v = 0.f;
              for (int ta = 0; ta < g.ax.n; ++ta) {
                const int64_t ii = i + g.ax.off[p][ta];
                if (ii < 0 || ii >= g.h) continue;
                for (int tb = 0; tb < g.ax.n; ++tb) {
                  const int64_t jj = j + g.ax.off[q][tb];
                  if (jj < 0 || jj >= g.w) continue;
                  v += prod[((ta * g.ax.n + tb) * g.COUT + co) * hw + ii * g.w + jj];
                }
              }
              dst[j * g.up] = epilogue(v, bias_v, tanh_out, t1, t2);
            }
          }
          a1[co] += t1;
          a2[co] += t2;
        }
      }
    }
  }
}

// The narrow path's backward for generator k: dx [B, CIN, h, w], dscale and dshift [CIN] (with a prologue),
// dW[k] accumulated. Scratch: a and da [B, CIN, hw], weff, dweff [CIN, COUT], wallt and dwallt [TC, CIN],
// gsh [TC, hw].
void narrow_backward(const Geometry& g, const float* xk, const float* sck, const float* shk, double slope,
                     const float* wk, const float* tk, const float* dyk, const float* d1k, const float* d2k,
                     bool tanh_out, float* dxk, float* dsck, float* dshk, float* dwk, float* a, float* da,
                     float* weff, float* dweff, float* wallt, float* dwallt, float* gsh) {
  const int64_t hw = g.h * g.w, TC = g.taps() * g.COUT;
  const bool prologue = sck != nullptr;
  activate_nchw(g, xk, sck, shk, slope, a);
  std::fill(da, da + g.B * g.CIN * hw, 0.f);
  for (int p = 0; p < g.up; ++p) {
    for (int q = 0; q < g.up; ++q) {
      phase_weights(g, wk, p, q, weff);
      stack_taps(g, weff, wallt);
      std::fill(dwallt, dwallt + TC * g.CIN, 0.f);
      for (int64_t b = 0; b < g.B; ++b) {
        // gsh[t, co, i', j'] = g[co, i' - dy_t, j' - dx_t], g = (dy + dS1 + 2 y dS2) * tanh' at this phase's pixels
        std::fill(gsh, gsh + TC * hw, 0.f);
        for (int64_t co = 0; co < g.COUT; ++co) {
          const float c1 = d1k[co], c2 = 2.f * d2k[co];
          for (int64_t i = 0; i < g.h; ++i) {
            const int64_t base = ((b * g.COUT + co) * g.H + i * g.up + p) * g.W + q;
            for (int64_t j = 0; j < g.w; ++j) {
              const float tv = tk[base + j * g.up];
              float gv = dyk[base + j * g.up] + c1 + c2 * tv;
              if (tanh_out) gv *= 1.f - tv * tv;
              for (int ta = 0; ta < g.ax.n; ++ta) {
                const int64_t ii = i + g.ax.off[p][ta];
                if (ii < 0 || ii >= g.h) continue;
                for (int tb = 0; tb < g.ax.n; ++tb) {
                  const int64_t jj = j + g.ax.off[q][tb];
                  if (jj < 0 || jj >= g.w) continue;
                  gsh[((ta * g.ax.n + tb) * g.COUT + co) * hw + ii * g.w + jj] = gv;
                }
              }
            }
          }
        }
        const float* ab = a + b * g.CIN * hw;
        gemm_rm(false, true, TC, g.CIN, hw, gsh, hw, ab, hw, 1.f, dwallt, g.CIN);      // dWall^T += G @ a^T
        gemm_rm(true, false, g.CIN, hw, TC, wallt, g.CIN, gsh, hw, 1.f, da + b * g.CIN * hw, hw);  // da += Wall @ G
      }
      for (int ta = 0; ta < g.ax.n; ++ta) {
        for (int tb = 0; tb < g.ax.n; ++tb) {
          const int64_t t = ta * g.ax.n + tb;
          for (int64_t ci = 0; ci < g.CIN; ++ci)
            for (int64_t co = 0; co < g.COUT; ++co) dweff[ci * g.COUT + co] = dwallt[(t * g.COUT + co) * g.CIN + ci];
          phase_tap_backward(g, dweff, p, q, ta, tb, dwk);
        }
      }
    }
  }
  // the prologue's backward, contiguous in NCHW: dv = da * leaky'(v), dx = dv * scale, dscale = sum dv x,
  // dshift = sum dv (one image row in float, rows summed in double)
  for (int64_t c = 0; c < g.CIN; ++c) {
    const float sc = prologue ? sck[c] : 1.f, sh = prologue ? shk[c] : 0.f, sl = prologue ? float(slope) : 1.f;
    double acc_s = 0, acc_b = 0;
    for (int64_t b = 0; b < g.B; ++b) {
      for (int64_t i = 0; i < g.h; ++i) {
        const int64_t off = (b * g.CIN + c) * hw + i * g.w;
        float t_s = 0.f, t_b = 0.f;
        for (int64_t j = 0; j < g.w; ++j) {
          const float xv = xk[off + j];
          const float dv = da[off + j] * leaky_slope(xv * sc + sh, sl);
          dxk[off + j] = dv * sc;
          t_s += dv * xv;
          t_b += dv;
        }
        acc_s += t_s;
        acc_b += t_b;
      }
    }
    if (prologue) {
      dsck[c] = float(acc_s);
      dshk[c] = float(acc_b);
    }
  }
}

}  // namespace

std::vector<torch::Tensor> generator_conv_forward(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& scale_in,
                                                  const c10::optional<torch::Tensor>& shift_in,
                                                  const torch::Tensor& weight_in,
                                                  const c10::optional<torch::Tensor>& bias_in, int64_t up, double slope,
                                                  bool tanh_out) {
  follow_torch_threads();
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const Geometry g = geometry(x, weight, up);
  const auto scale = contiguous_float(scale_in), shift = contiguous_float(shift_in), bias = contiguous_float(bias_in);
  TORCH_CHECK(scale.defined() == shift.defined(), "fastdfd cpp generator: scale and shift come together");
  expect_numel(scale, g.K * g.CIN, "scale");
  expect_numel(shift, g.K * g.CIN, "shift");
  expect_numel(bias, g.K * g.COUT, "bias");
  auto y = torch::empty({g.K, g.B, g.COUT, g.H, g.W}, x.options());
  auto s1 = torch::zeros({g.K, g.COUT}, x.options());
  auto s2 = torch::zeros({g.K, g.COUT}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float *scp = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const float *shp = shift.defined() ? shift.data_ptr<float>() : nullptr;
  const float *bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float *yp = y.data_ptr<float>(), *s1p = s1.data_ptr<float>(), *s2p = s2.data_ptr<float>();
  const int64_t in_size = g.B * g.CIN * g.h * g.w, out_size = g.B * g.COUT * g.H * g.W;
  const int64_t width = g.taps() * g.CIN, act_rows = g.rows() + 2 * g.margin();

  if (g.narrow()) {
    const int64_t hw = g.h * g.w, TC = g.taps() * g.COUT;
    at::parallel_for(0, g.K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<float> a(in_size), weff(width * g.COUT), wallt(TC * g.CIN), prod(TC * hw);
      std::vector<double> a1(g.COUT), a2(g.COUT);
      for (int64_t k = k0; k < k1; ++k) {
        std::fill(a1.begin(), a1.end(), 0.0);
        std::fill(a2.begin(), a2.end(), 0.0);
        narrow_forward(g, xp + k * in_size, scp ? scp + k * g.CIN : nullptr, shp ? shp + k * g.CIN : nullptr, slope,
                       wp + k * g.COUT * g.CIN * 9, bp ? bp + k * g.COUT : nullptr, tanh_out, yp + k * out_size,
                       a1.data(), a2.data(), a.data(), weff.data(), wallt.data(), prod.data());
        for (int64_t co = 0; co < g.COUT; ++co) {
          s1p[k * g.COUT + co] = float(a1[co]);
          s2p[k * g.COUT + co] = float(a2[co]);
        }
      }
    });
    return {y, s1, s2};
  }

  at::parallel_for(0, g.K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> act(act_rows * g.CIN), weff(width * g.COUT), out(g.rows() * g.COUT);
    std::vector<double> a1(g.COUT), a2(g.COUT);
    for (int64_t k = k0; k < k1; ++k) {
      std::fill(act.begin(), act.end(), 0.f);
      activate(g, xp + k * in_size, scp ? scp + k * g.CIN : nullptr, shp ? shp + k * g.CIN : nullptr, slope,
               act.data());
      std::fill(a1.begin(), a1.end(), 0.0);
      std::fill(a2.begin(), a2.end(), 0.0);
      float* yk = yp + k * out_size;
      const float* grid = act.data() + g.margin() * g.CIN;
      for (int p = 0; p < g.up; ++p) {
        for (int q = 0; q < g.up; ++q) {
          phase_weights(g, wp + k * g.COUT * g.CIN * 9, p, q, weff.data());
          for (int a = 0; a < g.ax.n; ++a) {
            for (int bb = 0; bb < g.ax.n; ++bb) {
              const int64_t t = a * g.ax.n + bb;
              gemm_rm(false, false, g.rows(), g.COUT, g.CIN, grid + g.shift(p, a, q, bb) * g.CIN, g.CIN,
                      weff.data() + t * g.CIN * g.COUT, g.COUT, t == 0 ? 0.f : 1.f, out.data(), g.COUT);
            }
          }
          const float* o = out.data();
          for (int64_t b = 0; b < g.B; ++b) {
            for (int64_t co = 0; co < g.COUT; ++co) {
              const float bias_v = bp ? bp[k * g.COUT + co] : 0.f;
              double t1 = 0, t2 = 0;
              for (int64_t i = 0; i < g.h; ++i) {
                float* dst = yk + ((b * g.COUT + co) * g.H + i * g.up + p) * g.W + q;
                const float* src = o + g.pad_row(b, i, 0) * g.COUT + co;
                for (int64_t j = 0; j < g.w; ++j) {
                  dst[j * g.up] = epilogue(src[j * g.COUT], bias_v, tanh_out, t1, t2);
                }
              }
              a1[co] += t1;
              a2[co] += t2;
            }
          }
        }
      }
      for (int64_t co = 0; co < g.COUT; ++co) {
        s1p[k * g.COUT + co] = float(a1[co]);
        s2p[k * g.COUT + co] = float(a2[co]);
      }
    }
  });
  return {y, s1, s2};
}

std::vector<torch::Tensor> generator_conv_backward(const torch::Tensor& x_in, const c10::optional<torch::Tensor>& scale_in,
                                                   const c10::optional<torch::Tensor>& shift_in,
                                                   const torch::Tensor& weight_in, const torch::Tensor& t_in,
                                                   const torch::Tensor& dy_in, const torch::Tensor& ds1_in,
                                                   const torch::Tensor& ds2_in, int64_t up, double slope,
                                                   bool tanh_out) {
  follow_torch_threads();
  const auto x = x_in.contiguous();
  const auto weight = weight_in.contiguous();
  const auto t = t_in.contiguous(), dy = dy_in.contiguous();
  const auto ds1 = ds1_in.contiguous().to(torch::kFloat), ds2 = ds2_in.contiguous().to(torch::kFloat);
  const Geometry g = geometry(x, weight, up);
  const auto scale = contiguous_float(scale_in), shift = contiguous_float(shift_in);
  TORCH_CHECK(scale.defined() == shift.defined(), "fastdfd cpp generator: scale and shift come together");
  expect_numel(scale, g.K * g.CIN, "scale");
  expect_numel(shift, g.K * g.CIN, "shift");
  expect_shape(t, {g.K, g.B, g.COUT, g.H, g.W}, "y");
  expect_shape(dy, {g.K, g.B, g.COUT, g.H, g.W}, "dy");
  TORCH_CHECK(t.scalar_type() == torch::kFloat && dy.scalar_type() == torch::kFloat,
              "fastdfd cpp generator: y and dy must be fp32");
  expect_numel(ds1, g.K * g.COUT, "dS1");
  expect_numel(ds2, g.K * g.COUT, "dS2");
  const bool prologue = scale.defined();
  auto dx = torch::empty_like(x);
  auto dweight = torch::zeros_like(weight);
  auto dscale = prologue ? torch::zeros({g.K, g.CIN}, x.options()) : torch::empty({0}, x.options());
  auto dshift = prologue ? torch::zeros({g.K, g.CIN}, x.options()) : torch::empty({0}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>(), *tp = t.data_ptr<float>(),
              *dyp = dy.data_ptr<float>(), *d1p = ds1.data_ptr<float>(), *d2p = ds2.data_ptr<float>();
  const float *scp = prologue ? scale.data_ptr<float>() : nullptr, *shp = prologue ? shift.data_ptr<float>() : nullptr;
  float *dxp = dx.data_ptr<float>(), *dwp = dweight.data_ptr<float>();
  float *dscp = prologue ? dscale.data_ptr<float>() : nullptr, *dshp = prologue ? dshift.data_ptr<float>() : nullptr;
  const int64_t in_size = g.B * g.CIN * g.h * g.w, out_size = g.B * g.COUT * g.H * g.W, hw = g.h * g.w;
  const int64_t width = g.taps() * g.CIN, act_rows = g.rows() + 2 * g.margin();

  if (g.narrow()) {
    const int64_t TC = g.taps() * g.COUT;
    at::parallel_for(0, g.K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<float> a(in_size), da(in_size), weff(width * g.COUT), dweff(g.CIN * g.COUT), wallt(TC * g.CIN),
          dwallt(TC * g.CIN), gsh(TC * hw);
      for (int64_t k = k0; k < k1; ++k) {
        narrow_backward(g, xp + k * in_size, scp ? scp + k * g.CIN : nullptr, shp ? shp + k * g.CIN : nullptr, slope,
                        wp + k * g.COUT * g.CIN * 9, tp + k * out_size, dyp + k * out_size, d1p + k * g.COUT,
                        d2p + k * g.COUT, tanh_out, dxp + k * in_size, dscp ? dscp + k * g.CIN : nullptr,
                        dshp ? dshp + k * g.CIN : nullptr, dwp + k * g.COUT * g.CIN * 9, a.data(), da.data(),
                        weff.data(), dweff.data(), wallt.data(), dwallt.data(), gsh.data());
      }
    });
    return {dx, dscale, dshift, dweight};
  }

  at::parallel_for(0, g.K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<float> act(act_rows * g.CIN), dact(act_rows * g.CIN), weff(width * g.COUT),
        dweff(g.CIN * g.COUT), gpad(g.rows() * g.COUT);
    std::vector<double> acc_s(g.CIN), acc_b(g.CIN);
    for (int64_t k = k0; k < k1; ++k) {
      const float* xk = xp + k * in_size;
      const float* sck = scp ? scp + k * g.CIN : nullptr;
      const float* shk = shp ? shp + k * g.CIN : nullptr;
      std::fill(act.begin(), act.end(), 0.f);
      std::fill(dact.begin(), dact.end(), 0.f);
      activate(g, xk, sck, shk, slope, act.data());
      const float* grid = act.data() + g.margin() * g.CIN;
      float* dgrid = dact.data() + g.margin() * g.CIN;
      const float *tk = tp + k * out_size, *dyk = dyp + k * out_size;
      float* dwk = dwp + k * g.COUT * g.CIN * 9;
      for (int p = 0; p < g.up; ++p) {
        for (int q = 0; q < g.up; ++q) {
          // the gradient at this phase's output pixels, g = (dy + dS1 + 2 t dS2) * tanh', zero at padding rows
          std::fill(gpad.begin(), gpad.end(), 0.f);
          for (int64_t b = 0; b < g.B; ++b) {
            for (int64_t co = 0; co < g.COUT; ++co) {
              const float a = d1p[k * g.COUT + co], c = 2.f * d2p[k * g.COUT + co];
              for (int64_t i = 0; i < g.h; ++i) {
                const int64_t base = ((b * g.COUT + co) * g.H + i * g.up + p) * g.W + q;
                float* dst = gpad.data() + g.pad_row(b, i, 0) * g.COUT + co;
                for (int64_t j = 0; j < g.w; ++j) {
                  const float tv = tk[base + j * g.up];
                  float gv = dyk[base + j * g.up] + a + c * tv;
                  if (tanh_out) gv *= 1.f - tv * tv;
                  dst[j * g.COUT] = gv;
                }
              }
            }
          }
          phase_weights(g, wp + k * g.COUT * g.CIN * 9, p, q, weff.data());
          for (int a = 0; a < g.ax.n; ++a) {
            for (int bb = 0; bb < g.ax.n; ++bb) {
              const int64_t t = a * g.ax.n + bb, sh = g.shift(p, a, q, bb) * g.CIN;
              // dWeff[t] = act_pad[rows + shift]^T @ g_pad   (into the tap's slice of weff-sized scratch)
              gemm_rm(true, false, g.CIN, g.COUT, g.rows(), grid + sh, g.CIN, gpad.data(), g.COUT, 0.f,
                      dweff.data(), g.COUT);
              phase_tap_backward(g, dweff.data(), p, q, a, bb, dwk);
              // dact_pad[rows + shift] += g_pad @ Weff[t]^T
              gemm_rm(false, true, g.rows(), g.CIN, g.COUT, gpad.data(), g.COUT, weff.data() + t * g.CIN * g.COUT,
                      g.COUT, 1.f, dgrid + sh, g.CIN);
            }
          }
        }
      }
      // the prologue's backward: dv = da * leaky'(v), dx = dv * scale, dscale = sum dv x, dshift = sum dv; the
      // channels-last dact read back into NCHW in blocks of channels (as activate writes it)
      float* dxk = dxp + k * in_size;
      const float sl = prologue ? float(slope) : 1.f;
      std::fill(acc_s.begin(), acc_s.end(), 0.0);
      std::fill(acc_b.begin(), acc_b.end(), 0.0);
      for (int64_t b = 0; b < g.B; ++b) {
        for (int64_t c0 = 0; c0 < g.CIN; c0 += kChannelBlock) {
          const int64_t c1 = std::min(g.CIN, c0 + kChannelBlock);
          for (int64_t i = 0; i < g.h; ++i) {
            const int64_t base = b * g.CIN * hw + i * g.w;
            const float* drow = dgrid + g.pad_row(b, i, 0) * g.CIN;
            float t_s[kChannelBlock] = {}, t_b[kChannelBlock] = {};
            for (int64_t j = 0; j < g.w; ++j) {
              for (int64_t c = c0; c < c1; ++c) {
                const float sc = prologue ? sck[c] : 1.f, sh = prologue ? shk[c] : 0.f;
                const float xv = xk[base + c * hw + j];
                const float d = drow[j * g.CIN + c];
                const float dv = d * leaky_slope(xv * sc + sh, sl);
                dxk[base + c * hw + j] = dv * sc;
                t_s[c - c0] += dv * xv;
                t_b[c - c0] += dv;
              }
            }
            for (int64_t c = c0; c < c1; ++c) {  // one image row in float, rows summed in double
              acc_s[c] += t_s[c - c0];
              acc_b[c] += t_b[c - c0];
            }
          }
        }
      }
      if (prologue) {
        for (int64_t c = 0; c < g.CIN; ++c) {
          dscp[k * g.CIN + c] = float(acc_s[c]);
          dshp[k * g.CIN + c] = float(acc_b[c]);
        }
      }
    }
  });
  return {dx, dscale, dshift, dweight};
}

void bind_generator_ops(pybind11::module_& m) {
  m.def("generator_conv_forward", &generator_conv_forward,
        "K generators' fused prologue + upsample + conv3x3 (+bias, tanh) + output sums (fp32)");
  m.def("generator_conv_backward", &generator_conv_backward, "its backward: dx, dscale, dshift, dweight");
}
