// Expert copies host -> device on the copy engine, with the expert ids decided on the device.
//
// Two XLA FFI custom calls, used as a pair inside a jitted program:
//
//   pgj_fetch_start(ids s32[k]) -> (out_0 [k, ...], ..., out_{n-1} [k, ...], token s32[])
//     attrs: srcs (int64[n], host addresses of n stacks [E, ...]), row_bytes (int64[n], bytes of one
//            stack row), num_rows (int64, E)
//   pgj_fetch_done(out_0, ..., out_{n-1}, *after) -> (out_0, ..., out_{n-1})   (outputs alias inputs;
//     `after` are ignored operands that order the call after their producers)
//
// Row i of every out_t receives row ids[i] of stack t, or zeros where ids[i] < 0.
//
// On a CUDA device, start only enqueues, on XLA's compute stream, a copy of the ids to pinned host memory
// and an event, and hands the rest to a worker thread: it waits for the event (the routing decision has
// been computed), then enqueues the row copies as copy-engine transfers on a separate copy stream and
// records a second event. Consecutive expert ids become one transfer. Done blocks XLA's thread until the
// worker has enqueued the copies, then makes the compute stream wait for them. So XLA goes on launching
// the computation between start and done, which runs on the SMs while the copy engine moves the bytes.
// (Copies that XLA emits itself for a device-side index are kernels reading host memory; they run in
// series with the computation: docs/benchmarks/h100-copy-overlap.) The CUDA driver is opened with dlopen,
// so the same library loads on machines without one, where only the CPU handlers are used.
//
// On the CPU (host and "device" memory are the same), start copies the rows with memcpy and done is the
// identity: the tests run the same calls and the same validation.

#include <dlfcn.h>

#include <algorithm>
#include <condition_variable>
#include <cstdint>
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

ffi::Error StartCpu(ffi::Buffer<ffi::S32> ids, ffi::RemainingRets rets, ffi::Span<const int64_t> srcs,
                    ffi::Span<const int64_t> row_bytes, int64_t num_rows) {
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

ffi::Error DoneCpu(ffi::RemainingArgs args, ffi::RemainingRets rets) {
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

// --- CUDA, through the driver API opened at run time --------------------------------------------

using CUresult = int;
using CUdeviceptr = unsigned long long;
using CUstream = void*;
using CUevent = void*;
using CUcontext = void*;

struct Driver {
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*ctx_set_current)(CUcontext) = nullptr;
  CUresult (*event_synchronize)(CUevent) = nullptr;
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
      load(d->event_synchronize, "cuEventSynchronize");
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

// One start's copies, from the start (which only enqueues reading the ids) to the done.
struct Ticket {
  CUcontext ctx = nullptr;
  CUstream copy_stream = nullptr;
  CUevent ids_ready = nullptr;  // recorded on the compute stream after the ids' device->host copy
  CUevent copied = nullptr;     // recorded on the copy stream after the tables' copies
  int32_t* ids = nullptr;       // pinned host memory, capacity `capacity`
  size_t capacity = 0, k = 0;
  int64_t num_rows = 0;
  std::vector<const char*> src;
  std::vector<CUdeviceptr> dst;
  std::vector<size_t> rows;
  bool enqueued = false;  // the worker has enqueued the copies and recorded `copied` (or failed)
  std::string error;
};

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
      lock.lock();
      CUstream& stream = copy_streams_[ctx];  // one copy stream per context, so copies stay in order
      if (stream == nullptr) {
        if (CUresult r = cu.stream_create(&stream, /*CU_STREAM_NON_BLOCKING=*/1)) return ffi::Unexpected(CudaError(r, "cuStreamCreate"));
      }
      t->copy_stream = stream;
      lock.unlock();
    }
    t->k = k;
    t->enqueued = false;
    t->error.clear();
    t->src.clear();
    t->dst.clear();
    t->rows.clear();
    return t;
  }

  // Hands the ticket to the worker; `key` (its first table) is how the done finds it.
  void Submit(CUdeviceptr key, Ticket* t) {
    std::lock_guard<std::mutex> lock(mu_);
    in_flight_[key] = t;
    queue_.push_back(t);
    if (!thread_started_) {
      std::thread([this] { Run(); }).detach();
      thread_started_ = true;
    }
    cv_.notify_all();
  }

  // Blocks until the worker has enqueued the ticket of table `key`; removes it. nullptr: unknown key.
  Ticket* Wait(CUdeviceptr key) {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = in_flight_.find(key);
    if (it == in_flight_.end()) return nullptr;
    Ticket* t = it->second;
    cv_.wait(lock, [t] { return t->enqueued; });
    in_flight_.erase(it);
    return t;
  }

  // A new start writes to `key` while an older ticket for it was never waited for (its program failed
  // between start and done): let the old copies finish before the memory is written again.
  void Drain(CUdeviceptr key) {
    Ticket* old = Wait(key);
    if (old != nullptr) {
      Driver::Get().stream_synchronize(old->copy_stream);
      Release(old);
    }
  }

  void Release(Ticket* t) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(t);
  }

 private:
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
      Enqueue(cu, t);
      {
        std::lock_guard<std::mutex> lock(mu_);
        t->enqueued = true;
      }
      cv_.notify_all();
    }
  }

  static void Enqueue(Driver& cu, Ticket* t) {
    // Everything the compute stream ran before the start is done once the ids are here, including
    // earlier users of the tables' memory.
    if (CUresult r = cu.event_synchronize(t->ids_ready)) {
      t->error = CudaError(r, "waiting for the expert ids").message();
      return;
    }
    if (ffi::Error err = CheckIds(t->ids, t->k, t->num_rows); err.failure()) {
      t->error = err.message();
      return;
    }
    for (size_t n = 0; n < t->src.size(); ++n) {
      const size_t row = t->rows[n];
      CUresult failed = 0;
      ForEachRun(
          t->ids, t->k,
          [&](size_t slot, size_t e, size_t count) {
            if (CUresult r = cu.memcpy_htod(t->dst[n] + slot * row, t->src[n] + e * row, count * row, t->copy_stream)) failed = r;
          },
          [&](size_t slot, size_t count) {
            if (CUresult r = cu.memset_d8(t->dst[n] + slot * row, 0, count * row, t->copy_stream)) failed = r;
          });
      if (failed != 0) {
        t->error = CudaError(failed, "enqueueing an expert copy").message();
        return;
      }
    }
    if (CUresult r = cu.event_record(t->copied, t->copy_stream)) t->error = CudaError(r, "cuEventRecord").message();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Ticket*> queue_, free_;
  std::unordered_map<CUdeviceptr, Ticket*> in_flight_;
  std::unordered_map<CUcontext, CUstream> copy_streams_;
  bool thread_started_ = false;
};

ffi::Error StartCuda(void* stream, ffi::Buffer<ffi::S32> ids, ffi::RemainingRets rets,
                     ffi::Span<const int64_t> srcs, ffi::Span<const int64_t> row_bytes, int64_t num_rows) {
  const size_t k = ids.element_count();
  auto plan = MakePlan(k, rets, srcs, row_bytes);
  if (!plan.has_value()) return plan.error();
  Driver& cu = Driver::Get();
  if (!cu.error.empty()) return ffi::Error::Internal("pgj_fetch_start: " + cu.error);
  CUcontext ctx = nullptr;
  if (cu.ctx_get_current(&ctx) != 0 || ctx == nullptr) return ffi::Error::Internal("pgj_fetch_start: no current CUDA context");
  Copier& copier = Copier::Get();
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
  if (r == 0) r = cu.memset_d8(reinterpret_cast<CUdeviceptr>(plan->token), 0, sizeof(int32_t), stream);
  if (r != 0) {
    copier.Release(t);
    return CudaError(r, "enqueueing the expert ids' copy");
  }
  copier.Submit(key, t);
  return ffi::Error::Success();
}

ffi::Error DoneCuda(void* stream, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  Driver& cu = Driver::Get();
  if (!cu.error.empty()) return ffi::Error::Internal("pgj_fetch_done: " + cu.error);
  if (rets.size() == 0 || args.size() < rets.size()) {
    return ffi::Error::InvalidArgument("pgj_fetch_done: expects the start's tables, then dependencies");
  }
  auto first = args.get<ffi::AnyBuffer>(0);
  if (!first.has_value()) return first.error();
  Copier& copier = Copier::Get();
  Ticket* t = copier.Wait(reinterpret_cast<CUdeviceptr>(first->untyped_data()));
  if (t == nullptr) return ffi::Error::Internal("pgj_fetch_done: its tables did not come from pgj_fetch_start");
  std::string error = t->error;
  CUresult waited = error.empty() ? cu.stream_wait_event(stream, t->copied, 0) : 0;
  if (!error.empty()) cu.stream_synchronize(t->copy_stream);  // nothing of it may still be running
  copier.Release(t);
  if (!error.empty()) return ffi::Error::InvalidArgument(error);
  if (waited != 0) return CudaError(waited, "cuStreamWaitEvent");
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchStartCpu, StartCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("srcs")
                                  .Attr<ffi::Span<const int64_t>>("row_bytes")
                                  .Attr<int64_t>("num_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchDoneCpu, DoneCpu, ffi::Ffi::Bind().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchStartCuda, StartCuda,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<void*>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("srcs")
                                  .Attr<ffi::Span<const int64_t>>("row_bytes")
                                  .Attr<int64_t>("num_rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PgjFetchDoneCuda, DoneCuda,
                              ffi::Ffi::Bind().Ctx<ffi::PlatformStream<void*>>().RemainingArgs().RemainingRets());
