// Host-side entry points of the CUDA kernels (csrc/cuda/*.cu), called by the bindings.
// Plain C++ with CUDA runtime types only: no torch, no device code.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace spd {
namespace cuda {

constexpr int kMaxInputs = 32;

// Input pointers passed by value in the kernel's parameter space (no device array).
struct InputPtrs {
    const void* p[kMaxInputs];
};

// out = sum_j weights[j] * in[j] over n elements; weights: k floats in device memory.
cudaError_t weighted_reduce(int dtype, void* out, const InputPtrs& in, const float* weights,
                            int k, int64_t n, cudaStream_t stream);

// int8 values and one fp32 absmax scale per block; flags[0] is set to 1 if a block held
// NaN or inf (flags: one int in device memory, zeroed by the caller).
cudaError_t quantize(int dtype, const void* x, int64_t n, int64_t block, int8_t* values,
                     float* scales, int* flags, cudaStream_t stream);
cudaError_t dequantize(int dtype, const int8_t* values, const float* scales, int64_t n,
                       int64_t block, void* out, cudaStream_t stream);

constexpr int kMaxIpcRanks = 8;
constexpr int kMaxIpcBlocks = 36;

// The IPC all-reduce of one process group (see csrc/cuda/ipc_allreduce.cu).
class IpcAllReduce {
public:
    IpcAllReduce(int rank, int world, int64_t capacity);  // allocates; check error()
    ~IpcAllReduce();
    IpcAllReduce(const IpcAllReduce&) = delete;
    IpcAllReduce& operator=(const IpcAllReduce&) = delete;

    cudaError_t error() const { return error_; }
    std::string handle();  // this rank's cudaIpcMemHandle_t, as bytes
    cudaError_t open(const std::string* handles);  // every rank's handle, in rank order
    int64_t capacity() const;
    static int64_t header_bytes();

    // Registered buffers: IPC memory the peers map once, so all-reduces of data inside it
    // read the peers' copies directly (no staging copy; fixed addresses, so a captured CUDA
    // graph replays them). Collective through the caller: every rank allocates the same
    // size, the callers exchange buffer_handle(index), then every rank opens the others'.
    cudaError_t allocate_buffer(int64_t bytes, int* index);
    std::string buffer_handle(int index);  // sets error()
    cudaError_t open_buffer(int index, const std::string* handles);  // rank order
    void* buffer(int index) const;
    int64_t buffer_bytes(int index) const;

    // In place on `data` (16-byte aligned, bytes a multiple of 16, <= capacity). Each
    // rank's contribution is scaled by *my_weight (device) or, if null, by `uniform`.
    // Data inside an opened registered buffer must sit at the same offset on every rank;
    // if the ranks disagree (registered on some ranks only, other offsets), every rank's
    // result is NaN rather than a wrong sum.
    cudaError_t all_reduce(int dtype, void* data, int64_t bytes, bool two_shot,
                           const float* my_weight, float uniform, cudaStream_t stream);

private:
    struct State;
    State* s_;
    cudaError_t error_ = cudaSuccess;
};

}  // namespace cuda
}  // namespace spd
