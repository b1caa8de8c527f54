// A CPU emulation of the part of CUDA that csrc/cuda uses, so the kernels' logic (index
// arithmetic, tails, vector packs, block and warp reductions, the IPC all-reduce's flag
// protocol across processes) runs in tests on machines without a GPU.
//
// Found first on the include path (-I tests/csrc/cuda_emu), this file stands in for
// <cuda_runtime.h>, <cuda_bf16.h> and <cuda_fp16.h>; the .cu files compile unchanged with
// g++ -x c++. What it models:
//   * a kernel launch runs the grid's blocks one after another; the threads of a block are
//     cooperative fibers (ucontext) that switch at __syncthreads, warp shuffles and spin
//     waits (SPD_SPIN_HINT), so a block of 1024 threads costs no OS threads. Running one
//     block at a time is a legal CUDA schedule, and __shared__ can be a function static.
//   * "device memory" is one MAP_SHARED arena created before the test forks its ranks;
//     IPC handles are offsets into it, opened at the same address in every process.
//     cudaIpcOpenMemHandle refuses the caller's own handles and handles it already opened,
//     as CUDA does.
//   * streams are synchronous; launch configurations are checked like CUDA checks them.
// What it cannot model: the GPU's weak memory ordering and real concurrency between
// blocks. Those need the GPU tests (tests/test_cuda.py).
#pragma once

#include <math.h>
#include <sched.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "spd_dtype.h"  // bit casts (csrc/includes is on the include path)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time in a process

struct uint3 {
    unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// ---- runtime types and errors ---------------------------------------------------------

enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorAlreadyMapped = 208,
};
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;
struct cudaIpcMemHandle_t {
    char reserved[64];
};
constexpr unsigned cudaIpcMemLazyEnablePeerAccess = 1;

namespace emu {

inline cudaError_t last_error = cudaSuccess;

inline cudaError_t fail(cudaError_t e)
{
    last_error = e;
    return e;
}

// ---- device memory: a bump allocator in a shared arena ---------------------------------

constexpr uint64_t kArenaMagic = 0x5350444355444145ull;  // "SPDCUDAE"
constexpr size_t kArenaBytes = size_t(1) << 30;  // reserved, committed page by page

struct ArenaHeader {
    std::atomic<uint64_t> next;  // offset of the next allocation
};

struct AllocationHeader {  // 64 bytes before every allocation
    uint64_t magic, bytes, owner_pid, pad[5];
};

inline char* arena()
{
    static char* base = [] {
        void* p = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) std::abort();
        new (p) ArenaHeader{};
        reinterpret_cast<ArenaHeader*>(p)->next = 256;
        return static_cast<char*>(p);
    }();
    return base;
}

inline AllocationHeader* header_of(const void* p)
{
    const char* c = static_cast<const char*>(p);
    if (c < arena() + 256 + sizeof(AllocationHeader) || c >= arena() + kArenaBytes)
        return nullptr;
    auto* h = reinterpret_cast<AllocationHeader*>(const_cast<char*>(c) - sizeof(AllocationHeader));
    return h->magic == kArenaMagic ? h : nullptr;
}

struct HandleBody {
    uint64_t magic, offset, owner_pid;
};

inline std::vector<uint64_t>& opened_offsets()
{
    static std::vector<uint64_t> v;
    return v;
}

// ---- fibers: the threads of one block --------------------------------------------------

constexpr size_t kStackBytes = 64 << 10;

struct Fiber {
    ucontext_t ctx;
    unsigned tid = 0;
    bool done = false;
    const uint64_t* wait_on = nullptr;  // a barrier's generation counter this fiber waits on
    uint64_t wait_gen = 0;              // ... while it still holds this value
};

// A barrier among cooperative fibers: arrivals count up; the last one moves the
// generation on, which wakes the fibers waiting on it.
struct Barrier {
    unsigned arrived = 0;
    uint64_t generation = 0;

    void release()
    {
        arrived = 0;
        ++generation;
    }
};

struct Block {
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
    unsigned current = 0, finished = 0;
    Barrier sync;  // __syncthreads; threads that exited count as arrived
    int or_accum = 0, or_result = 0;
    bool spun = false;
    struct Warp {
        Barrier sync;
        uint64_t slot[32];
    };
    std::vector<Warp> warps;

    void release_sync()  // publishes the OR of the predicates (__syncthreads_or)
    {
        or_result = or_accum;
        or_accum = 0;
        sync.release();
    }
};

inline Block*& running_block()
{
    static Block* b = nullptr;
    return b;
}

inline char* stacks(unsigned count)
{
    static char* base = nullptr;
    static unsigned have = 0;
    if (count > have) {
        if (base != nullptr) munmap(base, size_t(have) * kStackBytes);
        base = static_cast<char*>(mmap(nullptr, size_t(count) * kStackBytes,
                                       PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (base == MAP_FAILED) std::abort();
        have = count;
    }
    return base;
}

// Back to the scheduler; it resumes the fibers round-robin.
inline void yield()
{
    Block& b = *running_block();
    swapcontext(&b.fibers[b.current].ctx, &b.scheduler);
}

// Sleeps until *generation moves past gen (the scheduler skips the fiber until then).
inline void wait_for(const uint64_t* generation, uint64_t gen)
{
    Block& b = *running_block();
    Fiber& f = b.fibers[b.current];
    f.wait_on = generation;
    f.wait_gen = gen;
    while (*generation == gen) yield();
    f.wait_on = nullptr;
}

// Arrives at `barrier`; returns true if this arrival completes it (the caller releases
// it), else sleeps until another does.
inline bool arrive(Barrier& barrier, unsigned expected)
{
    const uint64_t gen = barrier.generation;
    if (++barrier.arrived == expected) return true;
    wait_for(&barrier.generation, gen);
    return false;
}

inline void fiber_entry()
{
    Block& b = *running_block();
    b.body(b.body_arg);
    b.fibers[b.current].done = true;
    ++b.finished;
    // An exited thread counts as arrived: it may complete a barrier the others wait at.
    if (b.sync.arrived > 0 && b.sync.arrived + b.finished == blockDim.x) b.release_sync();
}  // returns to the scheduler through uc_link

inline void run_block(unsigned threads, void (*body)(void*), void* arg)
{
    Block b;
    b.fibers.resize(threads);
    b.warps.resize((threads + 31) / 32);
    b.body = body;
    b.body_arg = arg;
    char* stack = stacks(threads);
    running_block() = &b;
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = b.fibers[t];
        f.tid = t;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stack + size_t(t) * kStackBytes;
        f.ctx.uc_stack.ss_size = kStackBytes;
        f.ctx.uc_link = &b.scheduler;
        makecontext(&f.ctx, fiber_entry, 0);
    }
    while (b.finished < threads) {
        b.spun = false;
        unsigned resumed = 0;
        for (unsigned t = 0; t < threads; ++t) {
            Fiber& f = b.fibers[t];
            if (f.done || (f.wait_on != nullptr && *f.wait_on == f.wait_gen)) continue;
            b.current = t;
            threadIdx = uint3{t, 0, 0};
            ++resumed;
            swapcontext(&b.scheduler, &b.fibers[t].ctx);
        }
        if (resumed == 0) {  // every live thread waits at a barrier the others never reach
            std::fprintf(stderr, "cuda_emu: block %u deadlocked at a barrier\n", blockIdx.x);
            std::abort();
        }
        if (b.spun) sched_yield();  // someone waits on another process: let it run
    }
    running_block() = nullptr;
}

// Cooperative barrier of the whole block; returns the OR of `predicate` over the block.
inline int block_barrier(int predicate)
{
    Block& b = *running_block();
    b.or_accum |= predicate;
    if (arrive(b.sync, blockDim.x - b.finished)) b.release_sync();
    return b.or_result;
}

template <typename T>
T warp_exchange(T v, int source_lane)
{
    static_assert(sizeof(T) <= sizeof(uint64_t), "warp_exchange moves up to 8 bytes");
    Block& b = *running_block();
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    Block::Warp& w = b.warps[warp];
    const unsigned lanes = blockDim.x - warp * 32 < 32 ? blockDim.x - warp * 32 : 32;
    auto sync = [&] {
        if (arrive(w.sync, lanes)) w.sync.release();
    };
    std::memcpy(&w.slot[lane], &v, sizeof(T));
    sync();
    T out;
    std::memcpy(&out, &w.slot[unsigned(source_lane) % lanes], sizeof(T));
    sync();  // nobody overwrites a slot another lane still reads
    return out;
}

template <typename... P>
struct Launch {
    void (*kernel)(P...);
    dim3 grid, block;

    template <typename... A>
    void operator()(A&&... args) const
    {
        if (block.x < 1 || block.x > 1024 || block.y != 1 || block.z != 1 || grid.x < 1 ||
            grid.x > 0x7fffffffu || grid.y != 1 || grid.z != 1) {
            fail(cudaErrorInvalidConfiguration);
            return;
        }
        std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
        struct Call {
            void (*kernel)(P...);
            std::tuple<std::decay_t<P>...>* params;
        } call{kernel, &params};
        gridDim = grid;
        blockDim = block;
        for (unsigned g = 0; g < grid.x; ++g) {
            blockIdx = uint3{g, 0, 0};
            run_block(block.x, [](void* c) {
                Call* call = static_cast<Call*>(c);
                std::apply(call->kernel, *call->params);
            }, &call);
        }
    }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block)
{
    return Launch<P...>{kernel, grid, block};
}

// Number of SMs reported to the kernels' host code (SPD_EMU_SMS, default 6).
inline int sm_count()
{
    const char* s = std::getenv("SPD_EMU_SMS");
    return s != nullptr ? std::atoi(s) : 6;
}

}  // namespace emu

#define SPD_LAUNCH(kernel, grid, threads, stream) \
    (static_cast<void>(stream), ::emu::launch(kernel, grid, threads))
#define SPD_SPIN_HINT()                  \
    do {                                 \
        ::emu::running_block()->spun = true; \
        ::emu::yield();                  \
    } while (0)

// ---- device intrinsics ----------------------------------------------------------------

inline void __syncthreads() { emu::block_barrier(0); }
inline int __syncthreads_or(int predicate) { return emu::block_barrier(predicate != 0); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T>
T __ldg(const T* p)
{
    return *p;
}
template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask)
{
    return emu::warp_exchange(v, int(threadIdx.x % 32) ^ lane_mask);
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline int __float2int_rn(float x) { return int(nearbyintf(x)); }  // ties to even
inline float __int_as_float(int x) { return spd::f32_from_bits(uint32_t(x)); }

// ---- half and bfloat16 -----------------------------------------------------------------

struct __half {
    uint16_t bits;
};
struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __half2float(__half h)
{
    _Float16 f;
    std::memcpy(&f, &h.bits, 2);
    return float(f);
}
inline __half __float2half_rn(float x)
{
    const _Float16 f = static_cast<_Float16>(x);  // round to nearest even
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}
inline float __bfloat162float(__nv_bfloat16 b)
{
    return spd::f32_from_bits(uint32_t(b.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float x)
{
    uint32_t u = spd::f32_bits(x);
    if (isnan(x)) return __nv_bfloat16{uint16_t(0x7fff)};  // CUDA's canonical NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{uint16_t(u >> 16)};
}

// ---- runtime API ------------------------------------------------------------------------

inline const char* cudaGetErrorString(cudaError_t e)
{
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidResourceHandle: return "invalid resource handle";
        case cudaErrorAlreadyMapped: return "resource already mapped";
    }
    return "unknown error";
}

inline cudaError_t cudaGetLastError()
{
    const cudaError_t e = emu::last_error;
    emu::last_error = cudaSuccess;
    return e;
}

inline cudaError_t cudaGetDevice(int* device)
{
    *device = 0;
    return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/)
{
    if (attr != cudaDevAttrMultiProcessorCount) return emu::fail(cudaErrorInvalidValue);
    *value = emu::sm_count();
    return cudaSuccess;
}

inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

template <typename T>
cudaError_t cudaMalloc(T** p, size_t bytes)
{
    char* base = emu::arena();
    auto* arena = reinterpret_cast<emu::ArenaHeader*>(base);
    const uint64_t need = (sizeof(emu::AllocationHeader) + bytes + 255) / 256 * 256;
    const uint64_t at = arena->next.fetch_add(need);
    if (at + need > emu::kArenaBytes) return emu::fail(cudaErrorMemoryAllocation);
    auto* h = reinterpret_cast<emu::AllocationHeader*>(base + at);
    *h = emu::AllocationHeader{emu::kArenaMagic, bytes, uint64_t(getpid()), {}};
    *p = reinterpret_cast<T*>(base + at + sizeof(emu::AllocationHeader));
    return cudaSuccess;
}

inline cudaError_t cudaFree(void* p)
{
    if (p != nullptr && emu::header_of(p) == nullptr) return emu::fail(cudaErrorInvalidValue);
    return cudaSuccess;  // the bump arena never reuses memory
}

inline cudaError_t cudaMemset(void* p, int value, size_t bytes)
{
    std::memset(p, value, bytes);
    return cudaSuccess;
}

inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t = nullptr)
{
    std::memcpy(dst, src, bytes);
    return cudaSuccess;
}

inline cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* handle, void* p)
{
    const emu::AllocationHeader* h = emu::header_of(p);
    if (h == nullptr) return emu::fail(cudaErrorInvalidValue);  // not an allocation's base
    std::memset(handle, 0, sizeof(*handle));
    const emu::HandleBody body{emu::kArenaMagic, uint64_t(static_cast<char*>(p) - emu::arena()),
                               h->owner_pid};
    std::memcpy(handle->reserved, &body, sizeof(body));
    return cudaSuccess;
}

inline cudaError_t cudaIpcOpenMemHandle(void** p, cudaIpcMemHandle_t handle, unsigned)
{
    emu::HandleBody body;
    std::memcpy(&body, handle.reserved, sizeof(body));
    if (body.magic != emu::kArenaMagic || body.offset >= emu::kArenaBytes ||
        emu::header_of(emu::arena() + body.offset) == nullptr)
        return emu::fail(cudaErrorInvalidResourceHandle);
    if (body.owner_pid == uint64_t(getpid())) return emu::fail(cudaErrorInvalidValue);
    for (uint64_t o : emu::opened_offsets())
        if (o == body.offset) return emu::fail(cudaErrorAlreadyMapped);
    emu::opened_offsets().push_back(body.offset);
    *p = emu::arena() + body.offset;
    return cudaSuccess;
}

inline cudaError_t cudaIpcCloseMemHandle(void* p)
{
    auto& v = emu::opened_offsets();
    for (size_t i = 0; i < v.size(); ++i)
        if (emu::arena() + v[i] == p) {
            v.erase(v.begin() + long(i));
            return cudaSuccess;
        }
    return emu::fail(cudaErrorInvalidValue);
}
