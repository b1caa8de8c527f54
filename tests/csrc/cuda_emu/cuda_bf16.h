// See cuda_runtime.h: the CPU emulation of CUDA for tests.
#pragma once
#include "cuda_runtime.h"
