// Glue shared by the torch bindings of every CPU op.
#pragma once

#include <torch/extension.h>

#include <string>

#include "spd_reduce.h"

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

// What the op was compiled with, for `spd-ext report` and the builder's ISA check.
inline void def_build_info(pybind11::module& m)
{
    m.def("isa", []() { return std::string(vec_isa_name()); }, "vector ISA compiled in");
    m.def("openmp", &built_with_openmp, "whether the op was compiled with OpenMP");
    m.def("max_threads", &max_threads, "OpenMP threads available to the op");
}

}  // namespace spd
