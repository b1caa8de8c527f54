// All-reduce among the ranks of one node through CUDA IPC (after vLLM's custom
// all-reduce and PyTorch's symmetric-memory one-/two-shot kernels).
//
// Every rank cudaMallocs one buffer: a Signal header followed by `capacity` bytes of
// staging space. Ranks exchange cudaIpcMemHandles once (Python, over the process group)
// and map each other's buffers. A call stages its input into the own buffer (one
// device-to-device copy), then one kernel:
//
//   one-shot: barrier; every rank reads every buffer and reduces into its output; barrier.
//   two-shot: barrier; rank r reduces slice r of every buffer into its own buffer
//             (reduce-scatter); barrier; every rank copies every slice from its owner's
//             buffer (all-gather); barrier.
//
// Registered buffers (allocated here, mapped by every peer once) skip the staging copy:
// the kernel reads the peers' registered copies at the call's offset. Two-shot then works
// in place (each element is written only by the rank that owns its slice, after every
// peer's read of it, or by the reader itself); one-shot reduces into the staging space,
// waits for the end barrier (peers read the input until then) and copies back. Each rank
// publishes which buffer and offset it reduces; if the ranks disagree, all results are NaN.
//
// Barriers are flags without peer atomics: block b of rank r stores the call's flag into
// slot [phase][b][r] of every peer's Signal and spins until its own slots [phase][b][p]
// hold the flag. Only same-index blocks synchronize, so each block touches the same
// element partition (grid-stride from its index) in every phase. The flag is a per-block
// counter in device memory, incremented by the kernel itself, so a captured CUDA graph
// replays correctly. The grid is capped below the SM count so every block is resident.
//
// Each rank contributes weight * x (weight 1 for sum, 1/world for mean, the rank's own
// weight for the weighted op, published in its Signal and read by peers after the first
// barrier), summed in rank order with fmaf: bitwise-identical results on every rank.
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "spd_cuda.cuh"
#include "spd_cuda_ops.h"

namespace spd {
namespace cuda {

constexpr int kPhases = 3;  // start, middle (two-shot), end

struct alignas(128) Signal {
    uint32_t flags[kPhases][kMaxIpcBlocks][kMaxIpcRanks];
    uint32_t counter[kMaxIpcBlocks];  // this rank's call count, per block
    float weight[kMaxIpcBlocks];  // this rank's weight for the current call, per block
    uint64_t source[kMaxIpcBlocks];  // which buffer and offset it reduces (0: staging)
};

struct Peers {
    char* buffer[kMaxIpcRanks];  // the data every rank contributes this call
    Signal* signal[kMaxIpcRanks];
};

__device__ __forceinline__ void barrier(const Peers& peers, int phase, int rank, int world,
                                        uint32_t flag)
{
    __syncthreads();  // this block's writes of the previous phase are issued
    if (int(threadIdx.x) < world) {
        __threadfence_system();  // ... and visible to the peers before they see the flag
        volatile uint32_t* theirs = &peers.signal[threadIdx.x]->flags[phase][blockIdx.x][rank];
        *theirs = flag;
        volatile uint32_t* mine = &peers.signal[rank]->flags[phase][blockIdx.x][threadIdx.x];
        while (*mine != flag) SPD_SPIN_HINT();
    }
    __syncthreads();
}

// Flag of this call for this block (same sequence on every rank); publishes this rank's
// weight and source before any thread of the block raises a flag.
__device__ __forceinline__ uint32_t enter(const Peers& peers, int rank, const float* my_weight,
                                          float uniform, uint64_t source, uint32_t* shared_flag)
{
    if (threadIdx.x == 0) {
        Signal* self = peers.signal[rank];
        *shared_flag = ++self->counter[blockIdx.x];
        self->weight[blockIdx.x] = my_weight != nullptr ? *my_weight : uniform;
        self->source[blockIdx.x] = source;
        __threadfence_system();
    }
    __syncthreads();
    return *shared_flag;
}

template <typename T>
__device__ __forceinline__ void reduce_pack(const Peers& peers, int world, int64_t pack,
                                            T* dst, const float* w)
{
    constexpr int P = Pack<T>::kCount;
    float acc[P];
    const Pack<T> first = load_pack(reinterpret_cast<const T*>(peers.buffer[0]) + pack * P);
#pragma unroll
    for (int v = 0; v < P; ++v) acc[v] = to_float(first.v[v]) * w[0];
    for (int p = 1; p < world; ++p) {
        const Pack<T> x = load_pack(reinterpret_cast<const T*>(peers.buffer[p]) + pack * P);
#pragma unroll
        for (int v = 0; v < P; ++v) acc[v] = fmaf(to_float(x.v[v]), w[p], acc[v]);
    }
    Pack<T> o;
#pragma unroll
    for (int v = 0; v < P; ++v) o.v[v] = from_float<T>(acc[v]);
    store_pack(dst + pack * P, o);
}

// source: what this rank reduces (0 staged, else registered buffer and offset); scratch:
// where a registered one-shot call reduces before copying back into out (else null).
template <typename T>
__global__ void __launch_bounds__(512) ipc_all_reduce(Peers peers, int rank, int world,
                                                      int64_t packs, bool two_shot,
                                                      const float* my_weight, float uniform,
                                                      uint64_t source, T* scratch, T* out)
{
    constexpr int P = Pack<T>::kCount;
    __shared__ uint32_t flag_slot;
    __shared__ float w[kMaxIpcRanks];
    __shared__ int disagree;
    const uint32_t flag = enter(peers, rank, my_weight, uniform, source, &flag_slot);
    barrier(peers, 0, rank, world, flag);
    if (threadIdx.x == 0) disagree = 0;
    __syncthreads();
    if (int(threadIdx.x) < world) {
        const volatile Signal* peer = peers.signal[threadIdx.x];
        w[threadIdx.x] = peer->weight[blockIdx.x];
        if (peer->source[blockIdx.x] != source) disagree = 1;
    }
    __syncthreads();
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (disagree) {  // every rank sees the same sources, so all take this branch
        Pack<T> nan;
#pragma unroll
        for (int v = 0; v < P; ++v) nan.v[v] = from_float<T>(__int_as_float(0x7fc00000));
        for (int64_t i = first; i < packs; i += stride) store_pack(out + i * P, nan);
    } else if (!two_shot) {
        T* dst = scratch != nullptr ? scratch : out;
        for (int64_t i = first; i < packs; i += stride) reduce_pack(peers, world, i, dst, w);
    } else {
        const int64_t per = (packs + world - 1) / world;
        const int64_t lo = per * rank, hi = lo + per < packs ? lo + per : packs;
        T* own = reinterpret_cast<T*>(peers.buffer[rank]);
        for (int64_t i = lo + first; i < hi; i += stride) reduce_pack(peers, world, i, own, w);
        barrier(peers, 1, rank, world, flag);
        for (int p = 0; p < world; ++p) {
            const T* src = reinterpret_cast<const T*>(peers.buffer[p]);
            if (src == out) continue;  // registered, in place: own slice already holds it
            const int64_t plo = per * p, phi = plo + per < packs ? plo + per : packs;
            for (int64_t i = plo + first; i < phi; i += stride)
                store_pack(out + i * P, load_pack(src + i * P));
        }
    }
    barrier(peers, 2, rank, world, flag);  // nobody writes what a peer still reads
    if (scratch != nullptr && !disagree && !two_shot)
        for (int64_t i = first; i < packs; i += stride)
            store_pack(out + i * P, load_pack(scratch + i * P));
}

struct Registered {
    char* own = nullptr;
    int64_t bytes = 0;
    char* peer[kMaxIpcRanks] = {};
    bool opened = false;
};

struct IpcAllReduce::State {
    int rank = 0, world = 0, blocks = 0;
    int64_t capacity = 0;
    char* base = nullptr;  // own allocation: Signal, then staging space
    Peers peers{};
    std::vector<Registered> registered;
    std::map<std::string, char*> mapped;  // peer handle -> its mapping (CUDA maps one once)

    cudaError_t map(const std::string& handle, char** base)
    {
        auto it = mapped.find(handle);
        if (it != mapped.end()) {
            *base = it->second;
            return cudaSuccess;
        }
        cudaIpcMemHandle_t h;
        if (handle.size() != sizeof(h)) return cudaErrorInvalidValue;
        std::memcpy(&h, handle.data(), sizeof(h));
        const cudaError_t err = cudaIpcOpenMemHandle(reinterpret_cast<void**>(base), h,
                                                     cudaIpcMemLazyEnablePeerAccess);
        if (err == cudaSuccess) mapped.emplace(handle, *base);
        return err;
    }

    std::string handle_of(void* p, cudaError_t* err)
    {
        cudaIpcMemHandle_t h;
        *err = cudaIpcGetMemHandle(&h, p);
        return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
    }
};

int64_t IpcAllReduce::header_bytes() { return int64_t(sizeof(Signal)); }

IpcAllReduce::IpcAllReduce(int rank, int world, int64_t capacity) : s_(new State)
{
    s_->rank = rank;
    s_->world = world;
    s_->capacity = capacity;
    int device = 0, sms = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    s_->blocks = sms / 2 < kMaxIpcBlocks ? (sms / 2 > 0 ? sms / 2 : 1) : kMaxIpcBlocks;
    error_ = cudaMalloc(reinterpret_cast<void**>(&s_->base), header_bytes() + capacity);
    if (error_ == cudaSuccess) error_ = cudaMemset(s_->base, 0, header_bytes());
    if (error_ == cudaSuccess) error_ = cudaDeviceSynchronize();
}

IpcAllReduce::~IpcAllReduce()
{
    for (auto& [handle, base] : s_->mapped) cudaIpcCloseMemHandle(base);
    for (Registered& r : s_->registered) cudaFree(r.own);
    if (s_->base != nullptr) cudaFree(s_->base);
    delete s_;
}

std::string IpcAllReduce::handle() { return s_->handle_of(s_->base, &error_); }

cudaError_t IpcAllReduce::open(const std::string* handles)
{
    for (int p = 0; p < s_->world; ++p) {
        char* base = s_->base;
        if (p != s_->rank) {
            const cudaError_t err = s_->map(handles[p], &base);
            if (err != cudaSuccess) return err;
        }
        s_->peers.signal[p] = reinterpret_cast<Signal*>(base);
        s_->peers.buffer[p] = base + header_bytes();
    }
    return cudaSuccess;
}

int64_t IpcAllReduce::capacity() const { return s_->capacity; }

cudaError_t IpcAllReduce::allocate_buffer(int64_t bytes, int* index)
{
    if (bytes <= 0) return cudaErrorInvalidValue;
    Registered r;
    r.bytes = bytes;
    const cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&r.own), size_t(bytes));
    if (err != cudaSuccess) return err;
    r.peer[s_->rank] = r.own;
    *index = int(s_->registered.size());
    s_->registered.push_back(r);
    return cudaSuccess;
}

std::string IpcAllReduce::buffer_handle(int index)
{
    if (index < 0 || index >= int(s_->registered.size())) {
        error_ = cudaErrorInvalidValue;
        return std::string();
    }
    return s_->handle_of(s_->registered[size_t(index)].own, &error_);
}

cudaError_t IpcAllReduce::open_buffer(int index, const std::string* handles)
{
    if (index < 0 || index >= int(s_->registered.size())) return cudaErrorInvalidValue;
    Registered& r = s_->registered[size_t(index)];
    for (int p = 0; p < s_->world; ++p) {
        if (p == s_->rank) continue;
        const cudaError_t err = s_->map(handles[p], &r.peer[p]);
        if (err != cudaSuccess) return err;
    }
    r.opened = true;
    return cudaSuccess;
}

void* IpcAllReduce::buffer(int index) const
{
    return index >= 0 && index < int(s_->registered.size()) ? s_->registered[size_t(index)].own
                                                            : nullptr;
}

int64_t IpcAllReduce::buffer_bytes(int index) const
{
    return index >= 0 && index < int(s_->registered.size())
               ? s_->registered[size_t(index)].bytes
               : 0;
}

cudaError_t IpcAllReduce::all_reduce(int dtype, void* data, int64_t bytes, bool two_shot,
                                     const float* my_weight, float uniform, cudaStream_t stream)
{
    if (bytes > s_->capacity || bytes % 16 != 0 || !aligned16(data)) return cudaErrorInvalidValue;
    Peers peers = s_->peers;
    uint64_t source = 0;
    char* scratch = nullptr;
    const char* at = static_cast<const char*>(data);
    for (size_t j = 0; j < s_->registered.size() && source == 0; ++j) {
        const Registered& r = s_->registered[j];
        if (!r.opened || at < r.own || at + bytes > r.own + r.bytes) continue;
        const int64_t offset = at - r.own;
        for (int p = 0; p < s_->world; ++p) peers.buffer[p] = r.peer[p] + offset;
        source = (uint64_t(j + 1) << 40) | uint64_t(offset);
        if (!two_shot) scratch = s_->peers.buffer[s_->rank];
    }
    if (source == 0) {
        const cudaError_t err = cudaMemcpyAsync(s_->peers.buffer[s_->rank], data, size_t(bytes),
                                                cudaMemcpyDeviceToDevice, stream);
        if (err != cudaSuccess) return err;
    }
    const int64_t packs = bytes / 16;
    constexpr int kThreads = 512;
    dispatch_cuda_dtype(dtype, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        SPD_LAUNCH(ipc_all_reduce<T>, s_->blocks, kThreads, stream)(
            peers, s_->rank, s_->world, packs, two_shot, my_weight, uniform, source,
            reinterpret_cast<T*>(scratch), static_cast<T*>(data));
    });
    return cudaGetLastError();
}

}  // namespace cuda
}  // namespace spd
