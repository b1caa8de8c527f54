// Glue shared by the torch bindings of every CPU op.
#pragma once

#include <torch/extension.h>

#include <string>

#include "spd_reduce.h"
#include "spd_torch_dtype.h"

namespace spd {

// What the op was compiled with, for `spd-ext report` and the builder's ISA check.
inline void def_build_info(pybind11::module& m)
{
    m.def("isa", []() { return std::string(vec_isa_name()); }, "vector ISA compiled in");
    m.def("openmp", &built_with_openmp, "whether the op was compiled with OpenMP");
    m.def("max_threads", &max_threads, "OpenMP threads available to the op");
}

}  // namespace spd
