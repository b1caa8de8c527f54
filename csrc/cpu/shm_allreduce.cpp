// Shared-memory collectives among the ranks of one host: all-reduce (the kernel
// spd_ext.comm.all_reduce runs), and all-gather, reduce-scatter, broadcast and barrier
// (what the torch.distributed backend "spd_ext" adds, spd_ext/comm/process_group.py).
//
// One POSIX shared-memory segment per process group holds, for every rank, a header
// (flags and a description of its current call) and two data buffers of chunk_bytes
// (double buffering: call s uses buffer s % 2). Python (spd_ext/comm/shm.py) creates
// the segment on group rank 0, has the others attach, and unlinks the name as soon as
// everyone has mapped it, so nothing is left in /dev/shm even if a rank is killed.
//
// Each call (one chunk of the tensor) has a sequence number s, the same on every rank
// because collectives are called in the same order. Flags only ever grow, so a waiter
// tests `flag >= s` and no flag is ever reset (no reset races). The only writes to a
// peer's header are a sleeping waiter's count in its `sleepers` (see RankHeader).
//
//  one-shot (small):  copy input to own buffer; publish arrived=s; wait for every
//                     rank's arrived >= s; reduce all buffers (own input read from
//                     private memory) into the output. One barrier.
//  two-shot (large):  copy the slices other ranks reduce into own buffer; publish
//                     arrived=s; wait; reduce own slice from every rank into own
//                     buffer (reduce-scatter); publish reduced=s; wait; copy every
//                     rank's reduced slice into the output (all-gather).
//
//  all-gather:        copy input chunk to own buffer; arrived=s; wait; copy every
//                     rank's buffer into its place in the output. One barrier.
//  reduce-scatter:    copy the chunk of every peer's slice into own buffer (slice p at
//                     p * chunk); arrived=s; wait; reduce slice `rank` of every buffer
//                     (own from private memory) into the output. One barrier.
//  broadcast:         the root copies its chunk into its buffer; arrived=s; wait; the
//                     others copy the root's buffer out. One barrier.
//
// Why double buffering is enough: a rank writes buffer s % 2 again only in call s+2,
// after it has seen every peer's arrived >= s+1, which a peer publishes only after it
// finished reading everything of call s (whatever collective either call was).
//
// Every rank sums contributions in rank order with the same kernel, and two-shot
// results are computed once and copied, so all ranks end with bitwise-equal tensors.
// The weighted variant reads each rank's weight from that rank's own header, so ranks
// cannot disagree about the weights either; a rank that passed the whole weight list
// also publishes its hash, and every rank checks that the lists agree.
//
// Every check that compares ranks (sizes, dtypes, ops, weight lists, weight range) runs
// on what all ranks published for the same call, so every rank reaches the same verdict
// and raises the same error: the group stays usable. Tensors the kernel does not reduce
// (float64, integers, ...) are checked the same way by agree_ (a call that carries only
// the description) before they go through torch.distributed.
//
// A timeout bounds each wait for one peer, not the whole call: a large transfer that
// keeps making progress never times out; a peer that stops for `timeout` seconds does.
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "spd_torch.h"

namespace {

constexpr uint64_t kMagic = 0x336d68735f647073ull;  // "spd_shm3"
constexpr int kMaxRanks = 64;
constexpr int64_t kPage = 4096;

// Op codes as Python passes them (spd_codes.h).
constexpr int32_t kSum = int32_t(spd::ReduceOp::kSum);
constexpr int32_t kMean = int32_t(spd::ReduceOp::kMean);
constexpr int32_t kWeighted = int32_t(spd::ReduceOp::kWeighted);

const char* op_name(int32_t op)
{
    switch (op) {
        case kSum: return "sum";
        case kMean: return "mean";
        case kWeighted: return "weighted";
    }
    return "?";
}

// Which collective a call is (every rank of a call must make the same one).
enum Collective : int32_t { kAllReduce = 0, kAllGather = 1, kReduceScatter = 2, kBroadcast = 3,
                            kBarrier = 4 };

const char* collective_name(int32_t kind)
{
    switch (kind) {
        case kAllReduce: return "all_reduce";
        case kAllGather: return "all_gather";
        case kReduceScatter: return "reduce_scatter";
        case kBroadcast: return "broadcast";
        case kBarrier: return "barrier";
    }
    return "?";
}

struct alignas(64) Flag {
    std::atomic<uint64_t> seq;
};

// What a rank passed to one call; peers compare it with their own.
struct CallDesc {
    uint64_t seq;
    int64_t numel;
    int32_t dtype;
    int32_t op;
    float weight;
    int32_t kind;  // Collective
    uint64_t weights_hash;  // 0: no weight list passed (sum, mean, or own weight only)
    int32_t root;  // broadcast's source rank
    int32_t pad;
};

// Codes >= kTorchDTypeBase describe tensors the kernel does not reduce (agree_ only).
constexpr int32_t kTorchDTypeBase = 1000;

std::string describe_dtype(int32_t code)
{
    if (code < kTorchDTypeBase) return spd::dtype_name(spd::DType(code));
    switch (static_cast<c10::ScalarType>(code - kTorchDTypeBase)) {  // torch's Python names
        case c10::ScalarType::Double: return "float64";
        case c10::ScalarType::Long: return "int64";
        case c10::ScalarType::Int: return "int32";
        case c10::ScalarType::Short: return "int16";
        case c10::ScalarType::Char: return "int8";
        case c10::ScalarType::Byte: return "uint8";
        case c10::ScalarType::Bool: return "bool";
        case c10::ScalarType::ComplexFloat: return "complex64";
        case c10::ScalarType::ComplexDouble: return "complex128";
        default: return c10::toString(static_cast<c10::ScalarType>(code - kTorchDTypeBase));
    }
}

// Kernel dtypes by their spd::DType code, any other torch dtype above kTorchDTypeBase.
int32_t dtype_code(const at::Tensor& t)
{
    const auto st = t.scalar_type();
    return (st == at::kFloat || st == at::kBFloat16 || st == at::kHalf)
               ? int32_t(spd::to_dtype(t))
               : kTorchDTypeBase + int32_t(st);
}

// The largest weight a dtype can hold (a weight beyond it overflows the reduced value).
double dtype_max(int32_t code)
{
    switch (code) {
        case int32_t(spd::DType::kFloat32): return 3.4028234663852886e38;
        case int32_t(spd::DType::kBFloat16): return 3.3895313892515355e38;
        case int32_t(spd::DType::kFloat16): return 65504.0;
    }
    return INFINITY;  // torch dtypes: only non-finite weights are refused
}

// FNV-1a over the weights as float32 bits (what the kernel multiplies by): equal lists
// hash equally whether passed as a Python list or a float32/float64 tensor. Never 0.
uint64_t hash_weights(const double* v, int64_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (int64_t i = 0; i < n; ++i) {
        const float f = float(v[i]);
        uint32_t bits;
        std::memcpy(&bits, &f, sizeof bits);
        for (int b = 0; b < 4; ++b) {
            h ^= (bits >> (8 * b)) & 0xffu;
            h *= 1099511628211ull;
        }
    }
    return h == 0 ? 1 : h;
}

uint64_t weights_hash(const std::vector<double>& v)
{
    return hash_weights(v.data(), int64_t(v.size()));
}

struct alignas(64) RankHeader {
    Flag arrived;  // last call whose input this rank has published
    Flag reduced;  // last call whose reduce-scatter slice this rank has written
    // A peer that waited past the spin phase sleeps on `wakeups` (a futex word, shared
    // across processes) after counting itself in `sleepers`; publishing a flag bumps
    // `wakeups` and wakes the sleepers, if any. Waiting peers then cost no CPU, which on a
    // host whose cores all compute (a rank's own progress thread beside its main thread,
    // more ranks than cores) is what the ranks being waited for need.
    alignas(64) std::atomic<uint32_t> wakeups;
    std::atomic<uint32_t> sleepers;
    CallDesc desc[2];
    int64_t pid;
    uint64_t pid_ns;  // liveness is checked only between ranks in one pid namespace
};

struct alignas(64) SegmentHeader {
    std::atomic<uint64_t> magic;  // stored last by the creator
    int32_t world_size;
    int32_t pad;
    int64_t chunk_bytes;
};

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

uint64_t pid_namespace()
{
    struct stat st;
    return stat("/proc/self/ns/pid", &st) == 0 ? uint64_t(st.st_ino) : 0;
}

// A zombie still answers kill(pid, 0), so read its state as well.
bool process_alive(int64_t pid)
{
    if (kill(pid_t(pid), 0) != 0 && errno == ESRCH) return false;
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string s;
    if (!std::getline(f, s)) return true;  // no procfs: trust kill()
    const auto close = s.rfind(')');
    if (close == std::string::npos || close + 2 >= s.size()) return true;
    const char state = s[close + 2];
    return state != 'Z' && state != 'X';
}

// futex(2) on a word in shared memory (not FUTEX_PRIVATE: peers are other processes).
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ns)
{
    struct timespec t = {time_t(timeout_ns / 1000000000), long(timeout_ns % 1000000000)};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &t, nullptr, 0);
}

void futex_wake_all(std::atomic<uint32_t>* word)
{
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT32_MAX, nullptr,
            nullptr, 0);
}

inline void cpu_relax()
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

std::string errno_text(const char* what, const std::string& name)
{
    return std::string(what) + " " + name + ": " + std::strerror(errno);
}

class ShmAllReduce {
public:
    ShmAllReduce(const std::string& name, int rank, int world_size, int64_t chunk_bytes,
                 bool create)
        : name_(name), rank_(rank), world_(world_size)
    {
        if (world_size < 1 || world_size > kMaxRanks)
            throw std::invalid_argument("shm all-reduce supports 1.." +
                                        std::to_string(kMaxRanks) + " ranks, got " +
                                        std::to_string(world_size));
        if (rank < 0 || rank >= world_size)
            throw std::invalid_argument("rank " + std::to_string(rank) +
                                        " outside world of size " + std::to_string(world_size));
        if (create) {
            if (chunk_bytes < kPage || chunk_bytes % kPage != 0)
                throw std::invalid_argument("chunk_bytes must be a positive multiple of 4096");
            chunk_bytes_ = chunk_bytes;
            create_segment();
        } else {
            open_segment();
        }
        RankHeader& me = header(rank_);
        me.pid = int64_t(getpid());
        me.pid_ns = pid_namespace();
    }

    ~ShmAllReduce() { close(); }

    void close()
    {
        if (base_ != nullptr) munmap(base_, size_t(size_));
        base_ = nullptr;
    }

    // Removes the name; mappings stay valid. Called once everyone has attached.
    void unlink()
    {
        if (!unlinked_ && shm_unlink(name_.c_str()) != 0 && errno != ENOENT)
            throw std::runtime_error(errno_text("shm_unlink", name_));
        unlinked_ = true;
    }

    int64_t chunk_bytes() const { return chunk_bytes_; }
    uint64_t calls() const { return seq_; }

    void all_reduce_(at::Tensor& t, int64_t op, double weight, uint64_t weights_hash,
                     int64_t oneshot_max_bytes, double timeout_s)
    {
        const auto lock = enter();
        TORCH_CHECK(t.is_cpu() && t.is_contiguous(), "shm all_reduce needs a contiguous CPU tensor");
        TORCH_CHECK(op >= kSum && op <= kWeighted, "unknown op code ", op);
        const spd::DType dt = spd::to_dtype(t);
        const int64_t es = spd::dtype_size(dt);
        const int64_t numel = t.numel();
        const int64_t chunk_el = chunk_bytes_ / es;
        const bool one_shot = numel * es <= std::min(oneshot_max_bytes, chunk_bytes_);
        char* data = static_cast<char*>(t.data_ptr());

        CallDesc mine{};
        mine.numel = numel;
        mine.dtype = int32_t(dt);
        mine.op = int32_t(op);
        mine.weight = float(weight);
        mine.weights_hash = weights_hash;
        // An empty tensor still makes one call, so a size mismatch is reported, not hung on.
        int64_t off = 0;
        do {
            const int64_t count = std::min(chunk_el, numel - off);
            mine.seq = ++seq_;
            spd::dispatch_dtype(dt, [&](auto* tag) {
                using T = std::remove_pointer_t<decltype(tag)>;
                run_chunk<T>(data + off * es, count, mine, one_shot, off == 0, timeout_s);
            });
            off += count;
        } while (off < numel);
        t.unsafeGetTensorImpl()->bump_version();  // written in place, as autograd must know
    }

    // A call that carries only a description: every rank of the group checks that all
    // passed the same collective, size, dtype, op and weight list, raising the same error
    // on each if not, and waits for every peer (timeout_s each, naming a missing one).
    // Used before a tensor goes through torch.distributed, so a mismatch there is an
    // error, not a hang or an abort; it pairs with a kernel call of a peer, so a rank that
    // reduces float32 here and one that reduces float64 through torch.distributed both
    // see the mismatch. With kind kBarrier and an empty tensor it is the barrier.
    void agree_(const at::Tensor& t, int64_t op, double weight, uint64_t weights_hash,
                double timeout_s, int64_t kind)
    {
        const auto lock = enter();
        TORCH_CHECK(kind >= kAllReduce && kind <= kBarrier, "unknown collective ", kind);
        CallDesc mine{};
        mine.seq = ++seq_;
        mine.kind = int32_t(kind);
        mine.numel = t.numel();
        mine.dtype = dtype_code(t);
        mine.op = int32_t(op);
        mine.weight = float(weight);
        mine.weights_hash = weights_hash;
        arrive(mine, true, timeout_s);
    }

    // out (world_size x in.numel(), rank-major) <- every rank's `in`; any dtype (bytes
    // are copied). `in` may be this rank's slice of `out` (in place).
    void all_gather_(at::Tensor& out, const at::Tensor& in, double timeout_s)
    {
        const auto lock = enter();
        check_cpu_contiguous(out, "all_gather output");
        check_cpu_contiguous(in, "all_gather input");
        TORCH_CHECK(out.scalar_type() == in.scalar_type() && out.numel() == in.numel() * world_,
                    "all_gather: the output must hold world_size (", world_, ") x ", in.numel(),
                    " elements of the input's dtype, got ", out.numel(), " x ",
                    out.scalar_type());
        const int64_t bytes = in.numel() * in.element_size();
        const char* src = static_cast<const char*>(in.const_data_ptr());
        char* dst = static_cast<char*>(out.data_ptr());
        const int threads = spd::max_threads();
        CallDesc mine{};
        mine.kind = kAllGather;
        mine.numel = in.numel();
        mine.dtype = dtype_code(in);
        int64_t off = 0;
        do {
            const int64_t n = std::min(chunk_bytes_, bytes - off);
            mine.seq = ++seq_;
            const int parity = int(mine.seq & 1);
            spd::parallel_copy(buffer(rank_, parity), src + off, n, threads);
            arrive(mine, off == 0, timeout_s);
            for (int i = 0; i < world_; ++i) {
                const int p = (rank_ + i) % world_;
                char* to = dst + int64_t(p) * bytes + off;
                const char* from = p == rank_ ? src + off : buffer(p, parity);
                if (to != from) spd::parallel_copy(to, from, n, threads);
            }
            off += n;
        } while (off < bytes);
        out.unsafeGetTensorImpl()->bump_version();
    }

    // out <- slice `rank` (out.numel() elements) of the reduction of every rank's `in`
    // (world_size x out.numel(), rank-major): sum, mean or weighted (each rank's `weight`
    // scales its own contribution). float32 / bfloat16 / float16, fp32 accumulation.
    void reduce_scatter_(at::Tensor& out, const at::Tensor& in, int64_t op, double weight,
                         double timeout_s)
    {
        const auto lock = enter();
        check_cpu_contiguous(out, "reduce_scatter output");
        check_cpu_contiguous(in, "reduce_scatter input");
        TORCH_CHECK(op >= kSum && op <= kWeighted, "unknown op code ", op);
        TORCH_CHECK(out.scalar_type() == in.scalar_type() && in.numel() == out.numel() * world_,
                    "reduce_scatter: the input must hold world_size (", world_, ") x ",
                    out.numel(), " elements of the output's dtype, got ", in.numel(), " x ",
                    in.scalar_type());
        const spd::DType dt = spd::to_dtype(in);
        const int64_t es = spd::dtype_size(dt);
        const int64_t n = out.numel();
        const int64_t chunk_el = std::max<int64_t>(1, chunk_bytes_ / (es * world_));
        const int threads = spd::max_threads();
        CallDesc mine{};
        mine.kind = kReduceScatter;
        mine.numel = n;
        mine.dtype = int32_t(dt);
        mine.op = int32_t(op);
        mine.weight = float(weight);
        const char* src = static_cast<const char*>(in.const_data_ptr());
        char* dst = static_cast<char*>(out.data_ptr());
        int64_t off = 0;
        do {
            const int64_t count = std::min(chunk_el, n - off);
            mine.seq = ++seq_;
            const int parity = int(mine.seq & 1);
            char* mine_buf = buffer(rank_, parity);
            for (int p = 0; p < world_; ++p)  // peers' slices only: our own is read in place
                if (p != rank_)
                    spd::parallel_copy(mine_buf + int64_t(p) * count * es,
                                       src + (int64_t(p) * n + off) * es, count * es, threads);
            arrive(mine, off == 0, timeout_s);
            spd::dispatch_dtype(dt, [&](auto* tag) {
                using T = std::remove_pointer_t<decltype(tag)>;
                float w[kMaxRanks];
                const T* from[kMaxRanks];
                weights_of(mine, parity, w);
                for (int p = 0; p < world_; ++p)
                    from[p] = reinterpret_cast<const T*>(
                        p == rank_ ? src + (int64_t(rank_) * n + off) * es
                                   : buffer(p, parity) + int64_t(rank_) * count * es);
                spd::weighted_reduce(reinterpret_cast<T*>(dst + off * es), from, w, world_,
                                     count, threads);
            });
            off += count;
        } while (off < n);
        out.unsafeGetTensorImpl()->bump_version();
    }

    // t <- rank `root`'s t on every rank; any dtype.
    void broadcast_(at::Tensor& t, int64_t root, double timeout_s)
    {
        const auto lock = enter();
        check_cpu_contiguous(t, "broadcast tensor");
        TORCH_CHECK(root >= 0 && root < world_, "broadcast: root ", root, " outside a group of ",
                    world_, " ranks");
        const int64_t bytes = t.numel() * t.element_size();
        char* data = static_cast<char*>(t.data_ptr());
        const int threads = spd::max_threads();
        CallDesc mine{};
        mine.kind = kBroadcast;
        mine.numel = t.numel();
        mine.dtype = dtype_code(t);
        mine.root = int32_t(root);
        int64_t off = 0;
        do {
            const int64_t n = std::min(chunk_bytes_, bytes - off);
            mine.seq = ++seq_;
            const int parity = int(mine.seq & 1);
            if (rank_ == root) spd::parallel_copy(buffer(rank_, parity), data + off, n, threads);
            arrive(mine, off == 0, timeout_s);
            if (rank_ != root) spd::parallel_copy(data + off, buffer(int(root), parity), n, threads);
            off += n;
        } while (off < bytes);
        if (rank_ != root) t.unsafeGetTensorImpl()->bump_version();
    }

    // The per-call entry point from Python: the argument checks that would cost Python as
    // much as a small all-reduce are done here. Only the common case is served: a
    // contiguous CPU float32/bfloat16/float16 tensor; sum or mean without weights, or
    // weighted with every rank's weights as a contiguous CPU float32/float64 tensor of
    // world_size finite entries. Anything else returns false having done nothing, and the
    // caller validates (naming the problem) and calls all_reduce_ or torch.distributed.
    bool try_all_reduce_(at::Tensor& t, int64_t op, const std::optional<at::Tensor>& weights,
                         int64_t oneshot_max_bytes, double timeout_s)
    {
        const auto st = t.scalar_type();
        if (!t.is_cpu() || !t.is_contiguous() ||
            (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf))
            return false;
        double own = 1.0;
        uint64_t hash = 0;
        if (op == kSum || op == kMean) {
            if (weights.has_value()) return false;
            if (op == kMean) own = 1.0 / world_;
        } else if (op == kWeighted) {
            if (!weights.has_value()) return false;
            const at::Tensor& w = *weights;
            if (!w.is_cpu() || !w.is_contiguous() || w.numel() != world_) return false;
            double sum = 0.0;
            double values[kMaxRanks];
            const auto read = [&](const auto* v) {
                for (int r = 0; r < world_; ++r) {
                    values[r] = double(v[r]);
                    sum += values[r];
                }
                own = v[rank_];
            };
            if (w.scalar_type() == at::kFloat)
                read(w.const_data_ptr<float>());
            else if (w.scalar_type() == at::kDouble)
                read(w.const_data_ptr<double>());
            else
                return false;
            if (!std::isfinite(sum)) return false;  // NaN or inf anywhere: the caller names it
            hash = hash_weights(values, world_);
        } else {
            return false;
        }
        all_reduce_(t, op, own, hash, oneshot_max_bytes, timeout_s);
        return true;
    }

private:
    using Clock = std::chrono::steady_clock;

    // One call at a time per group: calls from two threads would interleave their
    // sequence numbers differently on different ranks and pair with the wrong peers'
    // calls, mixing results silently. Waiting for the other thread would not help (the
    // order could still differ across ranks), so the second caller is refused.
    std::unique_lock<std::mutex> enter()
    {
        std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
        if (!lock.owns_lock())
            throw std::runtime_error(
                "spd_ext all_reduce: two threads called all_reduce on the same process group "
                "at once; their calls would pair with different calls on other ranks. Give "
                "each thread its own process group (torch.distributed.new_group) or call "
                "from one thread");
        if (base_ == nullptr) throw std::runtime_error("shm all-reduce used after close()");
        if (!broken_.empty())
            throw std::runtime_error(
                "spd_ext shm all_reduce: this process group's shared-memory state is unusable "
                "after an earlier failure (" +
                broken_ + "); destroy and re-create the process group");
        return lock;
    }

    SegmentHeader& segment() { return *reinterpret_cast<SegmentHeader*>(base_); }
    RankHeader& header(int r)
    {
        return reinterpret_cast<RankHeader*>(static_cast<char*>(base_) + kPage)[r];
    }
    char* buffer(int r, int parity)
    {
        return static_cast<char*>(base_) + data_offset_ + (int64_t(r) * 2 + parity) * chunk_bytes_;
    }

    void layout()
    {
        data_offset_ = kPage + round_up(int64_t(sizeof(RankHeader)) * world_, kPage);
        size_ = data_offset_ + int64_t(world_) * 2 * chunk_bytes_;
    }

    void map(int fd)
    {
        void* p = mmap(nullptr, size_t(size_), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       fd, 0);
        if (p == MAP_FAILED) {
            const std::string msg = errno_text("mmap", name_);
            ::close(fd);
            throw std::runtime_error(msg);
        }
        ::close(fd);
        base_ = p;
    }

    void create_segment()
    {
        layout();
        const int fd = shm_open(name_.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
        if (fd < 0) throw std::runtime_error(errno_text("shm_open(create)", name_));
        unlinked_ = false;
        // Reserve the pages now: a short /dev/shm would otherwise SIGBUS on first touch.
        const int err = ftruncate(fd, size_) != 0 ? errno : posix_fallocate(fd, 0, size_);
        if (err != 0) {
            ::close(fd);
            shm_unlink(name_.c_str());
            unlinked_ = true;
            std::ostringstream msg;
            msg << "cannot reserve " << (size_ >> 20) << " MiB of shared memory for " << world_
                << " ranks (" << std::strerror(err)
                << "); enlarge /dev/shm (docker run --shm-size) or lower "
                   "SPD_EXT_SHM_CHUNK_BYTES (now "
                << chunk_bytes_ << ")";
            throw std::runtime_error(msg.str());
        }
        map(fd);
        std::memset(base_, 0, size_t(data_offset_));
        SegmentHeader& s = segment();
        s.world_size = world_;
        s.chunk_bytes = chunk_bytes_;
        s.magic.store(kMagic, std::memory_order_release);
    }

    void open_segment()
    {
        const int fd = shm_open(name_.c_str(), O_RDWR, 0600);
        if (fd < 0) throw std::runtime_error(errno_text("shm_open(attach)", name_));
        unlinked_ = true;  // the creator owns the name
        SegmentHeader probe;
        if (pread(fd, &probe, sizeof(probe), 0) != ssize_t(sizeof(probe)) ||
            probe.magic.load() != kMagic || probe.world_size != world_) {
            ::close(fd);
            throw std::runtime_error("shared-memory segment " + name_ +
                                     " is not an spd_ext all-reduce segment for " +
                                     std::to_string(world_) + " ranks");
        }
        chunk_bytes_ = probe.chunk_bytes;
        layout();
        map(fd);
    }

    [[noreturn]] void fail(const std::string& msg)
    {
        broken_ = msg;
        throw std::runtime_error("spd_ext shm all_reduce: " + msg);
    }

    // Sets this rank's `flag` to seq (its peers wait for that), waking peers asleep on it.
    void publish(Flag RankHeader::*flag, uint64_t seq)
    {
        RankHeader& me = header(rank_);
        // seq_cst: a sleeper counts itself, then re-reads the flag; one of the two sides
        // sees the other's write (a sleeper that misses the flag is seen and woken)
        (me.*flag).seq.store(seq, std::memory_order_seq_cst);
        me.wakeups.fetch_add(1, std::memory_order_seq_cst);
        if (me.sleepers.load(std::memory_order_seq_cst) != 0) futex_wake_all(&me.wakeups);
    }

    // Spin (cheap when the peer is running on another core: the common case, a peer a
    // few microseconds behind), then sleep on the peer's futex in slices of kSliceNs,
    // checking between slices that the peer is alive and the deadline has not passed.
    void wait_for(int p, Flag RankHeader::*flag, uint64_t seq, const char* stage,
                  double timeout_s)
    {
        constexpr int64_t kSliceNs = 20000000;  // liveness checks every 20 ms
        RankHeader& peer = header(p);
        std::atomic<uint64_t>& f = (peer.*flag).seq;
        for (int i = 0; i < 1024; ++i) {
            if (f.load(std::memory_order_acquire) >= seq) return;
            cpu_relax();
        }
        const bool check_alive = peer.pid_ns != 0 && peer.pid_ns == header(rank_).pid_ns;
        const auto start = Clock::now();
        const auto deadline = start + std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double>(timeout_s));
        while (true) {
            const uint32_t seen = peer.wakeups.load(std::memory_order_seq_cst);
            peer.sleepers.fetch_add(1, std::memory_order_seq_cst);
            if (f.load(std::memory_order_seq_cst) >= seq) {
                peer.sleepers.fetch_sub(1, std::memory_order_seq_cst);
                return;
            }
            futex_wait(&peer.wakeups, seen, kSliceNs);
            peer.sleepers.fetch_sub(1, std::memory_order_seq_cst);
            if (f.load(std::memory_order_acquire) >= seq) return;
            const auto now = Clock::now();
            if (now >= deadline) {
                std::ostringstream msg;
                msg << "rank " << rank_ << " timed out after " << timeout_s
                    << " s waiting for rank " << p << " (pid " << peer.pid << ") to " << stage
                    << " for call " << seq << " (its last was call "
                    << f.load(std::memory_order_acquire)
                    << "); the rank is stuck, slower than the timeout, or skipped this "
                       "collective. Raise the limit with all_reduce(timeout=...) or "
                       "SPD_EXT_COMM_TIMEOUT (the backend \"spd_ext\": the process group's "
                       "timeout)";
                fail(msg.str());
            }
            if (check_alive && !process_alive(peer.pid)) {
                std::ostringstream msg;
                msg << "rank " << p << " (pid " << peer.pid << ") exited while rank " << rank_
                    << " waited for it to " << stage << " for call " << seq;
                fail(msg.str());
            }
        }
    }

    void wait_all(Flag RankHeader::*flag, uint64_t seq, const char* stage, double timeout_s)
    {
        for (int i = 1; i < world_; ++i)
            wait_for((rank_ + i) % world_, flag, seq, stage, timeout_s);
    }

    static void check_cpu_contiguous(const at::Tensor& t, const char* what)
    {
        TORCH_CHECK(t.is_cpu() && t.is_contiguous(), "shm collectives need a contiguous CPU ",
                    what);
    }

    // Publishes this rank's description of the call (its data already in its buffer),
    // waits for every peer to do the same, and on a call's first chunk checks that all
    // describe the same call.
    void arrive(const CallDesc& mine, bool first, double timeout_s)
    {
        const int parity = int(mine.seq & 1);
        RankHeader& me = header(rank_);
        me.desc[parity] = mine;
        publish(&RankHeader::arrived, mine.seq);
        wait_all(&RankHeader::arrived, mine.seq, "publish its input", timeout_s);
        if (first) check_same_call(parity, mine);
    }

    // Each rank's factor in a reduction: 1 (sum), 1/N (mean) or the weight it published.
    void weights_of(const CallDesc& mine, int parity, float* w)
    {
        for (int p = 0; p < world_; ++p)
            w[p] = mine.op == kSum    ? 1.0f
                   : mine.op == kMean ? 1.0f / float(world_)
                                      : header(p).desc[parity].weight;
    }

    static void describe_call(std::ostringstream& msg, const CallDesc& d, bool kind)
    {
        if (kind) msg << collective_name(d.kind) << " ";
        msg << d.numel << " x " << describe_dtype(d.dtype);
        if (d.kind == kAllReduce || d.kind == kReduceScatter) msg << " (" << op_name(d.op) << ")";
        if (d.kind == kBroadcast) msg << " from rank " << d.root;
    }

    void check_same_call(int parity, const CallDesc& mine)
    {
        bool same = true, same_kind = true;
        for (int p = 0; p < world_; ++p) {
            const CallDesc& d = header(p).desc[parity];
            same_kind = same_kind && d.kind == mine.kind;
            same = same && d.kind == mine.kind && d.numel == mine.numel &&
                   d.dtype == mine.dtype && d.op == mine.op && d.root == mine.root;
        }
        // Every rank sees what every rank published for this call, so every rank reaches
        // the same verdict here and the group stays usable.
        if (!same) {
            std::ostringstream msg;
            if (same_kind)
                msg << "spd_ext " << collective_name(mine.kind)
                    << ": ranks passed different tensors to call " << mine.seq << ":";
            else
                msg << "spd_ext: ranks made different collective calls at call " << mine.seq
                    << ":";
            for (int p = 0; p < world_; ++p) {
                msg << " rank " << p << " ";
                describe_call(msg, header(p).desc[parity], !same_kind);
                msg << (p + 1 < world_ ? "," : ";");
            }
            msg << (same_kind ? " every rank must pass a tensor of the same size and dtype"
                                " with the same op"
                              : " every rank must make the same collective calls in the same"
                                " order");
            if (mine.kind == kBroadcast && same_kind) msg << " and root";
            throw std::invalid_argument(msg.str());
        }
        if (mine.op != kWeighted) return;
        uint64_t list = 0;
        for (int p = 0; p < world_; ++p) {
            const uint64_t h = header(p).desc[parity].weights_hash;
            if (h == 0) continue;
            if (list != 0 && h != list) {
                std::ostringstream msg;
                msg << "spd_ext all_reduce: ranks passed different weight lists to call "
                    << mine.seq << " (each rank's own weight:";
                for (int q = 0; q < world_; ++q)
                    msg << " " << header(q).desc[parity].weight << (q + 1 < world_ ? "," : ")");
                msg << "); the sum would be one no rank intended. Pass the same list on every "
                       "rank (weights=), or each rank's own weight as weight=";
                throw std::invalid_argument(msg.str());
            }
            list = h;
        }
        const double limit = dtype_max(mine.dtype);
        for (int p = 0; p < world_; ++p) {
            const double w = header(p).desc[parity].weight;
            if (!std::isfinite(w) || std::fabs(w) > limit) {
                std::ostringstream msg;
                msg << "spd_ext all_reduce: rank " << p << "'s weight " << w
                    << " is not a finite " << describe_dtype(mine.dtype)
                    << " value; the weighted sum would overflow. Use weights that sum to 1";
                throw std::invalid_argument(msg.str());
            }
        }
    }

    template <typename T>
    void run_chunk(char* data, int64_t count, const CallDesc& mine, bool one_shot, bool first,
                   double timeout_s)
    {
        const uint64_t seq = mine.seq;
        const int parity = int(seq & 1);
        const int64_t es = int64_t(sizeof(T));
        const int threads = spd::max_threads();
        char* mine_buf = buffer(rank_, parity);

        // Two-shot slices, aligned to 64 bytes so each rank's kernel runs full vectors.
        const int64_t align = 64 / es;
        const int64_t per = round_up((count + world_ - 1) / world_, align);
        auto slice_begin = [&](int p) { return std::min(count, int64_t(p) * per); };
        auto slice_end = [&](int p) { return std::min(count, int64_t(p + 1) * per); };
        const int64_t s0 = slice_begin(rank_), s1 = slice_end(rank_);

        if (one_shot) {
            spd::parallel_copy(mine_buf, data, count * es, threads);
        } else {  // peers need every slice but our own
            spd::parallel_copy(mine_buf, data, s0 * es, threads);
            spd::parallel_copy(mine_buf + s1 * es, data + s1 * es, (count - s1) * es, threads);
        }
        arrive(mine, first, timeout_s);

        float w[kMaxRanks];
        const T* src[kMaxRanks];
        weights_of(mine, parity, w);
        if (one_shot) {
            for (int p = 0; p < world_; ++p)
                src[p] = reinterpret_cast<const T*>(p == rank_ ? data : buffer(p, parity));
            spd::weighted_reduce(reinterpret_cast<T*>(data), src, w, world_, count, threads);
            return;
        }
        for (int p = 0; p < world_; ++p)
            src[p] = reinterpret_cast<const T*>(p == rank_ ? data : buffer(p, parity)) + s0;
        spd::weighted_reduce(reinterpret_cast<T*>(mine_buf) + s0, src, w, world_, s1 - s0,
                             threads);
        publish(&RankHeader::reduced, seq);
        wait_all(&RankHeader::reduced, seq, "finish its reduce-scatter slice", timeout_s);
        for (int i = 0; i < world_; ++i) {
            const int p = (rank_ + i) % world_;
            const int64_t b = slice_begin(p), e = slice_end(p);
            spd::parallel_copy(data + b * es, buffer(p, parity) + b * es, (e - b) * es, threads);
        }
    }

    std::string name_;
    int rank_;
    int world_;
    int64_t chunk_bytes_ = 0;
    int64_t data_offset_ = 0;
    int64_t size_ = 0;
    void* base_ = nullptr;
    bool unlinked_ = true;
    uint64_t seq_ = 0;
    std::string broken_;
    std::mutex mutex_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)
{
    namespace py = pybind11;
    py::class_<ShmAllReduce>(m, "ShmAllReduce")
        .def(py::init<const std::string&, int, int, int64_t, bool>(),
             py::arg("name"),
             py::arg("rank"),
             py::arg("world_size"),
             py::arg("chunk_bytes"),
             py::arg("create"))
        .def("unlink", &ShmAllReduce::unlink)
        .def("close", &ShmAllReduce::close)
        .def("all_reduce_",
             &ShmAllReduce::all_reduce_,
             "in-place all-reduce; op: a ReduceOp code of spd_codes.h (weight = this rank's weight)",
             py::arg("tensor"),
             py::arg("op"),
             py::arg("weight"),
             py::arg("weights_hash"),
             py::arg("oneshot_max_bytes"),
             py::arg("timeout_s"),
             py::call_guard<py::gil_scoped_release>())
        .def("try_all_reduce_",
             &ShmAllReduce::try_all_reduce_,
             "in-place all-reduce of the common case (weights: every rank's, op 2 only); "
             "returns false, doing nothing, for anything else",
             py::arg("tensor"),
             py::arg("op"),
             py::arg("weights"),
             py::arg("oneshot_max_bytes"),
             py::arg("timeout_s"),
             py::call_guard<py::gil_scoped_release>())
        .def("agree_",
             &ShmAllReduce::agree_,
             "check every rank describes the same call (numel, dtype, op, weights); "
             "nothing is reduced",
             py::arg("tensor"),
             py::arg("op"),
             py::arg("weight"),
             py::arg("weights_hash"),
             py::arg("timeout_s"),
             py::arg("kind") = int64_t(kAllReduce),
             py::call_guard<py::gil_scoped_release>())
        .def("all_gather_",
             &ShmAllReduce::all_gather_,
             "output (world_size x input, rank-major) <- every rank's input; any dtype",
             py::arg("output"),
             py::arg("input"),
             py::arg("timeout_s"),
             py::call_guard<py::gil_scoped_release>())
        .def("reduce_scatter_",
             &ShmAllReduce::reduce_scatter_,
             "output <- this rank's slice of the reduction of every rank's input "
             "(world_size x output, rank-major)",
             py::arg("output"),
             py::arg("input"),
             py::arg("op"),
             py::arg("weight"),
             py::arg("timeout_s"),
             py::call_guard<py::gil_scoped_release>())
        .def("broadcast_",
             &ShmAllReduce::broadcast_,
             "tensor <- rank root's tensor; any dtype",
             py::arg("tensor"),
             py::arg("root"),
             py::arg("timeout_s"),
             py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("chunk_bytes", &ShmAllReduce::chunk_bytes)
        .def_property_readonly("calls", &ShmAllReduce::calls);
    m.attr("COLLECTIVES") = py::dict(py::arg("all_reduce") = int(kAllReduce),
                                     py::arg("all_gather") = int(kAllGather),
                                     py::arg("reduce_scatter") = int(kReduceScatter),
                                     py::arg("broadcast") = int(kBroadcast),
                                     py::arg("barrier") = int(kBarrier));
    m.def("weights_hash", &weights_hash, "the hash a weight list is published under",
          py::arg("weights"));
    spd::def_build_info(m);
}
