// The cpp backend's batched generator layer (generator_cpu.cpp), bound into the fastdfd_cpu
// extension by moment_tap_cpu.cpp's module definition (one extension, one PYBIND11_MODULE).
#pragma once

#include <torch/extension.h>

void bind_generator_ops(pybind11::module_& m);
