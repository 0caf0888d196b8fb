// The fastdfd_cpu extension (the `cpp` backend): one module binding every op's CPU kernels,
// csrc/moment/moment_cpu.cpp and csrc/generator/generator_cpu.cpp. Built on first use by
// fastdfd/ops/extensions.py.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu_threads.h"
#include "generator/generator_cpu.h"
#include "moment/moment_cpu.h"

namespace {

// The threads ATen's parallel_for really runs in this extension, for a test: 1 when the file is
// compiled without OpenMP against an OpenMP build of torch, whose parallel_for opens its
// `#pragma omp parallel` inline (the pragma then compiles away, silently).
int64_t parallel_threads_used(int64_t tasks) {
  follow_torch_threads();
  std::vector<std::atomic<bool>> seen(std::max(1, at::get_num_threads()) + 1);  // the last: out of range
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    const auto i = static_cast<size_t>(at::get_thread_num());
    seen[std::min(i, seen.size() - 1)] = true;
  });
  TORCH_CHECK(!seen.back(), "fastdfd cpp: parallel_for ran more threads than at::get_num_threads()");
  return std::count_if(seen.begin(), seen.end(), [](const std::atomic<bool>& b) { return b.load(); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastdfd cpp backend: the fused BN moment tap and finalize, and the batched generator layer, on the CPU";
  bind_moment_ops(m);
  bind_generator_ops(m);
  m.def("parallel_threads_used", &parallel_threads_used);
}
