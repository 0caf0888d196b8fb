// The cpp backend's batched generator layer (generator_cpu.cpp), bound into the fastdfd_cpu
// extension by csrc/fastdfd_cpu.cpp (one extension, one PYBIND11_MODULE).
#pragma once

#include <torch/extension.h>

#include "../cpu_threads.h"

void bind_generator_ops(pybind11::module_& m);
