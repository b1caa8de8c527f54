// Torch binding of csrc/cuda/quantize.cu (built only when torch has CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "spd_cuda_ops.h"
#include "spd_torch_dtype.h"

namespace {

std::vector<at::Tensor> quantize(const at::Tensor& x, int64_t block)
{
    TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "quantize needs a contiguous CUDA tensor");
    TORCH_CHECK(block > 0, "block size must be positive");
    const c10::cuda::CUDAGuard guard(x.device());
    const int64_t n = x.numel();
    auto values = at::empty({n}, x.options().dtype(at::kChar));
    auto scales = at::empty({(n + block - 1) / block}, x.options().dtype(at::kFloat));
    auto flags = at::zeros({1}, x.options().dtype(at::kInt));
    const cudaError_t err = spd::cuda::quantize(
        int(spd::to_dtype(x)), x.data_ptr(), n, block, values.data_ptr<int8_t>(),
        scales.data_ptr<float>(), flags.data_ptr<int>(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "quantize kernel: ", cudaGetErrorString(err));
    return {values, scales, flags};  // flags[0] == 1: NaN or inf (checked by the caller)
}

at::Tensor dequantize(const at::Tensor& values, const at::Tensor& scales, int64_t block,
                      at::Tensor out)
{
    TORCH_CHECK(values.is_cuda() && values.scalar_type() == at::kChar && values.is_contiguous(),
                "values must be a contiguous CUDA int8 tensor");
    TORCH_CHECK(scales.is_cuda() && scales.scalar_type() == at::kFloat &&
                    scales.numel() == (values.numel() + block - 1) / block,
                "scales must be float32 on the GPU, one per block");
    TORCH_CHECK(out.is_cuda() && out.is_contiguous() && out.numel() == values.numel(),
                "out must be a contiguous CUDA tensor with one element per value");
    const c10::cuda::CUDAGuard guard(out.device());
    const cudaError_t err = spd::cuda::dequantize(
        int(spd::to_dtype(out)), values.data_ptr<int8_t>(), scales.data_ptr<float>(), values.numel(),
        block, out.data_ptr(), c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "dequantize kernel: ", cudaGetErrorString(err));
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("quantize", &quantize, "int8 values, fp32 scales, NaN flag (CUDA)",
          pybind11::arg("x"), pybind11::arg("block_size"));
    m.def("dequantize", &dequantize, "values * scale of their block, into out (CUDA)",
          pybind11::arg("values"), pybind11::arg("scales"), pybind11::arg("block_size"),
          pybind11::arg("out"));
}
