// Framework-free interface of the CUDA moment tap and finalize (csrc/moment/moment_cuda.cu).
//
// Raw pointers, sizes and a cudaStream_t only: the .cu file includes nothing but CUDA's own
// headers, so nvcc compiles it on a machine without a GPU or a CUDA build of torch. The
// torch-facing binding (moment_cuda_binding.cpp) unpacks tensors and calls these.
#pragma once

#include <cstdint>

typedef struct CUstream_st* cudaStream_t;

namespace fastdfd {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// x addressed as [N, C, P] with strides (sn, sc, sp); N split into `groups` segments.
struct TapShape {
  int64_t N, C, P, groups;
  int64_t sn, sc, sp;
};

// Number of position splits per segment the forward will use (partials are [groups, splits, C]).
int64_t tap_forward_splits(const TapShape& s, int sm_count);

// Forward: y (optional, x's dtype and strides) and partial shifted sums part1/part2 [groups, splits, C] (fp32).
// mean/var/weight/bias are fp32 [C]; weight/bias/y may be null.
int tap_forward(DType dtype, const void* x, void* y, float* part1, float* part2, const float* mean, const float* var,
                const float* weight, const float* bias, float eps, const TapShape& s, int64_t splits,
                cudaStream_t stream);

// Backward: dx = dy * w * rsqrt(var + eps) + ds1[g, c] + 2 (x - mean) ds2[g, c]; dy/weight may be null.
int tap_backward(DType dtype, const void* x, const void* dy, void* dx, const float* ds1, const float* ds2,
                 const float* mean, const float* var, const float* weight, float eps, const TapShape& s,
                 cudaStream_t stream);

// All layers at once: kind 0 kl, 1 kl_reverse, 2 l2, 3 mse. s1/s2 [G, Ct]; offsets [L + 1] (int32).
int finalize_forward(const float* s1, const float* s2, const float* count, const float* var, const float* eps,
                     const int32_t* offsets, int64_t L, int64_t G, int64_t Ct, int kind, float* out,
                     cudaStream_t stream);
int finalize_backward(const float* s1, const float* s2, const float* count, const float* var, const float* eps,
                      const int32_t* offsets, int64_t L, int64_t G, int64_t Ct, int kind, const float* dout,
                      float* ds1, float* ds2, cudaStream_t stream);

}  // namespace fastdfd
