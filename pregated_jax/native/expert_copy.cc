// Expert copies host -> device on the copy engine, with the expert ids decided on the device.
//
// Three XLA FFI custom calls: a start and a done, used as a pair inside a jitted program, and an ordering no-op:
//
//   pgj_fetch_start(ids s32[k], *after) -> (out_0 [k, ...], ..., out_{n-1} [k, ...], token s32[])
//     attrs: srcs (int64[n], host addresses of n stacks [E, ...]), row_bytes (int64[n], bytes of one
//            stack row), num_rows (int64, E)
//   pgj_fetch_done(out_0, ..., out_{n-1}, *after) -> (out_0, ..., out_{n-1})   (outputs alias inputs)
//     attrs: host_wait (bool: block XLA's thread even where PREGATED_JAX_DMA_DEVICE_WAIT=1 asks for a
//            device-side wait)
//   pgj_order(x, *after) -> x   (output aliases input)
//     a no-op that orders x's consumers after `after`'s producers (e.g. a start that must be issued
//     before the computation that reads x).
//   In all three, `after` are ignored operands that order the call after their producers (e.g. an
//   earlier start's token: starts queue their copies in the order they run).
//
// Row i of every out_t receives row ids[i] of stack t, or zeros where ids[i] < 0.
//
// On a CUDA device, start only enqueues, on XLA's compute stream, a copy of the ids to pinned host memory
// and an event, and hands the rest to a worker thread: it waits for the event (the routing decision has
// been computed), then enqueues the row copies as copy-engine transfers on a separate copy stream and
// marks them done. Consecutive expert ids become one transfer. Done blocks XLA's thread until the worker
// has enqueued the copies, then makes the compute stream wait for their event; everything launched
// between start and done runs on the SMs while the copy engine moves the bytes. With
// PREGATED_JAX_DMA_DEVICE_WAIT=1 (where the driver has stream memory operations) and host_wait=false,
// done instead returns at once: the copy stream advances a counter in device memory after each start's
// copies (cuStreamWriteValue32) and the compute stream waits for the start's value (cuStreamWaitValue32).
// It saves ~0.18 ms per decode step on an H100 but deadlocks there (see Copier::Done). A failure the
// worker meets after its done has returned (an id out of range) is reported by the next start or done.
// PREGATED_JAX_DMA_TRACE=1 prints every start, done and worker step to stderr.
// (Copies that XLA emits itself for a device-side index are kernels reading host memory; they run in
// series with the computation: docs/benchmarks/h100-copy-overlap.) The CUDA driver is opened with dlopen,
// so the same library loads on machines without one, where only the CPU handlers are used.
//
// On the CPU (host and "device" memory are the same), start copies the rows with memcpy and done is the
// identity: the tests run the same calls and the same validation.

#include <dlfcn.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

ffi::Error StartCpu(ffi::Buffer<ffi::S32> ids, ffi::RemainingArgs /*after*/, ffi::RemainingRets rets,
                    ffi::Span<const int64_t> srcs, ffi::Span<const int64_t> row_bytes, int64_t num_rows) {
  const size_t k = ids.element_count();
  auto plan = MakePlan(k, rets, srcs, row_bytes);
  if (!plan.has_value()) return plan.error();
  const int32_t* id = ids.typed_data();
  if (auto err = CheckIds(id, k, num_rows); err.failure()) return err;
  for (size_t t = 0; t < srcs.size(); ++t) {
    const char* src = reinterpret_cast<const char*>(srcs[t]);
    const size_t row = plan->rows[t];
    char* dst = plan->dst[t];
    ForEachRun(
        id, k, [&](size_t slot, size_t e, size_t n) { std::memcpy(dst + slot * row, src + e * row, n * row); },
        [&](size_t slot, size_t n) { std::memset(dst + slot * row, 0, n * row); });
  }
  std::memset(plan->token, 0, sizeof(int32_t));
  return ffi::Error::Success();
}

ffi::Error DoneCpu(ffi::RemainingArgs args, ffi::RemainingRets rets, bool /*host_wait*/) {
  if (rets.size() == 0 || args.size() < rets.size()) {
    return ffi::Error::InvalidArgument("pgj_fetch_done: expects the start's tables, then dependencies");
  }
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

ffi::Error OrderCpu(ffi::AnyBuffer x, ffi::RemainingArgs /*after*/, ffi::Result<ffi::AnyBuffer> out) {
  if (x.untyped_data() != out->untyped_data()) std::memcpy(out->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

// --- CUDA, through the driver API opened at run time --------------------------------------------

using CUresult = int;
using CUdeviceptr = unsigned long long;
using CUstream = void*;
using CUevent = void*;
using CUcontext = void*;

struct Driver {
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*ctx_set_current)(CUcontext) = nullptr;
  CUresult (*event_query)(CUevent) = nullptr;
  CUresult (*stream_create)(CUstream*, unsigned) = nullptr;
  CUresult (*stream_synchronize)(CUstream) = nullptr;
  CUresult (*stream_wait_event)(CUstream, CUevent, unsigned) = nullptr;
  CUresult (*event_create)(CUevent*, unsigned) = nullptr;
  CUresult (*event_record)(CUevent, CUstream) = nullptr;
  CUresult (*memcpy_htod)(CUdeviceptr, const void*, size_t, CUstream) = nullptr;
  CUresult (*memcpy_dtoh)(void*, CUdeviceptr, size_t, CUstream) = nullptr;
  CUresult (*memcpy_dtod)(CUdeviceptr, CUdeviceptr, size_t, CUstream) = nullptr;
  CUresult (*memset_d8)(CUdeviceptr, unsigned char, size_t, CUstream) = nullptr;
  CUresult (*mem_host_alloc)(void**, size_t, unsigned) = nullptr;
  CUresult (*mem_alloc)(CUdeviceptr*, size_t) = nullptr;
  // Stream memory operations (optional): a stream waits on / writes a 32-bit value in device memory.
  CUresult (*stream_wait_value32)(CUstream, CUdeviceptr, uint32_t, unsigned) = nullptr;
  CUresult (*stream_write_value32)(CUstream, CUdeviceptr, uint32_t, unsigned) = nullptr;
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
      load(d->event_query, "cuEventQuery");
      load(d->stream_create, "cuStreamCreate");
      load(d->stream_synchronize, "cuStreamSynchronize");
      load(d->stream_wait_event, "cuStreamWaitEvent");
      load(d->event_create, "cuEventCreate");
      load(d->event_record, "cuEventRecord");
      load(d->memcpy_htod, "cuMemcpyHtoDAsync_v2");
      load(d->memcpy_dtoh, "cuMemcpyDtoHAsync_v2");
      load(d->memcpy_dtod, "cuMemcpyDtoDAsync_v2");
      load(d->memset_d8, "cuMemsetD8Async");
      load(d->mem_host_alloc, "cuMemHostAlloc");
      load(d->get_error_string, "cuGetErrorString");
      load(d->mem_alloc, "cuMemAlloc_v2");
      auto optional = [&](auto& fn, const char* v2, const char* v1) {
        void* f = dlsym(lib, v2);
        if (f == nullptr) f = dlsym(lib, v1);
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(f);
      };
      optional(d->stream_wait_value32, "cuStreamWaitValue32_v2", "cuStreamWaitValue32");
      optional(d->stream_write_value32, "cuStreamWriteValue32_v2", "cuStreamWriteValue32");
      return d;
    }();
    return *d;
  }
};

ffi::Error CudaError(CUresult r, const char* what) {
  const char* msg = "unknown error";
  if (Driver::Get().get_error_string != nullptr) Driver::Get().get_error_string(r, &msg);
  return ffi::Error::Internal(std::string("pgj_fetch: ") + what + " failed: " + msg);
}

#define PGJ_CU(call, what)                       \
  do {                                           \
    CUresult r_ = (call);                        \
    if (r_ != 0) return CudaError(r_, what);     \
  } while (0)

// Per CUDA context: the copy stream and, with PREGATED_JAX_DMA_DEVICE_WAIT=1 where the driver supports stream
// memory operations, a counter in device memory that the copy stream advances after each start's copies
// (see Copier::Done).
struct Channel {
  CUstream copy_stream = nullptr;
  CUdeviceptr counter = 0;  // 0: no device wait (not asked for, or unsupported); dones block the host
  uint32_t next_seq = 0;
};

// One start's copies, from the start (which only enqueues reading the ids) to the done.
struct Ticket {
  CUcontext ctx = nullptr;
  Channel* channel = nullptr;
  CUevent ids_ready = nullptr;  // recorded on the compute stream after the ids' device->host copy
  CUevent copied = nullptr;     // recorded on the copy stream after the tables' copies
  int32_t* ids = nullptr;       // pinned host memory, capacity `capacity`
  size_t capacity = 0, k = 0;
  int64_t num_rows = 0;
  uint32_t seq = 0;  // the counter value the copy stream writes once these copies have landed
  std::vector<const char*> src;
  std::vector<CUdeviceptr> dst;
  std::vector<size_t> rows;
  bool enqueued = false;  // the worker has enqueued the copies and marked them (or failed)
  bool done = false;      // the done has run (with a device wait, it does not wait for `enqueued`)
  void* stream = nullptr;  // the compute stream of the start (for the trace)
  std::string error;
};

// Whether environment variable `name` is set to something other than empty or "0...".
bool EnvFlag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// PREGATED_JAX_DMA_TRACE=1: one line on stderr per start, done, drain and worker step (for debugging).
bool TraceOn() {
  static const bool on = EnvFlag("PREGATED_JAX_DMA_TRACE");
  return on;
}

void Trace(const char* what, unsigned long long key, uint32_t seq, size_t k, const void* stream = nullptr) {
  if (!TraceOn()) return;
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(
                      std::chrono::steady_clock::now().time_since_epoch()).count();
  std::fprintf(stderr, "pgj %lld %s key=%llx seq=%u k=%zu stream=%p tid=%ld\n", static_cast<long long>(us), what, key,
               seq, k, stream, static_cast<long>(syscall(SYS_gettid)));
  std::fflush(stderr);
}

// PREGATED_JAX_DMA_DEVICE_WAIT=1: dones inside a program wait on the device (the counter) instead of blocking
// the host. Off by default: it deadlocked on an H100 (see Copier::Done).
bool DeviceWaitEnabled() {
  static const bool enabled = EnvFlag("PREGATED_JAX_DMA_DEVICE_WAIT");
  return enabled;
}

// The worker: waits until a ticket's ids have reached the host, then enqueues its copies. It runs beside
// XLA's thread, which meanwhile goes on launching the computation (a start never blocks it).
class Copier {
 public:
  static Copier& Get() {
    static Copier* c = new Copier();  // never destroyed: its thread lives as long as the process
    return *c;
  }

  ffi::ErrorOr<Ticket*> Acquire(CUcontext ctx, size_t k) {
    Driver& cu = Driver::Get();
    std::unique_lock<std::mutex> lock(mu_);
    Ticket* t = nullptr;
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if ((*it)->ctx == ctx && (*it)->capacity >= k) {
        t = *it;
        free_.erase(it);
        break;
      }
    }
    lock.unlock();
    if (t == nullptr) {
      t = new Ticket();
      t->ctx = ctx;
      t->capacity = std::max<size_t>(k, 256);
      void* p = nullptr;
      if (CUresult r = cu.mem_host_alloc(&p, t->capacity * sizeof(int32_t), 0)) return ffi::Unexpected(CudaError(r, "cuMemHostAlloc"));
      t->ids = static_cast<int32_t*>(p);
      if (CUresult r = cu.event_create(&t->ids_ready, 2)) return ffi::Unexpected(CudaError(r, "cuEventCreate"));
      if (CUresult r = cu.event_create(&t->copied, 2)) return ffi::Unexpected(CudaError(r, "cuEventCreate"));
      auto channel = GetChannel(ctx);
      if (!channel.has_value()) return ffi::Unexpected(channel.error());
      t->channel = *channel;
    }
    t->k = k;
    t->enqueued = t->done = false;
    t->error.clear();
    t->src.clear();
    t->dst.clear();
    t->rows.clear();
    return t;
  }

  // Hands the ticket to the worker; `key` (its first table) is how the done finds it.
  void Submit(CUdeviceptr key, Ticket* t) {
    std::lock_guard<std::mutex> lock(mu_);
    t->seq = ++t->channel->next_seq;  // in queue order: the worker marks tickets in this order
    Trace("submit", key, t->seq, t->k, t->stream);
    in_flight_[key] = t;
    queue_.push_back(t);
    if (!thread_started_) {
      std::thread([this] { Run(); }).detach();
      thread_started_ = true;
    }
    cv_.notify_all();
  }

  // Makes `stream` wait for the copies into table `key`. By default XLA's thread blocks until the worker
  // has enqueued the copies, then the stream waits on their event: the copies are always queued before
  // anything waits for them. With PREGATED_JAX_DMA_DEVICE_WAIT=1 (and a counter), the stream instead
  // waits on the device for the copy stream to pass the ticket's mark and XLA's thread goes on at once,
  // so the copies may be queued after that wait. Since dones run on the thread that dispatches the
  // program, that thread then returns long before the GPU is done, and the next dispatch is queued in
  // time: ~0.18 ms per decode step on an H100 (docs/benchmarks/h100-v7). But it hung there
  // (switch-large-128 speculative prefill; switch-base-128 on-demand at batch 8, reproducibly). It is not
  // a shared hardware queue: batch 8 hung with CUDA_DEVICE_MAX_CONNECTIONS=32 too, and batch 1 ran with 1.
  ffi::Error Done(CUstream stream, CUdeviceptr key, bool host_wait) {
    Driver& cu = Driver::Get();
    std::unique_lock<std::mutex> lock(mu_);
    auto it = in_flight_.find(key);
    if (it == in_flight_.end()) {
      return ffi::Error::Internal("pgj_fetch_done: its tables did not come from pgj_fetch_start");
    }
    Ticket* t = it->second;
    in_flight_.erase(it);
    Trace(t->enqueued ? "done(enqueued)" : "done(pending)", key, t->seq, t->k, stream);
    if (t->channel->counter != 0 && !host_wait) {
      const CUdeviceptr counter = t->channel->counter;
      const uint32_t seq = t->seq;
      std::string error = t->enqueued ? t->error : "";
      t->done = true;
      if (t->enqueued) ReleaseLocked(t);  // else the worker releases it
      if (error.empty()) error = TakeLaterError();
      lock.unlock();
      if (!error.empty()) return ffi::Error::InvalidArgument(error);
      PGJ_CU(cu.stream_wait_value32(stream, counter, seq, /*CU_STREAM_WAIT_VALUE_GEQ=*/0), "cuStreamWaitValue32");
      return ffi::Error::Success();
    }
    cv_.wait(lock, [t] { return t->enqueued; });
    lock.unlock();
    const std::string error = t->error;
    CUresult waited = 0;
    if (error.empty()) {
      waited = cu.stream_wait_event(stream, t->copied, 0);
    } else {
      cu.stream_synchronize(t->channel->copy_stream);  // nothing of it may still be running
    }
    lock.lock();
    t->done = true;
    ReleaseLocked(t);  // after the wait: a reuse re-records its events
    lock.unlock();
    if (!error.empty()) return ffi::Error::InvalidArgument(error);
    if (waited != 0) return CudaError(waited, "cuStreamWaitEvent");
    return ffi::Error::Success();
  }

  // A new start writes to `key` while an older ticket for it was never waited for (its program failed
  // between start and done): let the old copies finish before the memory is written again.
  void Drain(CUdeviceptr key) {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = in_flight_.find(key);
    if (it == in_flight_.end()) return;
    Ticket* t = it->second;
    in_flight_.erase(it);
    Trace("drain", key, t->seq, t->k);
    cv_.wait(lock, [t] { return t->enqueued; });
    Trace("drained", key, t->seq, t->k);
    t->done = true;
    ReleaseLocked(t);
    CUstream copy_stream = t->channel->copy_stream;
    lock.unlock();
    Driver::Get().stream_synchronize(copy_stream);
  }

  void Release(Ticket* t) {
    std::lock_guard<std::mutex> lock(mu_);
    ReleaseLocked(t);
  }

  // An error a worker met after its ticket's done had returned: reported by the next start or done.
  std::string TakeLaterError() {
    std::string e;
    e.swap(later_error_);
    return e;
  }

  std::string TakeLaterErrorLocking() {
    std::lock_guard<std::mutex> lock(mu_);
    return TakeLaterError();
  }

 private:
  void ReleaseLocked(Ticket* t) { free_.push_back(t); }

  // The context's channel; where the device wait is asked for, probes once whether the driver runs stream
  // memory operations.
  ffi::ErrorOr<Channel*> GetChannel(CUcontext ctx) {
    Driver& cu = Driver::Get();
    std::lock_guard<std::mutex> lock(mu_);
    Channel*& channel = channels_[ctx];
    if (channel != nullptr) return channel;
    auto* c = new Channel();
    if (CUresult r = cu.stream_create(&c->copy_stream, /*CU_STREAM_NON_BLOCKING=*/1)) {
      delete c;
      return ffi::Unexpected(CudaError(r, "cuStreamCreate"));
    }
    CUdeviceptr counter = 0;
    if (DeviceWaitEnabled() && cu.stream_wait_value32 != nullptr && cu.stream_write_value32 != nullptr &&
        cu.mem_alloc(&counter, 4) == 0 &&
        cu.memset_d8(counter, 0, 4, c->copy_stream) == 0 &&
        cu.stream_write_value32(c->copy_stream, counter, 0, 0) == 0 &&
        cu.stream_wait_value32(c->copy_stream, counter, 0, /*GEQ*/ 0) == 0 &&
        cu.stream_synchronize(c->copy_stream) == 0) {
      c->counter = counter;
    }
    channel = c;
    return channel;
  }

  void Run() {
    Driver& cu = Driver::Get();
    CUcontext current = nullptr;
    for (;;) {
      Ticket* t;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return !queue_.empty(); });
        t = queue_.front();
        queue_.erase(queue_.begin());
      }
      if (t->ctx != current) {
        cu.ctx_set_current(t->ctx);
        current = t->ctx;
      }
      Trace("worker-begin", t->dst.empty() ? 0 : t->dst[0], t->seq, t->k);
      Enqueue(cu, t);
      Trace(t->error.empty() ? "worker-enqueued" : "worker-failed", t->dst.empty() ? 0 : t->dst[0], t->seq, t->k);
      const CUstream copy_stream = t->channel->copy_stream;
      const CUdeviceptr counter = t->channel->counter;
      const uint32_t seq = t->seq;
      {
        std::lock_guard<std::mutex> lock(mu_);
        t->enqueued = true;
        if (t->done) {  // its done has returned already: report a failure later, recycle the ticket
          if (!t->error.empty() && later_error_.empty()) later_error_ = t->error;
          ReleaseLocked(t);
        }
      }
      cv_.notify_all();
      // Advanced after the failure is on record (so whoever the mark releases sees it), failed or not
      // (so that no stream waits forever).
      if (counter != 0) {
        if (CUresult r = cu.stream_write_value32(copy_stream, counter, seq, 0)) {
          std::lock_guard<std::mutex> lock(mu_);
          if (later_error_.empty()) later_error_ = CudaError(r, "cuStreamWriteValue32").message();
        }
      }
    }
  }

  static void Enqueue(Driver& cu, Ticket* t) {
    // Everything the compute stream ran before the start is done once the ids are here, including
    // earlier users of the tables' memory.
    // Polled, not cuEventSynchronize: under XLA's blocking-sync context a sleeping wait wakes tens of
    // microseconds late, and every microsecond here delays the copy.
    CUresult r;
    while ((r = cu.event_query(t->ids_ready)) == /*CUDA_ERROR_NOT_READY=*/600) std::this_thread::yield();
    if (r != 0) {
      t->error = CudaError(r, "waiting for the expert ids").message();
      return;
    }
    if (ffi::Error err = CheckIds(t->ids, t->k, t->num_rows); err.failure()) {
      t->error = err.message();
      return;
    }
    CUstream copy_stream = t->channel->copy_stream;
    for (size_t n = 0; n < t->src.size(); ++n) {
      const size_t row = t->rows[n];
      CUresult failed = 0;
      ForEachRun(
          t->ids, t->k,
          [&](size_t slot, size_t e, size_t count) {
            if (CUresult r = cu.memcpy_htod(t->dst[n] + slot * row, t->src[n] + e * row, count * row, copy_stream)) failed = r;
          },
          [&](size_t slot, size_t count) {
            if (CUresult r = cu.memset_d8(t->dst[n] + slot * row, 0, count * row, copy_stream)) failed = r;
          });
      if (failed != 0) {
        t->error = CudaError(failed, "enqueueing an expert copy").message();
        return;
      }
    }
    if (CUresult r = cu.event_record(t->copied, copy_stream)) t->error = CudaError(r, "cuEventRecord").message();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Ticket*> queue_, free_;
  std::unordered_map<CUdeviceptr, Ticket*> in_flight_;
  std::unordered_map<CUcontext, Channel*> channels_;
  std::string later_error_;
  bool thread_started_ = false;
};

ffi::Error StartCuda(void* stream, ffi::Buffer<ffi::S32> ids, ffi::RemainingArgs /*after*/, ffi::RemainingRets rets,
                     ffi::Span<const int64_t> srcs, ffi::Span<const int64_t> row_bytes, int64_t num_rows) {
  const size_t k = ids.element_count();
  auto plan = MakePlan(k, rets, srcs, row_bytes);
  if (!plan.has_value()) return plan.error();
  Driver& cu = Driver::Get();
  if (!cu.error.empty()) return ffi::Error::Internal("pgj_fetch_start: " + cu.error);
  Copier& copier = Copier::Get();
  if (std::string later = copier.TakeLaterErrorLocking(); !later.empty()) return ffi::Error::InvalidArgument(later);
  CUcontext ctx = nullptr;
  if (cu.ctx_get_current(&ctx) != 0 || ctx == nullptr) return ffi::Error::Internal("pgj_fetch_start: no current CUDA context");
  const CUdeviceptr key = reinterpret_cast<CUdeviceptr>(plan->dst[0]);
  copier.Drain(key);
  auto acquired = copier.Acquire(ctx, k);
  if (!acquired.has_value()) return acquired.error();
  Ticket* t = *acquired;
  t->num_rows = num_rows;
  for (size_t n = 0; n < srcs.size(); ++n) {
    t->src.push_back(reinterpret_cast<const char*>(srcs[n]));
    t->dst.push_back(reinterpret_cast<CUdeviceptr>(plan->dst[n]));
    t->rows.push_back(plan->rows[n]);
  }
  // Only enqueued here: the ids reach the host when the compute stream gets to this point.
  CUresult r = cu.memcpy_dtoh(t->ids, reinterpret_cast<CUdeviceptr>(ids.typed_data()), k * sizeof(int32_t), stream);
  if (r == 0) r = cu.event_record(t->ids_ready, stream);
  t->stream = stream;
  if (r == 0) r = cu.memset_d8(reinterpret_cast<CUdeviceptr>(plan->token), 0, sizeof(int32_t), stream);
  if (r != 0) {
    copier.Release(t);
    return CudaError(r, "enqueueing the expert ids' copy");
  }
  copier.Submit(key, t);
  return ffi::Error::Success();
}

ffi::Error DoneCuda(void* stream, ffi::RemainingArgs args, ffi::RemainingRets rets, bool host_wait) {
  Driver& cu = Driver::Get();
  if (!cu.error.empty()) return ffi::Error::Internal("pgj_fetch_done: " + cu.error);
  if (rets.size() == 0 || args.size() < rets.size()) {
    return ffi::Error::InvalidArgument("pgj_fetch_done: expects the start's tables, then dependencies");
  }
  auto first = args.get<ffi::AnyBuffer>(0);
  if (!first.has_value()) return first.error();
  if (ffi::Error err = Copier::Get().Done(stream, reinterpret_cast<CUdeviceptr>(first->untyped_data()), host_wait); err.failure()) {
    return err;
  }
  for (size_t n = 0; n < rets.size(); ++n) {
    auto in = args.get<ffi::AnyBuffer>(n);
    auto out = rets.get<ffi::AnyBuffer>(n);
    if (!in.has_value() || !out.has_value()) return ffi::Error::InvalidArgument("pgj_fetch_done: bad operands");
    if (in->untyped_data() != (*out)->untyped_data()) {
      PGJ_CU(cu.memcpy_dtod(reinterpret_cast<CUdeviceptr>((*out)->untyped_data()),
                            reinterpret_cast<CUdeviceptr>(in->untyped_data()), in->size_bytes(), stream),
             "copying a table");
    }
  }
  return ffi::Error::Success();
}

ffi::Error OrderCuda(void* stream, ffi::AnyBuffer x, ffi::RemainingArgs /*after*/, ffi::Result<ffi::AnyBuffer> out) {
  if (x.untyped_data() == out->untyped_data()) return ffi::Error::Success();  // aliased: nothing to do
  Driver& cu = Driver::Get();
  if (!cu.error.empty()) return ffi::Error::Internal("pgj_order: " + cu.error);
  PGJ_CU(cu.memcpy_dtod(reinterpret_cast<CUdeviceptr>(out->untyped_data()),
                        reinterpret_cast<CUdeviceptr>(x.untyped_data()), x.size_bytes(), stream),
         "pgj_order: copying its operand");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjOrderCpu, OrderCpu,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().RemainingArgs().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjOrderCuda, OrderCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchStartCpu, StartCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("srcs")
                                  .Attr<ffi::Span<const int64_t>>("row_bytes")
                                  .Attr<int64_t>("num_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchDoneCpu, DoneCpu,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attr<bool>("host_wait"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchStartCuda, StartCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("srcs")
                                  .Attr<ffi::Span<const int64_t>>("row_bytes")
                                  .Attr<int64_t>("num_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchDoneCuda, DoneCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<bool>("host_wait"));
