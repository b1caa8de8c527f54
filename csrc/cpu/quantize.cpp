// 8-bit block quantization (absmax): the binding of csrc/includes/spd_quant.h.
#include "spd_quant.h"
#include "spd_torch.h"

namespace {

std::vector<at::Tensor> quantize(const at::Tensor& x, int64_t block)
{
    TORCH_CHECK(x.is_cpu() && x.is_contiguous(), "quantize needs a contiguous CPU tensor");
    TORCH_CHECK(block > 0, "block size must be positive");
    const int64_t n = x.numel();
    auto values = at::empty({n}, x.options().dtype(at::kChar));
    auto scales = at::empty({(n + block - 1) / block}, x.options().dtype(at::kFloat));
    bool finite = true;
    const void* src = x.data_ptr();
    int8_t* q = values.data_ptr<int8_t>();
    float* s = scales.data_ptr<float>();
    {
        pybind11::gil_scoped_release no_gil;
        spd::dispatch_dtype(spd::to_dtype(x), [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            finite = spd::quantize_blocks(static_cast<const T*>(src), n, block, q, s,
                                          spd::max_threads());
        });
    }
    TORCH_CHECK(finite, "cannot quantize a tensor with NaN or inf entries");
    return {values, scales};
}

at::Tensor dequantize(const at::Tensor& values, const at::Tensor& scales, int64_t block,
                      at::Tensor out)
{
    TORCH_CHECK(values.is_cpu() && values.scalar_type() == at::kChar && values.is_contiguous(),
                "values must be a contiguous CPU int8 tensor");
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                    scales.numel() == (values.numel() + block - 1) / block,
                "scales must be contiguous float32, one per block");
    TORCH_CHECK(out.is_cpu() && out.is_contiguous() && out.numel() == values.numel(),
                "out must be a contiguous CPU tensor with one element per value");
    const int64_t n = values.numel();
    const int8_t* q = values.data_ptr<int8_t>();
    const float* s = scales.data_ptr<float>();
    void* dst = out.data_ptr();
    {
        pybind11::gil_scoped_release no_gil;
        spd::dispatch_dtype(spd::to_dtype(out), [&](auto* tag) {
            using T = std::remove_pointer_t<decltype(tag)>;
            spd::dequantize_blocks(q, s, n, block, static_cast<T*>(dst), spd::max_threads());
        });
    }
    out.unsafeGetTensorImpl()->bump_version();
    return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    m.def("quantize", &quantize, "int8 values and fp32 absmax scales per block",
          pybind11::arg("x"), pybind11::arg("block_size"));
    m.def("dequantize", &dequantize, "values * scale of their block, into out",
          pybind11::arg("values"), pybind11::arg("scales"), pybind11::arg("block_size"),
          pybind11::arg("out"));
    spd::def_build_info(m);
}
