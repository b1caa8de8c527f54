// Torch binding of csrc/cuda/ipc_allreduce.cu (built only when torch has CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <memory>
#include <string>
#include <vector>

#include "spd_cuda_ops.h"
#include "spd_torch_dtype.h"

namespace {

class IpcAllReduceBinding {
public:
    IpcAllReduceBinding(int rank, int world, int64_t capacity)
        : impl_(std::make_shared<spd::cuda::IpcAllReduce>(rank, world, capacity)),
          device_(c10::cuda::current_device())
    {
        TORCH_CHECK(world >= 2 && world <= spd::cuda::kMaxIpcRanks,
                    "the IPC all-reduce takes 2 to ", spd::cuda::kMaxIpcRanks, " ranks, got ",
                    world);
        check(impl_->error(), "allocating the IPC buffer");
    }

    pybind11::bytes handle()
    {
        std::string h = impl_->handle();
        check(impl_->error(), "cudaIpcGetMemHandle");
        return pybind11::bytes(h);
    }

    void open(const std::vector<std::string>& handles)
    {
        check(impl_->open(handles.data()), "cudaIpcOpenMemHandle");
    }

    int64_t capacity() const { return impl_->capacity(); }

    // Registered buffers (collective through the caller: allocate, exchange the handles,
    // open; see spd_ext/comm/cuda_ipc.py).
    int64_t allocate_buffer(int64_t bytes)
    {
        const c10::cuda::CUDAGuard guard(device_);
        int index = -1;
        check(impl_->allocate_buffer(bytes, &index), "allocating a registered IPC buffer");
        return index;
    }

    pybind11::bytes buffer_handle(int64_t index)
    {
        std::string h = impl_->buffer_handle(int(index));
        check(impl_->error(), "cudaIpcGetMemHandle");
        return pybind11::bytes(h);
    }

    void open_buffer(int64_t index, const std::vector<std::string>& handles)
    {
        check(impl_->open_buffer(int(index), handles.data()), "cudaIpcOpenMemHandle");
    }

    // The buffer as a tensor; it keeps the context (and so the mappings) alive.
    at::Tensor buffer(int64_t index, at::IntArrayRef sizes, at::ScalarType dtype)
    {
        void* p = impl_->buffer(int(index));
        TORCH_CHECK(p != nullptr, "no registered IPC buffer ", index);
        const int64_t bytes = c10::multiply_integers(sizes) * int64_t(c10::elementSize(dtype));
        TORCH_CHECK(bytes <= impl_->buffer_bytes(int(index)), "a ", bytes,
                    "-byte tensor does not fit registered buffer ", index, " (",
                    impl_->buffer_bytes(int(index)), " bytes)");
        std::shared_ptr<spd::cuda::IpcAllReduce> keep = impl_;
        return torch::from_blob(p, sizes, [keep](void*) {},
                                at::TensorOptions().dtype(dtype).device(at::kCUDA, device_));
    }

    // op: a spd::ReduceOp code (spd_codes.h); for kWeighted, my_weight is this rank's
    // weight, 1 float on the GPU.
    void all_reduce_(at::Tensor& t, int64_t op, const c10::optional<at::Tensor>& my_weight,
                     double uniform, bool two_shot)
    {
        TORCH_CHECK(t.is_cuda() && t.is_contiguous(),
                    "the IPC all-reduce needs a contiguous CUDA tensor");
        const int dtype = int(spd::to_dtype(t));
        const float* w = nullptr;
        if (op == int64_t(spd::ReduceOp::kWeighted) && my_weight.has_value()) {
            TORCH_CHECK(my_weight->is_cuda() && my_weight->scalar_type() == at::kFloat &&
                            my_weight->numel() == 1,
                        "my_weight must be one float32 on the GPU");
            w = my_weight->data_ptr<float>();
        }
        const c10::cuda::CUDAGuard guard(t.device());
        check(impl_->all_reduce(dtype, t.data_ptr(), t.numel() * t.element_size(), two_shot, w,
                                float(uniform), c10::cuda::getCurrentCUDAStream()),
              "IPC all-reduce");
    }

private:
    static void check(cudaError_t err, const char* what)
    {
        TORCH_CHECK(err == cudaSuccess, what, ": ", cudaGetErrorString(err));
    }

    std::shared_ptr<spd::cuda::IpcAllReduce> impl_;
    c10::DeviceIndex device_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    namespace py = pybind11;
    py::class_<IpcAllReduceBinding>(m, "IpcAllReduce")
        .def(py::init<int, int, int64_t>(), py::arg("rank"), py::arg("world_size"),
             py::arg("capacity"))
        .def("handle", &IpcAllReduceBinding::handle)
        .def("open", &IpcAllReduceBinding::open, py::arg("handles"))
        .def_property_readonly("capacity", &IpcAllReduceBinding::capacity)
        .def("allocate_buffer", &IpcAllReduceBinding::allocate_buffer, py::arg("bytes"))
        .def("buffer_handle", &IpcAllReduceBinding::buffer_handle, py::arg("index"))
        .def("open_buffer", &IpcAllReduceBinding::open_buffer, py::arg("index"),
             py::arg("handles"))
        .def("buffer", &IpcAllReduceBinding::buffer, py::arg("index"), py::arg("sizes"),
             py::arg("dtype"))
        .def("all_reduce_", &IpcAllReduceBinding::all_reduce_, py::arg("tensor"), py::arg("op"),
             py::arg("my_weight"), py::arg("uniform"), py::arg("two_shot"));
}
