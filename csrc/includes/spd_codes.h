// The codes Python and C++ exchange: element types and reduction ops.
//
// This file is their only definition. spd_ext/ops/codes.py reads these two enums at
// import, so a code changed here changes on both sides (keep each enum on one line in
// the form below, which is what it parses).
#pragma once

#include <cstdint>

namespace spd {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

enum class ReduceOp : int32_t { kSum = 0, kMean = 1, kWeighted = 2 };

}  // namespace spd
