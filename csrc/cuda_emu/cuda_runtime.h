// Stand-in for CUDA's <cuda_runtime.h> under the CPU emulation (csrc/cuda_emu/cuda_emu.h).
// This directory goes first on the include path, so a .cu's own #includes resolve here.
#pragma once
#include "cuda_emu.h"
