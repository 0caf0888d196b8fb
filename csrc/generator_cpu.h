// The cpp backend's batched generator layer (generator_cpu.cpp), bound into the fastdfd_cpu
// extension by moment_tap_cpu.cpp's module definition (one extension, one PYBIND11_MODULE).
#pragma once

#include <torch/extension.h>

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

void bind_generator_ops(pybind11::module_& m);
