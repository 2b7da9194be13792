// Expert copies host -> device on the copy engine, with the expert ids decided on the device.
//
// Two XLA FFI custom calls, a start and a done, used as a pair inside a jitted program:
//
//   pgj_fetch_start(ids s32[k], *after) -> (out_0 [k, ...], ..., out_{n-1} [k, ...], token s32[])
//     attrs: srcs (int64[n], host addresses of n stacks [E, ...]), row_bytes (int64[n], bytes of one
//            stack row), num_rows (int64, E)
//   pgj_fetch_done(out_0, ..., out_{n-1}, ids s32[k], token s32[], *after) -> (out_0, ..., out_{n-1})
//     ids, token: the start's; the outputs alias the tables.
//   In both, `after` are ignored operands that order the call after their producers (e.g. an
//   earlier start's token: starts queue their copies in the order they run).
//
// Row i of every out_t receives row ids[i] of stack t, or zeros where ids[i] < 0.
//
// A staged pair lands the rows in buffers this library owns instead of XLA's (for a copy that crosses a
// step boundary, where XLA may copy a loop carry or a donated buffer at any time: docs/design.md):
//
//   pgj_stage_start(ids s32[k], *after) -> token s32[]
//     attrs: srcs, row_bytes, num_rows (as pgj_fetch_start), staging (int64, a key chosen by the caller)
//   pgj_stage_done(ids s32[k], token s32[], *after) -> (out_0 [k, ...], ..., out_{n-1} [k, ...])
//     attrs: row_bytes, staging (the start's)
//
// The start copies into staging area (staging, k, row_bytes): n buffers of k rows, allocated by its first
// start and kept for the life of the process (compiled programs hold their addresses); a done on an area no
// start has created is an error. The done waits as
// pgj_fetch_done does (zeroing the staged rows of ids < 0), then copies the staged rows into its results
// on the compute stream. A staging area holds one staged fetch at a time: the caller orders the next
// start on a key after the done of the last (an `after` operand on the done's results).
//
// On a CUDA device each call only launches a kernel (expert_copy_kernels.cu) on XLA's compute stream, so
// the calls are command-buffer compatible: XLA may record them into CUDA graphs, and the thread that
// launches the program never waits for the GPU. The start's kernel posts a request (its sequence number,
// the ids, the tables' addresses) into a ring in pinned host memory and writes the number into the token.
// A worker thread polls the ring, checks the ids and enqueues the copies as copy-engine transfers on a
// copy stream (consecutive expert ids become one transfer), then a 4-byte copy that advances a counter in
// device memory to the request's number. The done's kernel zeroes the rows of slots with id -1 and,
// unless every id is -1, spins until the counter reaches the token. Everything launched between start
// and done runs on the SMs while the copy engine moves the bytes, and a start that copies nothing (a
// correct guess) is not waited for. The copy stream runs transfers only, never a kernel (docs/design.md,
// "Start and done only launch kernels; the copy stream runs transfers only", says why).
//
// Failures (an id out of range; a done that waited over PREGATED_JAX_DMA_WAIT_TIMEOUT_S seconds, default
// 60, for its copies) are recorded in pinned memory: the next start or done that the host runs reports
// it, and so does PgjTakeFault (native.check_device_wait, which the engine calls before every decode
// dispatch and after every generation). A request's copies are enqueued and its counter advanced even when it fails, so nothing
// waits forever. PREGATED_JAX_DMA_TRACE=1 prints every request the worker handles to stderr.
// (Copies that XLA emits itself for a device-side index are kernels reading host memory; they run in
// series with the computation: docs/design.md.) The CUDA driver is opened with dlopen,
// so the same library loads on machines without one, where only the CPU handlers are used.
//
// On the CPU (host and "device" memory are the same), start copies the rows with memcpy and done is the
// identity: the tests run the same calls and the same validation.

#include <dlfcn.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <string>
#include <unordered_map>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;


namespace {

// --- validation shared by both platforms --------------------------------------------------------

struct Plan {
  std::vector<char*> dst;    // n output tables
  std::vector<size_t> rows;  // bytes per row, per table
  char* token = nullptr;
};

ffi::ErrorOr<Plan> MakePlan(size_t k, ffi::RemainingRets& rets, ffi::Span<const int64_t> srcs,
                            ffi::Span<const int64_t> row_bytes) {
  const size_t n = srcs.size();
  if (row_bytes.size() != n || rets.size() != n + 1) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "pgj_fetch_start: " + std::to_string(n) + " sources, " + std::to_string(row_bytes.size()) +
        " row sizes and " + std::to_string(rets.size()) + " results (expected sources + 1)"));
  }
  Plan plan;
  for (size_t t = 0; t < n; ++t) {
    auto out = rets.get<ffi::AnyBuffer>(t);
    if (!out.has_value()) return ffi::Unexpected(out.error());
    const size_t want = k * static_cast<size_t>(row_bytes[t]);
    if ((*out)->size_bytes() != want) {
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "pgj_fetch_start: result " + std::to_string(t) + " holds " +
          std::to_string((*out)->size_bytes()) + " bytes, expected " + std::to_string(want)));
    }
    plan.dst.push_back(static_cast<char*>((*out)->untyped_data()));
    plan.rows.push_back(static_cast<size_t>(row_bytes[t]));
  }
  auto token = rets.get<ffi::AnyBuffer>(n);
  if (!token.has_value()) return ffi::Unexpected(token.error());
  plan.token = static_cast<char*>((*token)->untyped_data());
  return plan;
}

ffi::Error CheckIds(const int32_t* ids, size_t k, int64_t num_rows) {
  for (size_t i = 0; i < k; ++i) {
    if (ids[i] >= num_rows) {
      return ffi::Error::InvalidArgument("pgj_fetch_start: expert id " + std::to_string(ids[i]) +
                                         " at slot " + std::to_string(i) + " is out of range [0, " +
                                         std::to_string(num_rows) + ")");
    }
  }
  return ffi::Error::Success();
}

// Runs of slots whose ids are consecutive experts: one copy each.
template <typename Copy, typename Zero>
void ForEachRun(const int32_t* ids, size_t k, Copy copy, Zero zero) {
  size_t i = 0;
  while (i < k) {
    size_t j = i + 1;
    if (ids[i] < 0) {
      while (j < k && ids[j] < 0) ++j;
      zero(i, j - i);
    } else {
      while (j < k && ids[j] == ids[j - 1] + 1) ++j;
      copy(i, static_cast<size_t>(ids[i]), j - i);
    }
    i = j;
  }
}

// --- CPU ----------------------------------------------------------------------------------------

// Row ids[i] of stack t into row i of dst[t] (zeros where ids[i] < 0), one memcpy per run.
void CopyRowsCpu(const int32_t* id, size_t k, ffi::Span<const int64_t> srcs, const std::vector<size_t>& rows,
                 const std::vector<char*>& dsts) {
  for (size_t t = 0; t < srcs.size(); ++t) {
    const char* src = reinterpret_cast<const char*>(srcs[t]);
    const size_t row = rows[t];
    char* dst = dsts[t];
    ForEachRun(
        id, k, [&](size_t slot, size_t e, size_t n) { std::memcpy(dst + slot * row, src + e * row, n * row); },
        [&](size_t slot, size_t n) { std::memset(dst + slot * row, 0, n * row); });
  }
}

ffi::Error StartCpu(ffi::Buffer<ffi::S32> ids, ffi::RemainingArgs /*after*/, ffi::RemainingRets rets,
                    ffi::Span<const int64_t> srcs, ffi::Span<const int64_t> row_bytes, int64_t num_rows) {
  const size_t k = ids.element_count();
  auto plan = MakePlan(k, rets, srcs, row_bytes);
  if (!plan.has_value()) return plan.error();
  const int32_t* id = ids.typed_data();
  if (auto err = CheckIds(id, k, num_rows); err.failure()) return err;
  CopyRowsCpu(id, k, srcs, plan->rows, plan->dst);
  std::memset(plan->token, 0, sizeof(int32_t));
  return ffi::Error::Success();
}

// The done's operands: the start's n tables, its ids, its token, then dependencies.
struct DoneOperands {
  const int32_t* ids = nullptr;
  size_t k = 0;
  const int32_t* token = nullptr;
};

ffi::ErrorOr<DoneOperands> CheckDoneOperands(ffi::RemainingArgs& args, size_t n) {
  if (n == 0 || args.size() < n + 2) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "pgj_fetch_done: expects the start's tables, its ids and its token, then dependencies; got " +
        std::to_string(args.size()) + " operands for " + std::to_string(n) + " tables"));
  }
  auto ids = args.get<ffi::Buffer<ffi::S32>>(n);
  auto token = args.get<ffi::Buffer<ffi::S32>>(n + 1);
  if (!ids.has_value() || !token.has_value() || token->element_count() != 1) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "pgj_fetch_done: operands " + std::to_string(n) + " and " + std::to_string(n + 1) +
        " must be the start's ids (int32 [k]) and token (int32 scalar)"));
  }
  for (size_t t = 0; t < n; ++t) {
    auto table = args.get<ffi::AnyBuffer>(t);
    if (!table.has_value()) return ffi::Unexpected(table.error());
    if (table->dimensions().size() == 0 || static_cast<size_t>(table->dimensions()[0]) != ids->element_count()) {
      return ffi::Unexpected(ffi::Error::InvalidArgument(
          "pgj_fetch_done: table " + std::to_string(t) + " does not have one row per id (" +
          std::to_string(ids->element_count()) + " ids)"));
    }
  }
  return DoneOperands{ids->typed_data(), ids->element_count(), token->typed_data()};
}

ffi::Error DoneCpu(ffi::RemainingArgs args, ffi::RemainingRets rets) {
  if (auto ops = CheckDoneOperands(args, rets.size()); !ops.has_value()) return ops.error();
  for (size_t t = 0; t < rets.size(); ++t) {
    auto in = args.get<ffi::AnyBuffer>(t);
    auto out = rets.get<ffi::AnyBuffer>(t);
    if (!in.has_value() || !out.has_value()) return ffi::Error::InvalidArgument("pgj_fetch_done: bad operands");
    if (in->untyped_data() != (*out)->untyped_data()) {
      std::memcpy((*out)->untyped_data(), in->untyped_data(), in->size_bytes());
    }
  }
  return ffi::Error::Success();
}

// Staging areas: a key and the size of every buffer name one area.
struct StagingKey {
  int64_t key;
  std::vector<size_t> bytes;
  bool operator==(const StagingKey& o) const { return key == o.key && bytes == o.bytes; }
};

struct StagingKeyHash {
  size_t operator()(const StagingKey& k) const {
    size_t h = std::hash<int64_t>()(k.key);
    for (size_t b : k.bytes) h = h * 1000003u ^ std::hash<size_t>()(b);
    return h;
  }
};

ffi::ErrorOr<StagingKey> MakeStagingKey(const char* call, size_t k, int64_t staging,
                                        ffi::Span<const int64_t> row_bytes) {
  if (row_bytes.size() == 0) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(std::string(call) + ": no tables (row_bytes is empty)"));
  }
  StagingKey key{staging, {}};
  for (int64_t row : row_bytes) key.bytes.push_back(k * static_cast<size_t>(row));
  return key;
}

ffi::Error CheckResults(const char* call, ffi::RemainingRets& rets, const StagingKey& key) {
  if (rets.size() != key.bytes.size()) {
    return ffi::Error::InvalidArgument(std::string(call) + ": " + std::to_string(rets.size()) + " results for " +
                                       std::to_string(key.bytes.size()) + " row sizes");
  }
  for (size_t t = 0; t < rets.size(); ++t) {
    auto out = rets.get<ffi::AnyBuffer>(t);
    if (!out.has_value()) return out.error();
    if ((*out)->size_bytes() != key.bytes[t]) {
      return ffi::Error::InvalidArgument(std::string(call) + ": result " + std::to_string(t) + " holds " +
                                         std::to_string((*out)->size_bytes()) + " bytes, expected " +
                                         std::to_string(key.bytes[t]));
    }
  }
  return ffi::Error::Success();
}

ffi::Error NoStagedFetch(const StagingKey& key) {
  std::string sizes;
  for (size_t b : key.bytes) sizes += (sizes.empty() ? "" : ", ") + std::to_string(b);
  return ffi::Error::InvalidArgument("pgj_stage_done: no pgj_stage_start ran on staging key " +
                                     std::to_string(key.key) + " with tables of " + sizes +
                                     " bytes (a done takes its start's ids, stacks and key)");
}

// On the CPU: host buffers per area, created by the area's first start (`create`); nullptr if missing.
std::vector<std::vector<char>>* CpuStaging(const StagingKey& key, bool create) {
  static auto* mu = new std::mutex();
  static auto* areas = new std::unordered_map<StagingKey, std::vector<std::vector<char>>, StagingKeyHash>();
  std::lock_guard<std::mutex> lock(*mu);
  auto it = areas->find(key);
  if (it == areas->end()) {
    if (!create) return nullptr;
    it = areas->emplace(key, std::vector<std::vector<char>>()).first;
    for (size_t b : key.bytes) it->second.emplace_back(b);
  }
  return &it->second;
}

ffi::Error StageStartCpu(ffi::Buffer<ffi::S32> ids, ffi::RemainingArgs /*after*/,
                         ffi::Result<ffi::Buffer<ffi::S32>> token, ffi::Span<const int64_t> srcs,
                         ffi::Span<const int64_t> row_bytes, int64_t num_rows, int64_t staging) {
  const size_t k = ids.element_count();
  if (srcs.size() != row_bytes.size()) {
    return ffi::Error::InvalidArgument("pgj_stage_start: " + std::to_string(srcs.size()) + " sources and " +
                                       std::to_string(row_bytes.size()) + " row sizes");
  }
  auto key = MakeStagingKey("pgj_stage_start", k, staging, row_bytes);
  if (!key.has_value()) return key.error();
  const int32_t* id = ids.typed_data();
  if (auto err = CheckIds(id, k, num_rows); err.failure()) return err;
  std::vector<size_t> rows(row_bytes.begin(), row_bytes.end());
  std::vector<char*> dsts;
  for (auto& buffer : *CpuStaging(*key, /*create=*/true)) dsts.push_back(buffer.data());
  CopyRowsCpu(id, k, srcs, rows, dsts);
  *token->typed_data() = 0;
  return ffi::Error::Success();
}

ffi::Error StageDoneCpu(ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> /*token*/, ffi::RemainingArgs /*after*/,
                        ffi::RemainingRets rets, ffi::Span<const int64_t> row_bytes, int64_t staging) {
  auto key = MakeStagingKey("pgj_stage_done", ids.element_count(), staging, row_bytes);
  if (!key.has_value()) return key.error();
  if (auto err = CheckResults("pgj_stage_done", rets, *key); err.failure()) return err;
  auto* area = CpuStaging(*key, /*create=*/false);
  if (area == nullptr) return NoStagedFetch(*key);
  for (size_t t = 0; t < rets.size(); ++t) {
    std::memcpy((*rets.get<ffi::AnyBuffer>(t))->untyped_data(), (*area)[t].data(), key->bytes[t]);
  }
  return ffi::Error::Success();
}

// --- CUDA, through the driver API opened at run time --------------------------------------------

using CUresult = int;
using CUdeviceptr = unsigned long long;
using CUstream = void*;
using CUcontext = void*;
using CUmodule = void*;
using CUfunction = void*;

struct Driver {
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*ctx_set_current)(CUcontext) = nullptr;
  CUresult (*stream_create)(CUstream*, unsigned) = nullptr;
  CUresult (*stream_synchronize)(CUstream) = nullptr;
  CUresult (*memcpy_htod)(CUdeviceptr, const void*, size_t, CUstream) = nullptr;
  CUresult (*memcpy_dtod)(CUdeviceptr, CUdeviceptr, size_t, CUstream) = nullptr;
  CUresult (*mem_host_alloc)(void**, size_t, unsigned) = nullptr;
  CUresult (*mem_host_get_device_pointer)(CUdeviceptr*, void*, unsigned) = nullptr;
  CUresult (*mem_alloc)(CUdeviceptr*, size_t) = nullptr;
  CUresult (*module_load_data)(CUmodule*, const void*) = nullptr;
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                            CUstream, void**, void**) = nullptr;
  CUresult (*get_error_string)(CUresult, const char**) = nullptr;
  std::string error;

  static Driver& Get() {
    static Driver* d = [] {
      auto* d = new Driver();
      void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
      if (lib == nullptr) {
        d->error = "cannot dlopen libcuda.so.1";
        return d;
      }
      auto load = [&](auto& fn, const char* name) {
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
        if (fn == nullptr && d->error.empty()) d->error = std::string("libcuda.so.1 lacks ") + name;
      };
      load(d->ctx_get_current, "cuCtxGetCurrent");
      load(d->ctx_set_current, "cuCtxSetCurrent");
      load(d->stream_create, "cuStreamCreate");
      load(d->stream_synchronize, "cuStreamSynchronize");
      load(d->memcpy_htod, "cuMemcpyHtoDAsync_v2");
      load(d->memcpy_dtod, "cuMemcpyDtoDAsync_v2");
      load(d->mem_host_alloc, "cuMemHostAlloc");
      load(d->mem_host_get_device_pointer, "cuMemHostGetDevicePointer_v2");
      load(d->mem_alloc, "cuMemAlloc_v2");
      load(d->module_load_data, "cuModuleLoadData");
      load(d->module_get_function, "cuModuleGetFunction");
      load(d->launch_kernel, "cuLaunchKernel");
      load(d->get_error_string, "cuGetErrorString");
      return d;
    }();
    return *d;
  }
};

std::string CudaMessage(CUresult r, const std::string& what) {
  const char* msg = "unknown error";
  if (Driver::Get().get_error_string != nullptr) Driver::Get().get_error_string(r, &msg);
  return "pgj_fetch: " + what + " failed: " + msg;
}

ffi::Error CudaError(CUresult r, const std::string& what) { return ffi::Error::Internal(CudaMessage(r, what)); }

#define PGJ_CU(call, what)                       \
  do {                                           \
    CUresult r_ = (call);                        \
    if (r_ != 0) return CudaError(r_, what);     \
  } while (0)

// The PTX of expert_copy_kernels.cu (generated; see that file).
const char kKernelsPtx[] =
#include "expert_copy_kernels.ptx.inc"
    ;

// expert_copy_kernels.cu's structs, laid out alike.
constexpr size_t kMaxTables = 4;
constexpr size_t kMaxIds = 1024;

struct Request {
  uint32_t seq;
  int32_t k, n, pad;
  int64_t num_rows;
  uint64_t posted_ns;  // the device's clock when the request was posted
  uint64_t src[kMaxTables], dst[kMaxTables], row[kMaxTables];
  int32_t ids[kMaxIds];
};

struct KernelTables {
  uint64_t ptr[kMaxTables] = {0, 0, 0, 0};
  uint64_t row[kMaxTables] = {0, 0, 0, 0};
  int32_t n = 0;
};

struct Fault {
  uint32_t code, seq, a, b;
};

struct WaitMark {
  uint64_t seq, start_ns, end_ns;
};

constexpr uint32_t kRing = 256;    // requests in flight: a program has at most a few starts without their dones
constexpr uint32_t kMarks = 4096;  // counter values in pinned memory, the sources of the counter's copies

// Whether environment variable `name` is set to something other than empty or "0...".
bool EnvFlag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// PREGATED_JAX_DMA_TRACE=1: one line on stderr per request the worker handles (for debugging), with times in
// ns: when the device posted it (its globaltimer), when the worker took it and when its copies were
// enqueued (the host's CLOCK_REALTIME; the two clocks agree to within a few microseconds on an H100
// machine, and their offset is constant within a run), and when the done of an earlier request began and
// ended waiting (device clock; -1 if that done did not wait).
bool TraceOn() {
  static const bool on = EnvFlag("PREGATED_JAX_DMA_TRACE");
  return on;
}

// PREGATED_JAX_DMA_WAIT_TIMEOUT_S: how long the done's kernel waits for copies before it records a fault.
double WaitTimeoutS() {
  static const double s = [] {
    const char* v = std::getenv("PREGATED_JAX_DMA_WAIT_TIMEOUT_S");
    const double x = (v != nullptr && v[0] != '\0') ? std::atof(v) : 60.0;
    return x > 0 ? x : 60.0;
  }();
  return s;
}

// Per CUDA context: the copy stream, the ring of requests, the counter, the kernels and the worker.
class Channel {
 public:
  // The channel of context `ctx`, created on first use. Creation runs on a thread of its own: the
  // calling thread may be recording a CUDA graph, where allocating and synchronizing are not allowed.
  static ffi::ErrorOr<Channel*> Of(CUcontext ctx) {
    std::lock_guard<std::mutex> lock(RegistryMutex());
    auto* channels = &Registry();
    auto it = channels->find(ctx);
    if (it != channels->end()) return it->second;
    auto* c = new Channel();
    std::string error;
    std::thread([&] { error = c->Init(ctx); }).join();
    if (!error.empty()) return ffi::Unexpected(ffi::Error::Internal(error));  // c leaks: creation is rare
    (*channels)[ctx] = c;
    std::thread([c, ctx] { c->Work(ctx); }).detach();  // lives as long as the process
    return c;
  }

  static void ForEach(const std::function<void(Channel*)>& fn) {
    std::lock_guard<std::mutex> lock(RegistryMutex());
    for (auto& [ctx, channel] : Registry()) fn(channel);
  }

  // Launches the start's kernel: posts the request, writes the token.
  ffi::Error Post(CUstream stream, const int32_t* ids, size_t k, const KernelTables& src, const KernelTables& dst,
                  int64_t num_rows, int32_t* token) {
    Driver& cu = Driver::Get();
    CUdeviceptr ids_ptr = reinterpret_cast<CUdeviceptr>(ids), token_ptr = reinterpret_cast<CUdeviceptr>(token);
    int k32 = static_cast<int>(k);
    unsigned ring_size = kRing;
    KernelTables s = src, d = dst;
    void* params[] = {&ids_ptr, &k32, &next_seq_, &ring_device_, &ring_size, &token_ptr, &s, &d, &num_rows};
    PGJ_CU(cu.launch_kernel(post_, 1, 1, 1, 256, 1, 1, 0, stream, params, nullptr), "launching pgj_post");
    return ffi::Error::Success();
  }

  // Launches the done's kernel: zero the empty rows, wait for the copies unless there are none.
  ffi::Error Wait(CUstream stream, const int32_t* ids, size_t k, const int32_t* token, const KernelTables& tables) {
    Driver& cu = Driver::Get();
    CUdeviceptr ids_ptr = reinterpret_cast<CUdeviceptr>(ids), token_ptr = reinterpret_cast<CUdeviceptr>(token);
    int k32 = static_cast<int>(k);
    unsigned long long timeout_ns = static_cast<unsigned long long>(WaitTimeoutS() * 1e9);
    KernelTables t = tables;
    unsigned num_marks = kMarks;
    void* params[] = {&ids_ptr, &k32, &token_ptr, &counter_, &timeout_ns, &fault_device_, &t, &wait_marks_device_,
                      &num_marks};
    size_t bytes = 0;
    for (int j = 0; j < tables.n; ++j) bytes += k * tables.row[j];
    // Enough threads to zero empty rows at memory bandwidth; blocks with nothing to zero exit at once.
    const unsigned blocks = static_cast<unsigned>(std::clamp<size_t>(bytes / (256 * 16 * 8), 1, 256));
    PGJ_CU(cu.launch_kernel(wait_fill_, blocks, 1, 1, 256, 1, 1, 0, stream, params, nullptr),
           "launching pgj_wait_fill");
    return ffi::Error::Success();
  }

  // The device buffers of staging area `key`, allocated by the area's first start (`create`; on a thread of
  // their own, as in `Of`: the calling thread may be recording a CUDA graph). Never freed: compiled programs
  // hold their addresses.
  ffi::ErrorOr<std::vector<CUdeviceptr>> Staging(const StagingKey& key, bool create) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = staging_.find(key);
    if (it != staging_.end()) return it->second;
    if (!create) return ffi::Unexpected(NoStagedFetch(key));
    std::vector<CUdeviceptr> buffers(key.bytes.size(), 0);
    std::string error;
    std::thread([&] {
      Driver& cu = Driver::Get();
      if (CUresult r = cu.ctx_set_current(ctx_)) {
        error = CudaMessage(r, "cuCtxSetCurrent");
        return;
      }
      for (size_t t = 0; t < buffers.size() && error.empty(); ++t) {
        if (CUresult r = cu.mem_alloc(&buffers[t], std::max<size_t>(key.bytes[t], 1))) {
          error = CudaMessage(r, "cuMemAlloc (a staging buffer of " + std::to_string(key.bytes[t]) + " bytes)");
        }
      }
    }).join();
    if (!error.empty()) return ffi::Unexpected(ffi::Error::Internal(error));  // what was allocated leaks: rare
    staging_[key] = buffers;
    return buffers;
  }

  // A recorded failure ("" if none), cleared: the next one is reported afresh.
  std::string TakeFault() {
    std::lock_guard<std::mutex> lock(mu_);
    std::string message;
    if (fault_ != nullptr && fault_->code != 0) {
      message = "pgj_fetch_done: the device waited over PREGATED_JAX_DMA_WAIT_TIMEOUT_S (" +
                std::to_string(WaitTimeoutS()) + " s) for the copies of request #" + std::to_string(fault_->seq) +
                " (the copy stream had reached #" + std::to_string(fault_->a) +
                "); results computed since may be wrong. PREGATED_JAX_DMA_TRACE=1 traces the requests, and "
                "EngineConfig(copy_method=\"xla\") avoids these copies";
      fault_->code = 0;
    } else {
      message.swap(worker_error_);
    }
    return message;
  }

 private:
  static std::mutex& RegistryMutex() {
    static auto* mu = new std::mutex();
    return *mu;
  }
  static std::unordered_map<CUcontext, Channel*>& Registry() {
    static auto* channels = new std::unordered_map<CUcontext, Channel*>();
    return *channels;
  }

  std::string Init(CUcontext ctx) {
    ctx_ = ctx;
    Driver& cu = Driver::Get();
    if (CUresult r = cu.ctx_set_current(ctx)) return CudaMessage(r, "cuCtxSetCurrent");
    void *ring = nullptr, *marks = nullptr, *fault = nullptr;
    CUmodule module = nullptr;
    auto check = [](CUresult r, const char* what) { return r == 0 ? std::string() : CudaMessage(r, what); };
    std::string e;
    if ((e = check(cu.stream_create(&copy_stream_, /*CU_STREAM_NON_BLOCKING=*/1), "cuStreamCreate")).size()) return e;
    if ((e = check(cu.mem_alloc(&counter_, 2 * sizeof(uint32_t)), "cuMemAlloc (counters)")).size()) return e;
    next_seq_ = counter_ + sizeof(uint32_t);
    const unsigned mapped = /*CU_MEMHOSTALLOC_DEVICEMAP=*/2;
    if ((e = check(cu.mem_host_alloc(&ring, kRing * sizeof(Request), mapped), "cuMemHostAlloc (requests)")).size()) return e;
    std::memset(ring, 0, kRing * sizeof(Request));
    ring_ = static_cast<Request*>(ring);
    if ((e = check(cu.mem_host_get_device_pointer(&ring_device_, ring, 0), "cuMemHostGetDevicePointer")).size()) return e;
    if ((e = check(cu.mem_host_alloc(&marks, kMarks * sizeof(uint32_t), 0), "cuMemHostAlloc (marks)")).size()) return e;
    std::memset(marks, 0, kMarks * sizeof(uint32_t));
    marks_ = static_cast<uint32_t*>(marks);
    if ((e = check(cu.mem_host_alloc(&fault, sizeof(Fault), mapped), "cuMemHostAlloc (fault)")).size()) return e;
    std::memset(fault, 0, sizeof(Fault));
    fault_ = static_cast<volatile Fault*>(fault);
    if ((e = check(cu.mem_host_get_device_pointer(&fault_device_, fault, 0), "cuMemHostGetDevicePointer")).size()) return e;
    if (TraceOn()) {
      void* marks_host = nullptr;
      if ((e = check(cu.mem_host_alloc(&marks_host, kMarks * sizeof(WaitMark), mapped), "cuMemHostAlloc (trace)")).size()) {
        return e;
      }
      std::memset(marks_host, 0, kMarks * sizeof(WaitMark));
      wait_marks_ = static_cast<volatile WaitMark*>(marks_host);
      if ((e = check(cu.mem_host_get_device_pointer(&wait_marks_device_, marks_host, 0), "cuMemHostGetDevicePointer"))
              .size()) {
        return e;
      }
    }
    static const uint32_t zeros[2] = {0, 0};
    if ((e = check(cu.memcpy_htod(counter_, zeros, sizeof(zeros), copy_stream_), "zeroing the counters")).size()) return e;
    if ((e = check(cu.stream_synchronize(copy_stream_), "zeroing the counters")).size()) return e;
    if ((e = check(cu.module_load_data(&module, kKernelsPtx),
                   "loading the kernels' PTX (it targets sm_75 and later; use copy_method=\"xla\" on older GPUs)"))
            .size()) {
      return e;
    }
    if ((e = check(cu.module_get_function(&post_, module, "pgj_post"), "cuModuleGetFunction")).size()) return e;
    if ((e = check(cu.module_get_function(&wait_fill_, module, "pgj_wait_fill"), "cuModuleGetFunction")).size()) return e;
    return "";
  }

  // The worker: handles requests in order. It spins while requests keep coming and naps after 200 ms
  // without one (then a request waits up to ~50 us longer).
  void Work(CUcontext ctx) {
    Driver::Get().ctx_set_current(ctx);
    uint32_t expected = 1;
    auto last = std::chrono::steady_clock::now();
    for (;;) {
      volatile Request* r = ring_ + expected % kRing;
      const uint32_t seq = r->seq;
      if (seq != expected) {
        if (static_cast<int32_t>(seq - expected) > 0) {  // lapped: requests were overwritten unread
          Fail("pgj_fetch: request #" + std::to_string(expected) + " was overwritten by #" + std::to_string(seq) +
               " before the copy worker read it (more than " + std::to_string(kRing) + " starts without their dones)");
          expected = seq;
          continue;
        }
        if (std::chrono::steady_clock::now() - last < std::chrono::milliseconds(200)) {
          std::this_thread::yield();
        } else {
          std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
        continue;
      }
      std::atomic_thread_fence(std::memory_order_acquire);
      Handle(r, seq);
      last = std::chrono::steady_clock::now();
      ++expected;
    }
  }

  // Copies request `seq`'s experts, then advances the counter (also when the request fails).
  void Handle(volatile Request* r, uint32_t seq) {
    Driver& cu = Driver::Get();
    const size_t k = static_cast<size_t>(r->k), n = static_cast<size_t>(r->n);
    const int64_t num_rows = r->num_rows;
    std::vector<int32_t> ids(k);
    for (size_t i = 0; i < k; ++i) ids[i] = r->ids[i];
    const int64_t picked_ns = TraceOn() ? RealtimeNs() : 0;
    if (ffi::Error err = CheckIds(ids.data(), k, num_rows); err.failure()) {
      Fail(err.message());
    } else {
      for (size_t t = 0; t < n; ++t) {
        const char* src = reinterpret_cast<const char*>(r->src[t]);
        const CUdeviceptr dst = r->dst[t];
        const size_t row = r->row[t];
        CUresult failed = 0;
        ForEachRun(
            ids.data(), k,
            [&](size_t slot, size_t e, size_t count) {
              if (CUresult c = cu.memcpy_htod(dst + slot * row, src + e * row, count * row, copy_stream_)) failed = c;
            },
            [](size_t, size_t) {});  // empty slots: the done's kernel zeroes them
        if (failed != 0) Fail(CudaMessage(failed, "enqueueing an expert copy"));
      }
    }
    uint32_t* mark = marks_ + seq % kMarks;
    *mark = seq;
    if (CUresult c = cu.memcpy_htod(counter_, mark, sizeof(uint32_t), copy_stream_)) {
      Fail(CudaMessage(c, "advancing the copy counter"));
    }
    if (TraceOn()) PrintTrace(r, seq, ids, picked_ns);
  }

  static int64_t RealtimeNs() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::system_clock::now().time_since_epoch()).count();
  }

  // One line per request; with the wait of request seq - kTraceLag, whose done has run by now (if it waited).
  void PrintTrace(volatile Request* r, uint32_t seq, const std::vector<int32_t>& ids, int64_t picked_ns) {
    constexpr uint32_t kTraceLag = 64;
    const int64_t enqueued_ns = RealtimeNs();
    std::string list;
    for (size_t i = 0; i < std::min<size_t>(ids.size(), 16); ++i) list += (i ? "," : "") + std::to_string(ids[i]);
    long long wait_seq = -1, wait_start = -1, wait_end = -1;
    if (seq > kTraceLag) {
      volatile WaitMark* m = wait_marks_ + (seq - kTraceLag) % kMarks;
      if (m->seq == seq - kTraceLag) {
        wait_seq = static_cast<long long>(m->seq);
        wait_start = static_cast<long long>(m->start_ns);
        wait_end = static_cast<long long>(m->end_ns);
      }
    }
    std::fprintf(stderr,
                 "pgj request #%u k=%zu n=%d posted_ns=%llu picked_ns=%lld enqueued_ns=%lld ids=[%s%s] "
                 "wait #%lld start_ns=%lld end_ns=%lld\n",
                 seq, ids.size(), static_cast<int>(r->n), static_cast<unsigned long long>(r->posted_ns),
                 static_cast<long long>(picked_ns), static_cast<long long>(enqueued_ns), list.c_str(),
                 ids.size() > 16 ? ",..." : "", wait_seq, wait_start, wait_end);
  }

  void Fail(const std::string& message) {
    std::lock_guard<std::mutex> lock(mu_);
    if (worker_error_.empty()) worker_error_ = message;
  }

  std::mutex mu_;
  CUcontext ctx_ = nullptr;
  std::unordered_map<StagingKey, std::vector<CUdeviceptr>, StagingKeyHash> staging_;  // device buffers per area
  std::string worker_error_;  // the first failure the worker met since the last TakeFault
  CUstream copy_stream_ = nullptr;
  CUdeviceptr counter_ = 0;   // device uint32: the number of the last request whose copies landed
  CUdeviceptr next_seq_ = 0;  // device uint32: the number of the last request posted
  Request* ring_ = nullptr;   // pinned [kRing]; request s lives in slot s % kRing
  CUdeviceptr ring_device_ = 0;
  uint32_t* marks_ = nullptr;  // pinned [kMarks]: marks[s % kMarks] = s, the source of the counter's copy
  volatile Fault* fault_ = nullptr;  // pinned: a done's kernel records a timed-out wait here
  CUdeviceptr fault_device_ = 0;
  volatile WaitMark* wait_marks_ = nullptr;  // pinned [kMarks], PREGATED_JAX_DMA_TRACE only: the dones' waits
  CUdeviceptr wait_marks_device_ = 0;        // 0 (no recording) unless tracing
  CUfunction post_ = nullptr, wait_fill_ = nullptr;
};

// The channel of the current context, after reporting any failure recorded there.
ffi::ErrorOr<Channel*> CurrentChannel(const char* call) {
  Driver& cu = Driver::Get();
  if (!cu.error.empty()) return ffi::Unexpected(ffi::Error::Internal(std::string(call) + ": " + cu.error));
  CUcontext ctx = nullptr;
  if (cu.ctx_get_current(&ctx) != 0 || ctx == nullptr) {
    return ffi::Unexpected(ffi::Error::Internal(std::string(call) + ": no current CUDA context"));
  }
  auto channel = Channel::Of(ctx);
  if (!channel.has_value()) return channel;
  if (std::string fault = (*channel)->TakeFault(); !fault.empty()) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(fault));
  }
  return channel;
}

// Posts a request to copy rows `ids` of stacks `srcs` into device tables `dst` (addresses, one per stack).
ffi::Error PostCopies(Channel& channel, void* stream, ffi::Buffer<ffi::S32>& ids, ffi::Span<const int64_t> srcs,
                      ffi::Span<const int64_t> row_bytes, const std::vector<uint64_t>& dst, int64_t num_rows,
                      int32_t* token) {
  KernelTables src_tables, dst_tables;
  src_tables.n = dst_tables.n = static_cast<int32_t>(srcs.size());
  for (size_t t = 0; t < srcs.size(); ++t) {
    src_tables.ptr[t] = static_cast<uint64_t>(srcs[t]);
    src_tables.row[t] = dst_tables.row[t] = static_cast<uint64_t>(row_bytes[t]);
    dst_tables.ptr[t] = dst[t];
  }
  return channel.Post(stream, ids.typed_data(), ids.element_count(), src_tables, dst_tables, num_rows, token);
}

ffi::Error StartCuda(void* stream, ffi::Buffer<ffi::S32> ids, ffi::RemainingArgs /*after*/, ffi::RemainingRets rets,
                     ffi::Span<const int64_t> srcs, ffi::Span<const int64_t> row_bytes, int64_t num_rows) {
  const size_t k = ids.element_count();
  auto plan = MakePlan(k, rets, srcs, row_bytes);
  if (!plan.has_value()) return plan.error();
  if (k > kMaxIds || srcs.size() > kMaxTables) {
    return ffi::Error::InvalidArgument("pgj_fetch_start: at most " + std::to_string(kMaxIds) + " ids and " +
                                       std::to_string(kMaxTables) + " stacks on a GPU, got " + std::to_string(k) +
                                       " and " + std::to_string(srcs.size()));
  }
  auto channel = CurrentChannel("pgj_fetch_start");
  if (!channel.has_value()) return channel.error();
  std::vector<uint64_t> dst;
  for (char* d : plan->dst) dst.push_back(reinterpret_cast<uint64_t>(d));
  return PostCopies(**channel, stream, ids, srcs, row_bytes, dst, num_rows, reinterpret_cast<int32_t*>(plan->token));
}

ffi::Error DoneCuda(void* stream, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  const size_t n = rets.size();
  auto ops = CheckDoneOperands(args, n);
  if (!ops.has_value()) return ops.error();
  if (n > kMaxTables) {
    return ffi::Error::InvalidArgument("pgj_fetch_done: at most " + std::to_string(kMaxTables) + " tables, got " +
                                       std::to_string(n));
  }
  auto channel = CurrentChannel("pgj_fetch_done");
  if (!channel.has_value()) return channel.error();
  KernelTables tables;
  tables.n = static_cast<int32_t>(n);
  for (size_t t = 0; t < n; ++t) {
    auto in = args.get<ffi::AnyBuffer>(t);
    tables.ptr[t] = reinterpret_cast<uint64_t>(in->untyped_data());
    tables.row[t] = ops->k == 0 ? 0 : in->size_bytes() / ops->k;
  }
  if (ffi::Error err = (*channel)->Wait(stream, ops->ids, ops->k, ops->token, tables); err.failure()) return err;
  Driver& cu = Driver::Get();
  for (size_t t = 0; t < n; ++t) {  // where XLA did not alias a result to its table: copy, after the wait
    auto in = args.get<ffi::AnyBuffer>(t);
    auto out = rets.get<ffi::AnyBuffer>(t);
    if (!out.has_value()) return ffi::Error::InvalidArgument("pgj_fetch_done: bad results");
    if (in->untyped_data() != (*out)->untyped_data()) {
      PGJ_CU(cu.memcpy_dtod(reinterpret_cast<CUdeviceptr>((*out)->untyped_data()),
                            reinterpret_cast<CUdeviceptr>(in->untyped_data()), in->size_bytes(), stream),
             "copying a table");
    }
  }
  return ffi::Error::Success();
}

ffi::Error StageStartCuda(void* stream, ffi::Buffer<ffi::S32> ids, ffi::RemainingArgs /*after*/,
                          ffi::Result<ffi::Buffer<ffi::S32>> token, ffi::Span<const int64_t> srcs,
                          ffi::Span<const int64_t> row_bytes, int64_t num_rows, int64_t staging) {
  const size_t k = ids.element_count();
  if (srcs.size() != row_bytes.size() || k > kMaxIds || srcs.size() > kMaxTables) {
    return ffi::Error::InvalidArgument("pgj_stage_start: " + std::to_string(srcs.size()) + " sources and " +
                                       std::to_string(row_bytes.size()) + " row sizes for " + std::to_string(k) +
                                       " ids (at most " + std::to_string(kMaxTables) + " stacks and " +
                                       std::to_string(kMaxIds) + " ids on a GPU)");
  }
  auto key = MakeStagingKey("pgj_stage_start", k, staging, row_bytes);
  if (!key.has_value()) return key.error();
  auto channel = CurrentChannel("pgj_stage_start");
  if (!channel.has_value()) return channel.error();
  auto buffers = (*channel)->Staging(*key, /*create=*/true);
  if (!buffers.has_value()) return buffers.error();
  std::vector<uint64_t> dst(buffers->begin(), buffers->end());
  return PostCopies(**channel, stream, ids, srcs, row_bytes, dst, num_rows, token->typed_data());
}

ffi::Error StageDoneCuda(void* stream, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> token,
                         ffi::RemainingArgs /*after*/, ffi::RemainingRets rets, ffi::Span<const int64_t> row_bytes,
                         int64_t staging) {
  const size_t k = ids.element_count();
  if (row_bytes.size() > kMaxTables) {
    return ffi::Error::InvalidArgument("pgj_stage_done: at most " + std::to_string(kMaxTables) + " tables, got " +
                                       std::to_string(row_bytes.size()));
  }
  auto key = MakeStagingKey("pgj_stage_done", k, staging, row_bytes);
  if (!key.has_value()) return key.error();
  if (auto err = CheckResults("pgj_stage_done", rets, *key); err.failure()) return err;
  auto channel = CurrentChannel("pgj_stage_done");
  if (!channel.has_value()) return channel.error();
  auto buffers = (*channel)->Staging(*key, /*create=*/false);
  if (!buffers.has_value()) return buffers.error();
  KernelTables tables;  // the staged rows: the wait zeroes those of ids < 0
  tables.n = static_cast<int32_t>(row_bytes.size());
  for (size_t t = 0; t < row_bytes.size(); ++t) {
    tables.ptr[t] = static_cast<uint64_t>((*buffers)[t]);
    tables.row[t] = static_cast<uint64_t>(row_bytes[t]);
  }
  if (ffi::Error err = (*channel)->Wait(stream, ids.typed_data(), k, token.typed_data(), tables); err.failure()) {
    return err;
  }
  Driver& cu = Driver::Get();
  for (size_t t = 0; t < rets.size(); ++t) {  // after the wait, on the same stream
    auto out = rets.get<ffi::AnyBuffer>(t);
    if (key->bytes[t] == 0) continue;
    PGJ_CU(cu.memcpy_dtod(reinterpret_cast<CUdeviceptr>((*out)->untyped_data()), (*buffers)[t], key->bytes[t], stream),
           "copying a staged table");
  }
  return ffi::Error::Success();
}

}  // namespace

// For Python (ctypes): writes the first failure recorded on any GPU since the last call into buf
// (NUL-terminated, truncated to size) and clears it -> 1 if there was one, else 0.
extern "C" int PgjTakeFault(char* buf, size_t size) {
  if (!Driver::Get().error.empty()) return 0;
  std::string fault;
  Channel::ForEach([&](Channel* c) {
    if (fault.empty()) fault = c->TakeFault();
  });
  if (fault.empty()) return 0;
  if (size > 0) {
    const size_t n = std::min(size - 1, fault.size());
    std::memcpy(buf, fault.data(), n);
    buf[n] = '\0';
  }
  return 1;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchStartCpu, StartCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("srcs")
                                  .Attr<ffi::Span<const int64_t>>("row_bytes")
                                  .Attr<int64_t>("num_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchDoneCpu, DoneCpu, ffi::Ffi::Bind().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchStartCuda, StartCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("srcs")
                                  .Attr<ffi::Span<const int64_t>>("row_bytes")
                                  .Attr<int64_t>("num_rows"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchDoneCuda, DoneCuda,
                              ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>().RemainingArgs().RemainingRets(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjStageStartCpu, StageStartCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<ffi::Span<const int64_t>>("srcs")
                                  .Attr<ffi::Span<const int64_t>>("row_bytes")
                                  .Attr<int64_t>("num_rows")
                                  .Attr<int64_t>("staging"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjStageDoneCpu, StageDoneCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("row_bytes")
                                  .Attr<int64_t>("staging"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjStageStartCuda, StageStartCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<ffi::Span<const int64_t>>("srcs")
                                  .Attr<ffi::Span<const int64_t>>("row_bytes")
                                  .Attr<int64_t>("num_rows")
                                  .Attr<int64_t>("staging"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjStageDoneCuda, StageDoneCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("row_bytes")
                                  .Attr<int64_t>("staging"),
                              {ffi::Traits::kCmdBufferCompatible});
