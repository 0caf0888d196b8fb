// The cpp backend's moment tap and all-layers finalize (moment_cpu.cpp), bound into the
// fastdfd_cpu extension by csrc/fastdfd_cpu.cpp (one extension, one PYBIND11_MODULE).
#pragma once

#include <torch/extension.h>

#include "../cpu_threads.h"

void bind_moment_ops(pybind11::module_& m);
