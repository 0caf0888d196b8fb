// Shared by the CPU sources of every op (csrc/moment/, csrc/generator/): OpenMP thread count.
#pragma once

#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// Called by every entry point before its parallel_for. The extension links the OpenMP runtime by
// its soname (libgomp.so.1), which is the one torch has loaded when torch ships that name. A torch
// build whose runtime has another name (a renamed copy, libiomp5) leaves this extension a second
// runtime, whose thread count would ignore torch.set_num_threads: it is set to torch's here. With
// one runtime this sets what is already set.
inline void follow_torch_threads() {
#ifdef _OPENMP
  omp_set_num_threads(at::get_num_threads());
#endif
}
