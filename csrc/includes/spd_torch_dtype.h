// at::ScalarType -> spd::DType, for every binding (CPU and CUDA).
#pragma once

#include <torch/extension.h>

#include "spd_dtype.h"

namespace spd {

inline DType to_dtype(const at::Tensor& t)
{
    switch (t.scalar_type()) {
        case at::kFloat: return DType::kFloat32;
        case at::kBFloat16: return DType::kBFloat16;
        case at::kHalf: return DType::kFloat16;
        default:
            TORCH_CHECK(false,
                        "spd_ext ops support float32, bfloat16 and float16 tensors, got ",
                        t.scalar_type());
    }
}

}  // namespace spd
