// Torch binding of csrc/cuda/weighted_reduce.cu (built only when torch has CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "spd_cuda_ops.h"
#include "spd_torch_dtype.h"

namespace {

at::Tensor weighted_reduce(const std::vector<at::Tensor>& xs, const at::Tensor& weights,
                           at::Tensor out)
{
    const int k = int(xs.size());
    TORCH_CHECK(k >= 1 && k <= spd::cuda::kMaxInputs, "the CUDA kernel takes 1 to ",
                spd::cuda::kMaxInputs, " inputs, got ", k);
    TORCH_CHECK(out.is_cuda() && out.is_contiguous(), "out must be a contiguous CUDA tensor");
    TORCH_CHECK(weights.is_cuda() && weights.scalar_type() == at::kFloat &&
                    weights.is_contiguous() && weights.numel() == k,
                "weights must be a contiguous float32 CUDA tensor with one entry per input");
    const c10::cuda::CUDAGuard guard(out.device());
    spd::cuda::InputPtrs in{};
    for (int j = 0; j < k; ++j) {
        TORCH_CHECK(xs[j].device() == out.device() && xs[j].is_contiguous() &&
                        xs[j].scalar_type() == out.scalar_type() && xs[j].numel() == out.numel(),
                    "input ", j, " must be contiguous and shaped, typed and placed like out");
        in.p[j] = xs[j].data_ptr();
    }
    const cudaError_t err = spd::cuda::weighted_reduce(
        int(spd::to_dtype(out)), out.data_ptr(), in, weights.data_ptr<float>(), k, out.numel(),
        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "weighted_reduce kernel: ", cudaGetErrorString(err));
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("weighted_reduce", &weighted_reduce, "out = sum_j weights[j] * xs[j] on CUDA",
          pybind11::arg("xs"), pybind11::arg("weights"), pybind11::arg("out"));
}
