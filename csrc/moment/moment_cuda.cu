// CUDA moment tap and all-layers finalize of fastdfd's `cuda` backend. Framework-free: CUDA
// headers only (see moment_cuda.h); the math is stated in fastdfd/ops/moment/reference.py.
//
// Forward: block (c-tile, g*splits + s) walks its chunk of segment g's N/G*P positions.
//  - rows kernel (NCHW, sp == 1): one channel per block, 256 threads stride along the
//    flattened (n, p) axis, coalesced along p; warp-shuffle + shared-memory block reduction.
//  - channels-last kernel (sc == 1): 32 channels x 8 position lanes per block, coalesced along c.
// Partial sums go to part[g, s, c] (fp32); the binding adds them over s. Deterministic.
// Backward: one grid-stride elementwise pass, index -> (n, c, p) by layout.
#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "moment_cuda.h"

namespace fastdfd {
namespace {

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

constexpr int kRowThreads = 256;
constexpr int kClChannels = 32;
constexpr int kClLanes = 8;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a 1-D block of kRowThreads threads; result valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? smem[lane] : 0.f;
  return warp == 0 ? warp_sum(v) : 0.f;
}

template <typename T>
__global__ void tap_fwd_rows(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ part1,
                             float* __restrict__ part2, const float* __restrict__ mean, const float* __restrict__ var,
                             const float* __restrict__ w, const float* __restrict__ b, float eps, TapShape s,
                             int64_t splits, int64_t chunk) {
  __shared__ float smem[32];
  const int64_t c = blockIdx.x, g = blockIdx.y / splits, k = blockIdx.y % splits;
  const int64_t rows = s.N / s.groups, total = rows * s.P;
  const int64_t lo = k * chunk, hi = min(lo + chunk, total);
  const float mu = mean[c];
  float scale = 0.f, shift = 0.f;
  if (y) {
    scale = rsqrtf(var[c] + eps) * (w ? w[c] : 1.f);
    shift = b ? b[c] : 0.f;
  }
  float a1 = 0.f, a2 = 0.f;
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) {
    const int64_t n = g * rows + j / s.P, p = j % s.P;
    const int64_t off = n * s.sn + c * s.sc + p * s.sp;
    const float d = load_f(x + off) - mu;
    a1 += d;
    a2 += d * d;
    if (y) store_f(y + off, d * scale + shift);
  }
  a1 = block_sum(a1, smem);
  a2 = block_sum(a2, smem);
  if (threadIdx.x == 0) {
    part1[(g * splits + k) * s.C + c] = a1;
    part2[(g * splits + k) * s.C + c] = a2;
  }
}

template <typename T>
__global__ void tap_fwd_cl(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ part1,
                           float* __restrict__ part2, const float* __restrict__ mean, const float* __restrict__ var,
                           const float* __restrict__ w, const float* __restrict__ b, float eps, TapShape s,
                           int64_t splits, int64_t chunk) {
  __shared__ float sh1[kClLanes][kClChannels];
  __shared__ float sh2[kClLanes][kClChannels];
  const int64_t c = blockIdx.x * kClChannels + threadIdx.x;
  const int64_t g = blockIdx.y / splits, k = blockIdx.y % splits;
  const int64_t rows = s.N / s.groups, total = rows * s.P;
  const int64_t lo = k * chunk, hi = min(lo + chunk, total);
  const bool valid = c < s.C;
  const float mu = valid ? mean[c] : 0.f;
  float scale = 0.f, shift = 0.f;
  if (y && valid) {
    scale = rsqrtf(var[c] + eps) * (w ? w[c] : 1.f);
    shift = b ? b[c] : 0.f;
  }
  float a1 = 0.f, a2 = 0.f;
  if (valid) {
    for (int64_t j = lo + threadIdx.y; j < hi; j += kClLanes) {
      const int64_t n = g * rows + j / s.P, p = j % s.P;
      const int64_t off = n * s.sn + p * s.sp + c;
      const float d = load_f(x + off) - mu;
      a1 += d;
      a2 += d * d;
      if (y) store_f(y + off, d * scale + shift);
    }
  }
  sh1[threadIdx.y][threadIdx.x] = a1;
  sh2[threadIdx.y][threadIdx.x] = a2;
  __syncthreads();
  if (threadIdx.y == 0 && valid) {
    float t1 = 0.f, t2 = 0.f;
#pragma unroll
    for (int i = 0; i < kClLanes; ++i) {
      t1 += sh1[i][threadIdx.x];
      t2 += sh2[i][threadIdx.x];
    }
    part1[(g * splits + k) * s.C + c] = t1;
    part2[(g * splits + k) * s.C + c] = t2;
  }
}

template <typename T>
__global__ void tap_bwd(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dx,
                        const float* __restrict__ ds1, const float* __restrict__ ds2, const float* __restrict__ mean,
                        const float* __restrict__ var, const float* __restrict__ w, float eps, TapShape s,
                        bool channels_last) {
  const int64_t numel = s.N * s.C * s.P, rows = s.N / s.groups;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel; i += (int64_t)gridDim.x * blockDim.x) {
    int64_t n, c, p;
    if (channels_last) {
      c = i % s.C;
      const int64_t np = i / s.C;
      n = np / s.P;
      p = np % s.P;
    } else {
      p = i % s.P;
      const int64_t nc = i / s.P;
      c = nc % s.C;
      n = nc / s.C;
    }
    const int64_t off = n * s.sn + c * s.sc + p * s.sp, g = n / rows;
    float v = ds1[g * s.C + c] + 2.f * (load_f(x + off) - mean[c]) * ds2[g * s.C + c];
    if (dy) v += load_f(dy + off) * rsqrtf(var[c] + eps) * (w ? w[c] : 1.f);
    store_f(dx + off, v);
  }
}

// ---------------------------------------------------------------------------------- finalize
__global__ void finalize_kernel(const float* __restrict__ s1, const float* __restrict__ s2,
                                const float* __restrict__ count, const float* __restrict__ var,
                                const float* __restrict__ eps, const int32_t* __restrict__ offsets, int64_t G,
                                int64_t Ct, int kind, const float* __restrict__ dout, float* __restrict__ out,
                                float* __restrict__ ds1, float* __restrict__ ds2) {
  __shared__ float smem[32];
  const int64_t l = blockIdx.x, g = blockIdx.y, lo = offsets[l], hi = offsets[l + 1];
  const float* r1 = s1 + g * Ct;
  const float* r2 = s2 + g * Ct;
  float acc1 = 0.f, acc2 = 0.f;  // kl terms, or sum dv^2 and sum d^2
  for (int64_t c = lo + threadIdx.x; c < hi; c += blockDim.x) {
    const float d = r1[c] / count[c], vb = r2[c] / count[c] - d * d;
    const float vbe = vb + eps[c], vre = var[c] + eps[c], dv = vb - var[c];
    if (kind == 0) acc1 += 0.5f * logf(vre / vbe) + (vbe + d * d) / (2.f * vre) - 0.5f;
    else if (kind == 1) acc1 += 0.5f * logf(vbe / vre) + (vre + d * d) / (2.f * vbe) - 0.5f;
    else {
      acc1 += dv * dv;
      acc2 += d * d;
    }
  }
  __shared__ float total1, total2;
  acc1 = block_sum(acc1, smem);
  acc2 = block_sum(acc2, smem);
  if (threadIdx.x == 0) {
    total1 = acc1;
    total2 = acc2;
  }
  __syncthreads();
  const float n_dv = sqrtf(total1), n_d = sqrtf(total2), width = static_cast<float>(hi - lo);
  if (out) {
    if (threadIdx.x == 0) {
      float v = total1;
      if (kind == 2) v = n_dv + n_d;
      if (kind == 3) v = (total1 + total2) / width;
      out[l * G + g] = v;
    }
    return;
  }
  const float up = dout[l * G + g];
  for (int64_t c = lo + threadIdx.x; c < hi; c += blockDim.x) {
    const float m = count[c], d = r1[c] / m, vb = r2[c] / m - d * d;
    const float vbe = vb + eps[c], vre = var[c] + eps[c], dv = vb - var[c];
    float a, bb;  // dD/dd and dD/dvar_b
    if (kind == 0) {
      a = d / vre;
      bb = 0.5f * (1.f / vre - 1.f / vbe);
    } else if (kind == 1) {
      a = d / vbe;
      bb = 0.5f / vbe - (vre + d * d) / (2.f * vbe * vbe);
    } else if (kind == 2) {
      a = n_d > 0.f ? d / n_d : 0.f;
      bb = n_dv > 0.f ? dv / n_dv : 0.f;
    } else {
      a = 2.f * d / width;
      bb = 2.f * dv / width;
    }
    ds1[g * Ct + c] = up * (a - 2.f * d * bb) / m;
    ds2[g * Ct + c] = up * bb / m;
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool is_channels_last(const TapShape& s) { return s.sc == 1 && s.C > 1; }

int64_t chunk_for(const TapShape& s, int64_t splits) { return cdiv((s.N / s.groups) * s.P, splits); }

template <typename T>
int launch_forward(const void* x, void* y, float* part1, float* part2, const float* mean, const float* var,
                   const float* w, const float* b, float eps, const TapShape& s, int64_t splits, cudaStream_t st) {
  const int64_t chunk = chunk_for(s, splits);
  if (is_channels_last(s)) {
    dim3 grid(cdiv(s.C, kClChannels), s.groups * splits), block(kClChannels, kClLanes);
    tap_fwd_cl<T><<<grid, block, 0, st>>>(static_cast<const T*>(x), static_cast<T*>(y), part1, part2, mean, var, w,
                                          b, eps, s, splits, chunk);
  } else {
    dim3 grid(s.C, s.groups * splits);
    tap_fwd_rows<T><<<grid, kRowThreads, 0, st>>>(static_cast<const T*>(x), static_cast<T*>(y), part1, part2, mean,
                                                  var, w, b, eps, s, splits, chunk);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const void* x, const void* dy, void* dx, const float* ds1, const float* ds2, const float* mean,
                    const float* var, const float* w, float eps, const TapShape& s, cudaStream_t st) {
  const int64_t numel = s.N * s.C * s.P;
  const int64_t blocks = numel == 0 ? 1 : std::min<int64_t>(cdiv(numel, 256), 65535LL * 8);
  tap_bwd<T><<<blocks, 256, 0, st>>>(static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dx), ds1,
                                     ds2, mean, var, w, eps, s, is_channels_last(s));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t tap_forward_splits(const TapShape& s, int sm_count) {
  // enough blocks for ~4 waves over the SMs, never a split smaller than 4 block-widths
  const int64_t tiles = is_channels_last(s) ? cdiv(s.C, kClChannels) : s.C;
  const int64_t total = (s.N / s.groups) * s.P;
  const int64_t want = cdiv(4LL * sm_count, tiles * s.groups);
  const int64_t most = std::max<int64_t>(1, total / (4 * kRowThreads));
  return std::max<int64_t>(1, std::min(want, most));
}

int tap_forward(DType dtype, const void* x, void* y, float* part1, float* part2, const float* mean, const float* var,
                const float* weight, const float* bias, float eps, const TapShape& s, int64_t splits,
                cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return launch_forward<float>(x, y, part1, part2, mean, var, weight, bias, eps, s, splits, stream);
    case DType::Float16:
      return launch_forward<__half>(x, y, part1, part2, mean, var, weight, bias, eps, s, splits, stream);
    case DType::BFloat16:
      return launch_forward<__nv_bfloat16>(x, y, part1, part2, mean, var, weight, bias, eps, s, splits, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int tap_backward(DType dtype, const void* x, const void* dy, void* dx, const float* ds1, const float* ds2,
                 const float* mean, const float* var, const float* weight, float eps, const TapShape& s,
                 cudaStream_t stream) {
  switch (dtype) {
    case DType::Float32:
      return launch_backward<float>(x, dy, dx, ds1, ds2, mean, var, weight, eps, s, stream);
    case DType::Float16:
      return launch_backward<__half>(x, dy, dx, ds1, ds2, mean, var, weight, eps, s, stream);
    case DType::BFloat16:
      return launch_backward<__nv_bfloat16>(x, dy, dx, ds1, ds2, mean, var, weight, eps, s, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int finalize_forward(const float* s1, const float* s2, const float* count, const float* var, const float* eps,
                     const int32_t* offsets, int64_t L, int64_t G, int64_t Ct, int kind, float* out,
                     cudaStream_t stream) {
  finalize_kernel<<<dim3(L, G), 256, 0, stream>>>(s1, s2, count, var, eps, offsets, G, Ct, kind, nullptr, out,
                                                   nullptr, nullptr);
  return static_cast<int>(cudaGetLastError());
}

int finalize_backward(const float* s1, const float* s2, const float* count, const float* var, const float* eps,
                      const int32_t* offsets, int64_t L, int64_t G, int64_t Ct, int kind, const float* dout,
                      float* ds1, float* ds2, cudaStream_t stream) {
  finalize_kernel<<<dim3(L, G), 256, 0, stream>>>(s1, s2, count, var, eps, offsets, G, Ct, kind, dout, nullptr, ds1,
                                                   ds2);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace fastdfd
