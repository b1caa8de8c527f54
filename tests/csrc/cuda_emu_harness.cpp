// C entry points over csrc/cuda, compiled with the CPU emulation of CUDA in cuda_emu/ by
// tests/test_cuda_emulation.py: the kernels' logic runs on machines without a GPU.
//
// "Device" pointers are plain host pointers in the emulation, so the tests pass torch CPU
// tensors straight in. The all-reduce check forks one process per rank; their buffers live
// in the emulation's shared arena and meet through IPC handles as on a GPU.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "spd_cuda.cuh"
#include "spd_cuda_ops.h"

using namespace spd::cuda;

extern "C" {

int spd_emu_weighted_reduce(int dtype, void* out, const void* const* in, const float* w, int k,
                            int64_t n)
{
    InputPtrs ptrs{};
    for (int j = 0; j < k && j < kMaxInputs; ++j) ptrs.p[j] = in[j];
    return int(weighted_reduce(dtype, out, ptrs, w, k, n, nullptr));
}

int spd_emu_quantize(int dtype, const void* x, int64_t n, int64_t block, int8_t* values,
                     float* scales, int* flags)
{
    return int(quantize(dtype, x, n, block, values, scales, flags, nullptr));
}

int spd_emu_dequantize(int dtype, const int8_t* values, const float* scales, int64_t n,
                       int64_t block, void* out)
{
    return int(dequantize(dtype, values, scales, n, block, out, nullptr));
}

}  // extern "C"

namespace {

// ---- the all-reduce check ---------------------------------------------------------------

struct Coordination {  // in the shared arena: what the rank processes exchange
    std::atomic<uint64_t> arrived, generation;
    char handles[kMaxIpcRanks][64];
    // Calls each rank has completed (-1: still setting up), read by the parent's watchdog:
    // it fails the run when none of them moves for the stall window, not when a slow but
    // moving run (a loaded machine) outlasts a fixed total.
    std::atomic<int64_t> calls_done[kMaxIpcRanks];
};

void host_barrier(Coordination* c, int world)
{
    const uint64_t gen = c->generation.load();
    if (c->arrived.fetch_add(1) + 1 == uint64_t(world)) {
        c->arrived = 0;
        c->generation.fetch_add(1);
    } else {
        while (c->generation.load() == gen) sched_yield();
    }
}

// Every rank's IPC handle, in rank order (what the Python layer does with all_gather).
std::vector<std::string> exchange_handles(Coordination* c, int world, int rank,
                                          const std::string& mine)
{
    std::copy(mine.begin(), mine.end(), c->handles[rank]);
    host_barrier(c, world);
    std::vector<std::string> handles;
    for (int p = 0; p < world; ++p) handles.emplace_back(c->handles[p], 64);
    host_barrier(c, world);  // everyone has read the slots before the next exchange
    return handles;
}

uint32_t mix(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    return x ^ (x >> 16);
}

// Rank p's input of call c at element i: never zero, in [-4, 4).
float input_value(int p, int c, int64_t i)
{
    const uint32_t h = mix(uint32_t(i) * 2654435761u ^ mix(uint32_t(c) * 97u + uint32_t(p)));
    const float v = float(h >> 8) / float(1 << 24) * 8.0f - 4.0f;
    return v == 0.0f ? 0.5f : v;
}

float weight_of(int op, int p, int c, int world)
{
    if (op == 0) return 1.0f;
    if (op == 1) return 1.0f / float(world);
    return 0.05f + float((p * 7 + c * 3) % 11) / 10.0f;  // changes every call
}

template <typename T>
T narrow(float x);
template <>
float narrow<float>(float x) { return x; }
template <>
__nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__half narrow<__half>(float x) { return __float2half_rn(x); }

template <typename T>
double unit_roundoff()
{
    if (std::is_same_v<T, float>) return std::ldexp(1.0, -24);
    return std::is_same_v<T, __half> ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
}

uint64_t fnv1a(const void* p, size_t bytes)
{
    uint64_t h = 1469598103934665603ull;
    const unsigned char* c = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < bytes; ++i) h = (h ^ c[i]) * 1099511628211ull;
    return h;
}

// Where each rank's data lives: the staging path, a registered buffer (at an offset, on
// every rank), or a registered buffer on rank 0 only (the ranks disagree: NaN expected).
enum Placement { kStaged = 0, kRegistered = 1, kRegisteredOnRank0 = 2 };

struct Check {
    int world, dtype, op, two_shot, calls, placement;
    int64_t numel, capacity;
    uint64_t* digests;  // [calls][world], in the arena
    double* worst;      // [world]: max |out - ref| / bound seen by each rank
    // For the watchdog's own tests: every rank sleeps pace_us before each call; rank
    // stop_rank stops before call stop_at_call: it pauses for good (stop_exit 0: its peers
    // then spin, as in a hang of the flag protocol) or exits with code stop_exit.
    // stop_rank < 0: nobody stops.
    int64_t pace_us;
    int stop_rank, stop_at_call, stop_exit;
};

// One rank's life: set up, `calls` all-reduces of fresh data, each checked against a float64
// reference; exits 0 (all within the bound), 1 (a wrong value) or 2 (a CUDA error).
template <typename T>
int run_rank(const Check& k, Coordination* coord, int rank)
{
    IpcAllReduce ar(rank, k.world, k.capacity);
    if (ar.error() != cudaSuccess) return 2;
    if (ar.open(exchange_handles(coord, k.world, rank, ar.handle()).data()) != cudaSuccess)
        return 2;
    host_barrier(coord, k.world);  // every rank has mapped its peers

    T* data = nullptr;
    float* my_weight = nullptr;
    if (cudaMalloc(&data, size_t(k.numel) * sizeof(T)) != cudaSuccess) return 2;
    if (k.placement != kStaged) {
        // Two registered buffers (the second is used) and an offset into it: exercises the
        // peers' mappings, the buffer index and the offset.
        for (int b = 0; b < 2; ++b) {
            int index = -1;
            if (ar.allocate_buffer(k.numel * int64_t(sizeof(T)) + 256, &index) != cudaSuccess ||
                index != b)
                return 2;
            const std::string mine = ar.buffer_handle(index);
            if (ar.error() != cudaSuccess) return 2;
            if (ar.open_buffer(index, exchange_handles(coord, k.world, rank, mine).data()) !=
                cudaSuccess)
                return 2;
        }
        if (k.placement == kRegistered || rank == 0)
            data = reinterpret_cast<T*>(static_cast<char*>(ar.buffer(1)) + 48);
    }
    if (cudaMalloc(&my_weight, sizeof(float)) != cudaSuccess) return 2;
    const double u = unit_roundoff<T>();
    double worst = 0.0;
    coord->calls_done[rank] = 0;
    for (int c = 0; c < k.calls; ++c) {
        if (k.pace_us > 0) usleep(useconds_t(k.pace_us));
        if (rank == k.stop_rank && c == k.stop_at_call) {
            if (k.stop_exit != 0) return k.stop_exit;
            for (;;) pause();  // ended by the parent's watchdog
        }
        for (int64_t i = 0; i < k.numel; ++i) data[i] = narrow<T>(input_value(rank, c, i));
        *my_weight = weight_of(k.op, rank, c, k.world);
        const cudaError_t err =
            ar.all_reduce(k.dtype, data, k.numel * int64_t(sizeof(T)), k.two_shot != 0,
                          k.op == 2 ? my_weight : nullptr, weight_of(k.op, rank, c, k.world),
                          nullptr);
        if (err != cudaSuccess) {
            std::fprintf(stderr, "rank %d call %d: %s\n", rank, c, cudaGetErrorString(err));
            return 2;
        }
        for (int64_t i = 0; i < k.numel; ++i) {
            double ref = 0.0, mass = 0.0;
            for (int p = 0; p < k.world; ++p) {
                const double term = double(weight_of(k.op, p, c, k.world)) *
                                    double(spd::cuda::to_float(narrow<T>(input_value(p, c, i))));
                ref += term;
                mass += std::fabs(term);
            }
            // fp32 fma accumulation, then one rounding to T (plus fp16's subnormal spacing).
            const double acc = k.world * std::ldexp(1.0, -23) * mass;
            const double bound = u * (std::fabs(ref) + acc) + acc + std::ldexp(1.0, -25);
            const double got = spd::cuda::to_float(data[i]);
            if (k.placement == kRegisteredOnRank0) {
                if (!std::isnan(got)) {
                    std::fprintf(stderr, "rank %d call %d element %lld: got %.9g, not NaN\n",
                                 rank, c, static_cast<long long>(i), got);
                    return 1;
                }
                continue;
            }
            const double ratio = std::isfinite(got) ? std::fabs(got - ref) / bound : 1e30;
            if (ratio > 1.0) {
                std::fprintf(stderr, "rank %d call %d element %lld: got %.9g, expected %.9g\n",
                             rank, c, static_cast<long long>(i), got, ref);
                k.worst[rank] = ratio;
                return 1;
            }
            worst = std::max(worst, ratio);
        }
        k.digests[int64_t(c) * k.world + rank] = fnv1a(data, size_t(k.numel) * sizeof(T));
        coord->calls_done[rank] = c + 1;
    }
    k.worst[rank] = worst;
    host_barrier(coord, k.world);  // nobody tears down while a peer still reads its buffer
    return 0;
}

std::string exit_story(int rank, int status)
{
    if (WIFSIGNALED(status))
        return "rank " + std::to_string(rank) + " died of signal " +
               std::to_string(WTERMSIG(status)) + "; ";
    if (WEXITSTATUS(status) == 0) return "";
    return "rank " + std::to_string(rank) + " exited " + std::to_string(WEXITSTATUS(status)) +
           (WEXITSTATUS(status) == 1 ? " (a value outside the bound)" : " (a CUDA error)") +
           "; ";
}

// Waits for the rank processes and returns what went wrong ("" when every rank passed). A
// deadline on the whole run would fail a slow run on a loaded machine (4 ranks sharing 2
// busy cores take minutes), so the watchdog fails the run only when no rank completes a
// call for `stall_s` seconds (a hang: a missed flag spins forever), or past `limit_s` in
// all, naming each rank's count of completed calls. A rank that fails stops the others
// at once: they would wait for it forever.
std::string watch_ranks(const std::vector<pid_t>& pids, Coordination* coord, int world,
                        double stall_s, double limit_s)
{
    using clock = std::chrono::steady_clock;
    const auto seconds_since = [](clock::time_point t) {
        return std::chrono::duration<double>(clock::now() - t).count();
    };
    const auto start = clock::now();
    auto moved = start;
    int64_t seen = -1;  // the sum of the ranks' counts: it grows with every call
    std::vector<bool> exited(size_t(world), false);
    int running = world;
    std::string problems, why;
    while (running > 0 && problems.empty()) {
        for (int r = 0; r < world; ++r) {
            int status = 0;
            if (exited[size_t(r)] || waitpid(pids[size_t(r)], &status, WNOHANG) <= 0) continue;
            exited[size_t(r)] = true;
            --running;
            problems += exit_story(r, status);
        }
        int64_t sum = 0;
        for (int r = 0; r < world; ++r) sum += coord->calls_done[r].load();
        if (sum != seen) {
            seen = sum;
            moved = clock::now();
        }
        if (running == 0 || !problems.empty()) break;
        char buf[160];
        if (seconds_since(moved) > stall_s)
            std::snprintf(buf, sizeof(buf), "no rank completed a call for %g s (a hang)",
                          stall_s);
        else if (seconds_since(start) > limit_s)
            std::snprintf(buf, sizeof(buf), "still running after %g s in all (the limit)",
                          limit_s);
        else {
            usleep(20000);
            continue;
        }
        why = buf;
        why += "; calls completed by rank:";
        for (int r = 0; r < world; ++r)
            why += " " + std::to_string(r) + ": " +
                   std::to_string(coord->calls_done[r].load()) + (r + 1 < world ? "," : "");
        break;
    }
    if (running > 0) {
        for (int r = 0; r < world; ++r)
            if (!exited[size_t(r)]) kill(pids[size_t(r)], SIGKILL);
        for (int r = 0; r < world; ++r)
            if (!exited[size_t(r)]) waitpid(pids[size_t(r)], nullptr, 0);
        if (why.empty()) why = "the ranks still running were stopped";
    }
    return problems + why;
}

}  // namespace

extern "C" {

// Forks `world` rank processes that run `calls` all-reduces (op 0 sum, 1 mean, 2 weighted
// with per-call device weights) of `numel` elements placed as `placement` says. Returns 0
// when every rank's result was within the bound of the float64 reference and bitwise-equal
// across ranks; otherwise a code and a message in `message`. `worst` receives the largest
// error / bound ratio. `stall_s` and `limit_s` bound the run as watch_ranks says;
// `pace_us`, `stop_rank`, `stop_at_call` and `stop_exit` slow or stop ranks to test that
// (see Check).
int spd_emu_all_reduce_check(int world, int dtype, int op, int two_shot, int placement,
                             int64_t numel, int calls, int64_t capacity, double stall_s,
                             double limit_s, int64_t pace_us, int stop_rank, int stop_at_call,
                             int stop_exit, double* worst, char* message, int message_len)
{
    Coordination* coord = nullptr;
    Check k{world, dtype, op, two_shot, calls, placement, numel, capacity, nullptr, nullptr,
            pace_us, stop_rank, stop_at_call, stop_exit};
    if (cudaMalloc(&coord, sizeof(Coordination)) != cudaSuccess ||
        cudaMalloc(&k.digests, sizeof(uint64_t) * size_t(calls) * size_t(world)) != cudaSuccess ||
        cudaMalloc(&k.worst, sizeof(double) * size_t(world)) != cudaSuccess) {
        std::snprintf(message, size_t(message_len), "emulated device memory exhausted");
        return 3;
    }
    new (coord) Coordination{};
    for (int r = 0; r < world; ++r) coord->calls_done[r] = -1;
    std::fill(k.worst, k.worst + world, 0.0);
    std::fflush(nullptr);
    const pid_t parent = getpid();
    std::vector<pid_t> pids;
    for (int rank = 0; rank < world; ++rank) {
        const pid_t pid = fork();
        if (pid == 0) {
            // The watchdog lives in the parent: a rank must not outlive it (a killed test
            // run would leave ranks spinning on flags).
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent) _exit(4);
            int code = 0;
            dispatch_cuda_dtype(dtype, [&](auto* tag) {
                using T = std::remove_pointer_t<decltype(tag)>;
                code = run_rank<T>(k, coord, rank);
            });
            std::fflush(nullptr);
            _exit(code);
        }
        pids.push_back(pid);
    }
    std::string problems = watch_ranks(pids, coord, world, stall_s, limit_s);
    *worst = *std::max_element(k.worst, k.worst + world);
    if (problems.empty())
        for (int c = 0; c < calls && problems.empty(); ++c)
            for (int p = 1; p < world; ++p)
                if (k.digests[int64_t(c) * world + p] != k.digests[int64_t(c) * world]) {
                    problems = "call " + std::to_string(c) + ": rank " + std::to_string(p) +
                               " differs bitwise from rank 0";
                    break;
                }
    std::snprintf(message, size_t(message_len), "%s", problems.c_str());
    return problems.empty() ? 0 : 1;
}

}  // extern "C"
