// A small emulation of CUDA's execution model on CPU threads, so the unchanged kernels of
// csrc/*.cu run (and are tested) on a machine without a GPU. See csrc/README.md.
//
// Model: a launch runs its blocks one after another; the threads of a block are real OS
// threads (one std::thread per CUDA thread), so threads of a block interleave as the OS
// schedules them and ThreadSanitizer sees every access. Block and warp barriers are
// mutex + condition variable, which gives TSan the happens-before edges __syncthreads and
// the *_sync intrinsics give on a card; a kernel that leans on an ordering the CUDA model
// does not promise is reported as a race. `__shared__` variables are function statics
// (valid because one block runs at a time).
//
// Not modelled: warp scheduling order and lockstep execution, memory coalescing, caches,
// timing, streams (launches are synchronous), dynamic shared memory, cooperative groups,
// and undefined shared memory at block start: a block sees what the previous one left (the
// statics cannot be found to poison them: GCC drops section attributes on the statics of
// function templates).
//
// Checked as a card or the CUDA model would: the launch limits (block <= 1024 threads,
// block.z <= 64, grid.y/z <= 65535), reported as cudaErrorInvalidConfiguration with
// nothing run; __syncthreads reached by only part of a block (some threads exited, or
// threads wait at different barriers) or a warp intrinsic whose mask names lanes that
// never arrive: the launch fails with cudaErrorLaunchFailure and a message on stderr.
//
// CUDA_EMU_SYNCTHREADS_NOOP (a -D switch) compiles __syncthreads as a no-op: the planted
// race with which the tests show that ThreadSanitizer catches a missing barrier.
#pragma once

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ------------------------------------------------------------------------------ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static

// ------------------------------------------------------------------------------ runtime types
typedef struct CUstream_st* cudaStream_t;

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// Per CUDA thread (each runs on its own OS thread).
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace cuda_emu {

// The runtime keeps the last error per host thread.
inline thread_local cudaError_t last_error = cudaSuccess;
inline std::string last_message;  // why the last failed launch failed (host side only)

// Unwinds a CUDA thread out of a failed launch (another thread hit an error).
struct Abort {};

// A test seam: lowers a kernel's grid-size cap so grid-stride loops run several rounds at
// small shapes (see lower_launches.py); no cap unless a test sets one.
inline int64_t grid_cap_value = 0;
inline int64_t grid_cap(int64_t v) { return grid_cap_value > 0 && v > grid_cap_value ? grid_cap_value : v; }

inline double barrier_timeout_s() {
  const char* s = std::getenv("CUDA_EMU_BARRIER_TIMEOUT_S");
  return s ? std::atof(s) : 60.0;
}

struct Block;

// A generation-counting barrier over the threads that are expected at it. Arrival and the
// reads after release happen under its mutex, so exchanged values need no further sync.
class Barrier {
 public:
  // Called by the emulator only while no thread uses the barrier.
  void reset(int expected) {
    expected_ = expected;
    arrived_ = exited_ = 0;
    site_ = nullptr;
  }

  // Blocks until `expected` threads (the first arriver's count) arrived from the same site.
  // post(parity) runs under the lock on arrival (a non-empty answer fails the launch),
  // read(parity) under the lock after release.
  template <class Post, class Read>
  void sync(Block& b, const char* site, int expected, Post post, Read read);

  // A thread of the block left the kernel (a block barrier waits for every thread).
  void exit_one(Block& b);

  // Wakes every waiter of a failed launch.
  void wake() {
    std::lock_guard<std::mutex> lk(m_);
    cv_.notify_all();
  }

  int arrived() const { return arrived_; }  // under the lock only

  std::mutex m_;

 private:
  std::condition_variable cv_;
  int expected_ = 0, arrived_ = 0, exited_ = 0;
  uint64_t gen_ = 0;
  const char* site_ = nullptr;
};

// One warp's exchange: lane values posted for a shuffle or vote, double-buffered by the
// barrier generation's parity (a lane may post the next value while others still read).
struct Warp {
  Barrier bar;
  int lanes = 32;             // lanes that exist (the last warp of a block may be partial)
  uint32_t mask = 0;          // mask of the current exchange
  uint32_t exited_lanes = 0;  // lanes that left the kernel
  uint64_t slot[2][32] = {};
};

// The state one block's threads share; reused by every block of a launch.
struct Block {
  int nthreads = 0;
  Barrier bar;                     // __syncthreads
  std::unique_ptr<Warp[]> warps;   // one per 32 threads
  int nwarps = 0;
  std::mutex fail_m;
  std::string failure;
  bool failed = false;  // under fail_m; waiters poll it under their barrier's lock after a wake

  bool has_failed() {
    std::lock_guard<std::mutex> lk(fail_m);
    return failed;
  }

  // First failure wins; every waiting thread is woken and unwinds.
  [[noreturn]] void fail(const std::string& why) {
    {
      std::lock_guard<std::mutex> lk(fail_m);
      if (!failed) {
        failed = true;
        failure = "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                  std::to_string(blockIdx.z) + ") thread (" + std::to_string(threadIdx.x) + "," +
                  std::to_string(threadIdx.y) + "," + std::to_string(threadIdx.z) + "): " + why;
      }
    }
    bar.wake();
    for (int w = 0; w < nwarps; ++w) warps[w].bar.wake();
    throw Abort{};
  }
};

inline thread_local Block* this_block = nullptr;
inline thread_local int this_tid = 0;  // linear thread index in the block

template <class Post, class Read>
void Barrier::sync(Block& b, const char* site, int expected, Post post, Read read) {
  std::unique_lock<std::mutex> lk(m_);
  std::string why;
  if (arrived_ == 0) {
    site_ = site;
    expected_ = expected;
  } else if (std::strcmp(site_, site) != 0 || expected_ != expected) {
    why = std::string("threads wait at different barriers: ") + site_ + " and " + site;
  }
  if (why.empty() && exited_ > 0) why = std::string("barrier at ") + site + " reached after threads of the block exited";
  const uint64_t gen = gen_;
  if (why.empty()) why = post(static_cast<int>(gen & 1));
  if (!why.empty()) {
    lk.unlock();
    b.fail(why);
  }
  if (++arrived_ == expected_) {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  } else {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(barrier_timeout_s());
    while (gen_ == gen) {
      if (cv_.wait_until(lk, deadline) == std::cv_status::timeout && gen_ == gen) {
        lk.unlock();
        b.fail(std::string("deadlock: barrier at ") + site + " never completed (divergent threads?)");
      }
      if (gen_ == gen && b.has_failed()) throw Abort{};
    }
  }
  read(static_cast<int>(gen & 1));
}

inline void Barrier::exit_one(Block& b) {
  std::unique_lock<std::mutex> lk(m_);
  ++exited_;
  if (arrived_ > 0) {
    const std::string why = std::string("thread exited while others wait at ") + site_;
    lk.unlock();
    b.fail(why);
  }
}

inline void syncthreads(const char* site) {
#ifndef CUDA_EMU_SYNCTHREADS_NOOP
  Block& b = *this_block;
  b.bar.sync(b, site, b.nthreads, [](int) { return std::string(); }, [](int) {});
#else
  (void)site;
#endif
}

// Every lane named in `mask` posts `v`; after all of them arrived, `read` sees the posts.
template <class Read>
void warp_exchange(const char* site, uint32_t mask, uint64_t v, Read read) {
  Block& b = *this_block;
  const int lane = this_tid & 31;
  Warp& w = b.warps[this_tid >> 5];
  const uint32_t existing = w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
  if (!((mask >> lane) & 1u)) b.fail(std::string("warp intrinsic at ") + site + ": calling lane not in its mask");
  const int expected = __builtin_popcount(mask & existing);
  w.bar.sync(
      b, site, expected,
      [&](int parity) {
        if (w.bar.arrived() == 0) w.mask = mask;
        else if (w.mask != mask) return std::string("warp intrinsic at ") + site + ": lanes pass different masks";
        if (mask & w.exited_lanes) return std::string("warp intrinsic at ") + site + ": mask names exited lanes";
        w.slot[parity][lane] = v;
        return std::string();
      },
      [&](int parity) { read(w.slot[parity], mask & existing); });
}

inline void exit_thread() {
  Block& b = *this_block;
  Warp& w = b.warps[this_tid >> 5];
  const int lane = this_tid & 31;
  b.bar.exit_one(b);
  std::unique_lock<std::mutex> lk(w.bar.m_);
  w.exited_lanes |= 1u << lane;
  if (w.bar.arrived() > 0 && ((w.mask >> lane) & 1u)) {
    lk.unlock();
    b.fail("thread exited while lanes of its warp wait for it at a warp intrinsic");
  }
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled type must fit 64 bits");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <class T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// A read from a lane outside the mask or the block is undefined on a card: poison it.
constexpr uint64_t kUndefined = ~0ull;

template <class T>
T shuffle_from(const char* site, uint32_t mask, T var, int (*src_of)(int lane, int arg, int width), int arg,
               int width) {
  const int lane = this_tid & 31;
  const int src = src_of(lane, arg, width);
  T out = var;
  warp_exchange(site, mask, to_bits(var), [&](const uint64_t* slot, uint32_t named) {
    out = from_bits<T>(src >= 0 && src < 32 && ((named >> src) & 1u) ? slot[src] : kUndefined);
  });
  return out;
}

// Source lanes as CUDA defines them; width splits the warp into independent segments.
inline int src_idx(int lane, int src, int width) { return (lane / width) * width + ((src % width) + width) % width; }
inline int src_down(int lane, int d, int width) { return (lane % width) + d < width ? lane + d : lane; }
inline int src_up(int lane, int d, int width) { return (lane % width) >= d ? lane - d : lane; }
inline int src_xor(int lane, int m, int width) {
  const int s = lane ^ m;
  return s / width == lane / width ? s : lane;
}

inline uint32_t ballot(const char* site, uint32_t mask, int pred) {
  uint32_t out = 0;
  warp_exchange(site, mask, pred ? 1u : 0u, [&](const uint64_t* slot, uint32_t named) {
    for (int l = 0; l < 32; ++l)
      if (((named >> l) & 1u) && slot[l]) out |= 1u << l;
  });
  return out;
}

// ------------------------------------------------------------------------------ launch
// The kernel body runs on nthreads OS threads; each walks the blocks in order (x fastest),
// meeting the others at `block_end` between blocks.
inline cudaError_t run_blocks(dim3 grid, dim3 block, const std::function<void()>& body) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  Block b;
  b.nthreads = n;
  b.nwarps = (n + 31) / 32;
  b.warps.reset(new Warp[b.nwarps]);
  auto reset = [&] {
    b.bar.reset(n);
    for (int w = 0; w < b.nwarps; ++w) {
      b.warps[w].lanes = std::min(32, n - 32 * w);
      b.warps[w].mask = 0;
      b.warps[w].exited_lanes = 0;
      b.warps[w].bar.reset(b.warps[w].lanes);
    }
  };
  reset();
  // Between blocks: the last thread to finish resets the block state, under the lock the
  // others take on release.
  std::mutex end_m;
  std::condition_variable end_cv;
  int end_arrived = 0;
  uint64_t end_gen = 0;
  auto block_end = [&] {
    std::unique_lock<std::mutex> lk(end_m);
    const uint64_t gen = end_gen;
    if (++end_arrived == n) {
      end_arrived = 0;
      ++end_gen;
      reset();
      end_cv.notify_all();
    } else {
      end_cv.wait(lk, [&] { return end_gen != gen; });
    }
  };
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  auto worker = [&](int tid) {
    this_block = &b;
    this_tid = tid;
    threadIdx = {tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
    blockDim = block;
    gridDim = grid;
    for (uint64_t k = 0; k < blocks; ++k) {
      blockIdx = {unsigned(k % grid.x), unsigned((k / grid.x) % grid.y), unsigned(k / (uint64_t(grid.x) * grid.y))};
      try {
        body();
        exit_thread();
      } catch (const Abort&) {
      }
      block_end();
      if (b.has_failed()) break;  // every thread sees the same answer after block_end
    }
    this_block = nullptr;
  };
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (int t = 0; t < n; ++t) threads.emplace_back(worker, t);
  for (auto& t : threads) t.join();
  if (b.failed) {
    last_message = b.failure;
    std::fprintf(stderr, "cuda_emu: launch failed: %s\n", b.failure.c_str());
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

// The limits a card checks at launch; a refused launch runs nothing.
inline const char* config_error(dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) return "empty grid or block";
  if (threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) return "block exceeds 1024 threads";
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) return "grid.y or grid.z exceeds 65535";
  if (smem > 48 * 1024) return "dynamic shared memory exceeds 48 KiB";
  return nullptr;
}

template <class... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <class... A>
  void operator()(A&&... args) const {
    if (const char* why = config_error(grid, block, smem)) {
      last_message = why;
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    const std::tuple<P...> params(std::forward<A>(args)...);  // converted as a kernel call converts
    auto k = kernel;
    const cudaError_t err = run_blocks(grid, block, [&] { std::apply(k, params); });
    if (err != cudaSuccess) last_error = err;
  }
};

// `k<<<grid, block, smem, stream>>>(args)` is lowered (lower_launches.py) to
// `::cuda_emu::launch(k, grid, block, smem, stream)(args)`, as nvcc lowers it to a
// configure-and-call of the runtime.
template <class... P>
Launcher<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, grid, block, smem};
}

}  // namespace cuda_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::last_error;
  cuda_emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return cuda_emu::last_error; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }  // launches are synchronous

// ------------------------------------------------------------------------------ device functions
#define CUDA_EMU_STR2(x) #x
#define CUDA_EMU_STR(x) CUDA_EMU_STR2(x)
#define CUDA_EMU_SITE __FILE__ ":" CUDA_EMU_STR(__LINE__)

#define __syncthreads() ::cuda_emu::syncthreads(CUDA_EMU_SITE)
#define __syncwarp(...) ((void)::cuda_emu::ballot(CUDA_EMU_SITE, ::cuda_emu::mask_or_full(__VA_ARGS__), 0))
#define __shfl_sync(mask, var, src, ...) \
  ::cuda_emu::shuffle_from(CUDA_EMU_SITE, mask, var, ::cuda_emu::src_idx, src, ::cuda_emu::width_or_32(__VA_ARGS__))
#define __shfl_down_sync(mask, var, d, ...) \
  ::cuda_emu::shuffle_from(CUDA_EMU_SITE, mask, var, ::cuda_emu::src_down, d, ::cuda_emu::width_or_32(__VA_ARGS__))
#define __shfl_up_sync(mask, var, d, ...) \
  ::cuda_emu::shuffle_from(CUDA_EMU_SITE, mask, var, ::cuda_emu::src_up, d, ::cuda_emu::width_or_32(__VA_ARGS__))
#define __shfl_xor_sync(mask, var, m, ...) \
  ::cuda_emu::shuffle_from(CUDA_EMU_SITE, mask, var, ::cuda_emu::src_xor, m, ::cuda_emu::width_or_32(__VA_ARGS__))
#define __ballot_sync(mask, pred) ::cuda_emu::ballot(CUDA_EMU_SITE, mask, pred)
#define __any_sync(mask, pred) (::cuda_emu::ballot(CUDA_EMU_SITE, mask, pred) != 0u)
#define __all_sync(mask, pred) (::cuda_emu::ballot(CUDA_EMU_SITE, mask, pred) == ((mask) & ::cuda_emu::existing_lanes()))

namespace cuda_emu {
inline int width_or_32() { return 32; }
inline uint32_t mask_or_full() { return 0xffffffffu; }
inline uint32_t mask_or_full(uint32_t m) { return m; }
inline int width_or_32(int w) { return w; }
inline uint32_t existing_lanes() {
  const int lanes = this_block->warps[this_tid >> 5].lanes;
  return lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
}
}  // namespace cuda_emu

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// CUDA's integer min/max take mixed types; the floating ones are fminf/fmaxf (NaN-ignoring).
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  using T = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<T>::value) return std::fmin(T(a), T(b));
  else return T(b) < T(a) ? T(b) : T(a);
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  using T = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point<T>::value) return std::fmax(T(a), T(b));
  else return T(a) < T(b) ? T(b) : T(a);
}

// Atomics are relaxed on a card; so here (TSan sees them as atomic, with no ordering).
template <class T>
inline T atomicAdd(T* address, T val) {
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
  } else {
    T old, want;
    __atomic_load(address, &old, __ATOMIC_RELAXED);  // the generic form: floats too
    do want = old + val;
    while (!__atomic_compare_exchange(address, &old, &want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
  }
}
// atomicMax / atomicMin: one compare-and-swap loop, replacing the stored value while val beats it
template <class T, class Beats>
inline T atomic_replace_while(T* address, T val, Beats beats) {
  static_assert(std::is_integral<T>::value, "atomicMax / atomicMin take integers");
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (beats(val, old) && !__atomic_compare_exchange_n(address, &old, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class T>
inline T atomicMax(T* address, T val) {
  return atomic_replace_while(address, val, [](T a, T b) { return b < a; });
}
template <class T>
inline T atomicMin(T* address, T val) {
  return atomic_replace_while(address, val, [](T a, T b) { return a < b; });
}
template <class T>
inline T atomicExch(T* address, T val) {
  T old;
  __atomic_exchange(address, &val, &old, __ATOMIC_RELAXED);
  return old;
}
template <class T>
inline T atomicCAS(T* address, T compare, T val) {
  __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
