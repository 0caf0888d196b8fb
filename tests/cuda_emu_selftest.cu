// Kernels that check csrc/cuda_emu/ itself (tests/test_cuda_emulated.py): warp intrinsics
// against CUDA's definitions, atomics, and a barrier part of a block never reaches.
#include <cuda_runtime.h>

namespace cuda_emu_selftest {

// Per thread of a 2-warp block: six intrinsic results.
__global__ void warp_intrinsics(int* out) {
  const int t = threadIdx.x;
  const unsigned full = 0xffffffffu;
  int* o = out + 6 * t;
  o[0] = __shfl_down_sync(full, t, 3);
  o[1] = __shfl_up_sync(full, t, 3, 16);
  o[2] = __shfl_xor_sync(full, t, 5);
  o[3] = __shfl_sync(full, t, 7, 8);
  o[4] = static_cast<int>(__ballot_sync(full, t % 3 == 0));
  o[5] = (__all_sync(full, t < 100) ? 1 : 0) + (__any_sync(full, t == 40) ? 2 : 0);
}

__global__ void atomics(float* sum, int* most) {
  atomicAdd(sum, 0.5f);
  atomicMax(most, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
}

// Half the block leaves before the barrier: undefined on a card, a failed launch here.
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

}  // namespace cuda_emu_selftest

extern "C" int selftest_warp_intrinsics(int* out) {
  cuda_emu_selftest::warp_intrinsics<<<1, 64>>>(out);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int selftest_atomics(float* sum, int* most) {
  cuda_emu_selftest::atomics<<<3, 96>>>(sum, most);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int selftest_divergent_barrier(int* out) {
  cuda_emu_selftest::divergent_barrier<<<1, 32>>>(out);
  return static_cast<int>(cudaGetLastError());
}
