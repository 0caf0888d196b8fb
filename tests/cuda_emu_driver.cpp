// C entry points over csrc/moment/moment_cuda.h for tests/test_cuda_emulated.py (ctypes), built
// with the .cu lowered for the CPU emulation (csrc/cuda_emu/). With -DCUDA_EMU_MAIN it is
// also a standalone program for the ThreadSanitizer runs: fwd/bwd/finalize once each.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "cuda_emu.h"
#include "moment_cuda.h"

namespace {
// shape: N, C, P, groups, sn, sc, sp
fastdfd::TapShape tap_shape(const int64_t* v) { return {v[0], v[1], v[2], v[3], v[4], v[5], v[6]}; }
}  // namespace

extern "C" {

int64_t emu_tap_forward_splits(const int64_t* shape, int sm_count) {
  return fastdfd::tap_forward_splits(tap_shape(shape), sm_count);
}

int emu_tap_forward(int dtype, const void* x, void* y, float* part1, float* part2, const float* mean,
                    const float* var, const float* weight, const float* bias, float eps, const int64_t* shape,
                    int64_t splits) {
  return fastdfd::tap_forward(static_cast<fastdfd::DType>(dtype), x, y, part1, part2, mean, var, weight, bias, eps,
                              tap_shape(shape), splits, nullptr);
}

int emu_tap_backward(int dtype, const void* x, const void* dy, void* dx, const float* ds1, const float* ds2,
                     const float* mean, const float* var, const float* weight, float eps, const int64_t* shape) {
  return fastdfd::tap_backward(static_cast<fastdfd::DType>(dtype), x, dy, dx, ds1, ds2, mean, var, weight, eps,
                               tap_shape(shape), nullptr);
}

int emu_finalize_forward(const float* s1, const float* s2, const float* count, const float* var, const float* eps,
                         const int32_t* offsets, int64_t L, int64_t G, int64_t Ct, int kind, float* out) {
  return fastdfd::finalize_forward(s1, s2, count, var, eps, offsets, L, G, Ct, kind, out, nullptr);
}

int emu_finalize_backward(const float* s1, const float* s2, const float* count, const float* var, const float* eps,
                          const int32_t* offsets, int64_t L, int64_t G, int64_t Ct, int kind, const float* dout,
                          float* ds1, float* ds2) {
  return fastdfd::finalize_backward(s1, s2, count, var, eps, offsets, L, G, Ct, kind, dout, ds1, ds2, nullptr);
}

// Lowers the backward's grid-size cap (0: none), so its grid-stride loop runs several rounds.
void emu_set_grid_cap(int64_t cap) { cuda_emu::grid_cap_value = cap; }

const char* emu_last_message() { return cuda_emu::last_message.c_str(); }

}  // extern "C"

#ifdef CUDA_EMU_MAIN
// Small shapes through every kernel once: NCHW and channels_last forwards with y and an
// uneven split, the backward with its grid-stride loop, the finalize both ways (l2: the
// kind that reads the block totals back through shared memory).
int main() {
  int failures = 0;
  auto check = [&](int err, const char* what) {
    if (err != 0) {
      std::fprintf(stderr, "%s: error %d (%s)\n", what, err, cuda_emu::last_message.c_str());
      ++failures;
    }
  };
  const int64_t N = 4, C = 3, P = 70, groups = 2, splits = 3;
  std::vector<float> x(N * C * P), y(x.size()), dx(x.size()), part1(groups * splits * C), part2(part1.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * float(int(i * 37 % 101) - 50);
  std::vector<float> mean(C, 0.1f), var(C, 0.9f), w(C, 1.5f), b(C, -0.2f), ds(groups * C, 0.01f);
  const int64_t nchw[7] = {N, C, P, groups, C * P, P, 1}, cl[7] = {N, C, P, groups, C * P, 1, C};
  for (const int64_t* shape : {nchw, cl}) {
    check(emu_tap_forward(0, x.data(), y.data(), part1.data(), part2.data(), mean.data(), var.data(), w.data(),
                          b.data(), 1e-5f, shape, splits),
          "tap_forward");
    emu_set_grid_cap(1);
    check(emu_tap_backward(0, x.data(), y.data(), dx.data(), ds.data(), ds.data(), mean.data(), var.data(), w.data(),
                           1e-5f, shape),
          "tap_backward");
    emu_set_grid_cap(0);
  }
  // two layers of 5 and 300 channels (300 > 256 threads: the strided channel loop), 2 groups
  const int64_t L = 2, G = 2, Ct = 305;
  const std::vector<int32_t> offsets = {0, 5, 305};
  std::vector<float> s1(G * Ct), s2(G * Ct), count(Ct, 8.f), fvar(Ct, 0.8f), feps(Ct, 1e-5f), out(L * G),
      dout(L * G, 1.f), ds1(G * Ct), ds2(G * Ct);
  for (int64_t i = 0; i < G * Ct; ++i) {
    s1[i] = 0.3f * float(i % 7) - 0.9f;
    s2[i] = 8.f + 0.1f * float(i % 5);
  }
  check(emu_finalize_forward(s1.data(), s2.data(), count.data(), fvar.data(), feps.data(), offsets.data(), L, G, Ct, 2,
                             out.data()),
        "finalize_forward");
  check(emu_finalize_backward(s1.data(), s2.data(), count.data(), fvar.data(), feps.data(), offsets.data(), L, G, Ct,
                              2, dout.data(), ds1.data(), ds2.data()),
        "finalize_backward");
  std::printf("cuda_emu main: %d failed launches; out %g %g %g %g\n", failures, out[0], out[1], out[2], out[3]);
  return failures == 0 ? 0 : 1;
}
#endif
