// weighted_reduce: out = sum_j w_j * x_j in one pass over memory.
//
// The Python wrapper (spd_ext/ops/weighted_reduce.py) validates arguments and builds
// the weights tensor; these checks only guard the raw-pointer kernel.
#include <vector>

#include "spd_torch.h"

namespace {

at::Tensor weighted_reduce(const std::vector<at::Tensor>& xs, const std::vector<float>& weights,
                           at::Tensor out)
{
    TORCH_CHECK(!xs.empty(), "weighted_reduce needs at least one input");
    TORCH_CHECK(weights.size() == xs.size(), "weighted_reduce needs one weight per input");
    const spd::DType dtype = spd::to_dtype(out);
    std::vector<const void*> ptrs(xs.size());
    for (size_t j = 0; j < xs.size(); ++j) {
        TORCH_CHECK(xs[j].is_cpu() && xs[j].is_contiguous() &&
                        xs[j].scalar_type() == out.scalar_type() &&
                        xs[j].numel() == out.numel(),
                    "input ", j, " must be a contiguous CPU tensor shaped and typed like out");
        ptrs[j] = xs[j].data_ptr();
    }
    TORCH_CHECK(out.is_cpu() && out.is_contiguous(), "out must be a contiguous CPU tensor");
    const int64_t n = out.numel();
    const float* w = weights.data();
    const int k = int(xs.size());
    void* dst = out.data_ptr();
    const int threads = spd::max_threads();
    {
        pybind11::gil_scoped_release no_gil;
        spd::dispatch_dtype(dtype, [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            spd::weighted_reduce(static_cast<T*>(dst),
                                 reinterpret_cast<const T* const*>(ptrs.data()), w, k, n,
                                 threads,
                                 spd::prefer_streaming_stores(n * int64_t(sizeof(T)) * (k + 1)));
        });
    }
    out.unsafeGetTensorImpl()->bump_version();
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("weighted_reduce",
          &weighted_reduce,
          "out = sum_j weights[j] * xs[j] (fp32 accumulation)",
          pybind11::arg("xs"),
          pybind11::arg("weights"),
          pybind11::arg("out"));
    spd::def_build_info(m);
}
