// The device side of pgj_fetch_start and pgj_fetch_done on a CUDA device: two kernels on XLA's compute
// stream. Neither involves the host thread that launches them, so XLA can record both into CUDA graphs.
//
// pgj_post (start): takes the next sequence number, posts a request (the ids, where to copy from and to)
// into a ring in pinned host memory, and writes the number into the start's token. A worker thread on
// the host polls the ring, enqueues the copies on a copy stream (copy-engine transfers only, never a
// kernel), then a 4-byte copy that advances `counter` to the request's number.
//
// pgj_wait_fill (done):
// 1. zeroes the rows of the tables whose slot id is -1 (no copy lands there; XLA's ragged_dot may
//    multiply every group, and a stale NaN times zero is NaN);
// 2. if any slot id is >= 0, one thread spins until `counter` reaches the start's number (its token).
//    A start whose ids are all -1 copies nothing, and its done does not wait: a correct guess costs no
//    round trip through the host;
// 3. with PREGATED_JAX_DMA_TRACE=1 (`marks` not null) it records when its wait began and ended, on the
//    device's clock, for the worker's trace;
// 4. past `timeout_ns` it gives up and records the fault in pinned host memory (the host reports it), so
//    that a lost copy surfaces as an error, not a hang.
//
// expert_copy.cc embeds the PTX of this file (expert_copy_kernels.ptx.inc) and defines the same structs.
// Regenerate it after an edit with
//   python -m pregated_jax.native --regenerate-ptx        (needs nvcc)

#define PGJ_MAX_TABLES 4
#define PGJ_MAX_IDS 1024

struct Request {                // one slot of the ring (pinned host memory)
  unsigned seq;                 // written last: the slot holds request `seq` once it reads so
  int k;                        // ids
  int n;                        // tables
  int pad;
  long long num_rows;           // rows of each source stack
  unsigned long long posted_ns;  // the device's clock (globaltimer) when the request was posted
  unsigned long long src[PGJ_MAX_TABLES];  // host addresses of the stacks
  unsigned long long dst[PGJ_MAX_TABLES];  // device addresses of the tables
  unsigned long long row[PGJ_MAX_TABLES];  // bytes per row
  int ids[PGJ_MAX_IDS];
};

struct Tables {
  unsigned long long ptr[PGJ_MAX_TABLES];  // device addresses of up to 4 tables [k, row]
  unsigned long long row[PGJ_MAX_TABLES];  // bytes of one row of each
  int n;
};

struct Fault {  // pinned host memory; code 0: none
  unsigned code, seq, a, b;
};

struct WaitMark {  // pinned host memory, PREGATED_JAX_DMA_TRACE only: when a done's wait began and ended
  unsigned long long seq, start_ns, end_ns;
};

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// One block. `ring` has `ring_size` slots; `next_seq` (device) holds the last number handed out.
extern "C" __global__ void pgj_post(const int* ids, int k, unsigned* next_seq, Request* ring, unsigned ring_size,
                                    unsigned* token, Tables src, Tables dst, long long num_rows) {
  __shared__ unsigned seq;
  if (threadIdx.x == 0) {
    seq = *next_seq + 1;
    *next_seq = seq;
  }
  __syncthreads();
  volatile Request* r = ring + seq % ring_size;
  for (int i = threadIdx.x; i < k; i += blockDim.x) r->ids[i] = ids[i];
  if (threadIdx.x == 0) {
    r->k = k;
    r->n = src.n;
    r->num_rows = num_rows;
    for (int j = 0; j < src.n; ++j) {
      r->src[j] = src.ptr[j];
      r->dst[j] = dst.ptr[j];
      r->row[j] = src.row[j];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    r->posted_ns = globaltimer();
    __threadfence_system();  // the request's contents before its number
    r->seq = seq;
    *token = seq;
  }
}

extern "C" __global__ void pgj_wait_fill(const int* ids, int k, const unsigned* token, const volatile unsigned* counter,
                                         unsigned long long timeout_ns, volatile Fault* fault, Tables t,
                                         volatile WaitMark* marks, unsigned num_marks) {
  const unsigned long long tid = blockIdx.x * static_cast<unsigned long long>(blockDim.x) + threadIdx.x;
  const unsigned long long stride = gridDim.x * static_cast<unsigned long long>(blockDim.x);
  bool any_copy = false;
  for (int i = 0; i < k; ++i) {
    if (ids[i] >= 0) {
      any_copy = true;
      continue;
    }
    for (int j = 0; j < t.n; ++j) {
      char* row = reinterpret_cast<char*>(t.ptr[j]) + static_cast<unsigned long long>(i) * t.row[j];
      if (((t.ptr[j] | t.row[j]) & 15) == 0) {
        uint4* words = reinterpret_cast<uint4*>(row);
        for (unsigned long long w = tid; w < t.row[j] / 16; w += stride) words[w] = make_uint4(0, 0, 0, 0);
      } else {
        for (unsigned long long b = tid; b < t.row[j]; b += stride) row[b] = 0;
      }
    }
  }
  if (tid != 0 || !any_copy) return;
  const unsigned seq = *token;
  const unsigned long long start = globaltimer();
  while (static_cast<int>(*counter - seq) < 0) {
    if (globaltimer() - start > timeout_ns) {
      fault->seq = seq;
      fault->a = *counter;
      __threadfence_system();
      fault->code = 1;
      __threadfence_system();
      return;
    }
  }
  if (marks != nullptr) {  // tracing: record the wait in slot seq % num_marks
    volatile WaitMark* m = marks + seq % num_marks;
    m->start_ns = start;
    m->end_ns = globaltimer();
    __threadfence_system();
    m->seq = seq;
  }
  __threadfence();
}
