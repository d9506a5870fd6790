// A small CPU emulation of the CUDA execution model, for testing csrc/topk.cu's kernels on a
// machine without a GPU (tests/test_topk.py compiles driver.cpp against it, with ASan).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread. A fiber runs until it
// reaches a synchronisation point (__syncthreads, a warp shuffle / ballot) or ends; the scheduler
// then runs the next one, in a random (seeded) order under one of two schedules picked by the
// seed's parity: "sweep" runs every runnable fiber once per round; "warp ahead" lets one random
// warp run through all its warp primitives up to the next barrier while the other warps wait. A
// missing __syncthreads between a shared-memory write and another thread's read, or a buffer
// reused while a slower warp still reads it, shows up as wrong results on some seeds (both were
// checked by planting them in topk.cu). Strict checks, each a hard failure (exit code 3):
//   * __syncthreads must be reached by every thread of the block (none may have exited);
//   * a warp primitive must be reached by all 32 lanes, at the same call site and kind, with a
//     full mask (the kernels use only full-warp primitives);
//   * FASTGPT_INVARIANT conditions of the kernels.
// Shared memory (FASTGPT_SHARED) is filled with 0xA5 or 0xFF bytes at the start of every block,
// so code that reads it before writing it sees garbage, as on a GPU. Blocks run one at a time, in a
// random order. Global memory is plain host memory: AddressSanitizer catches out-of-bounds accesses.
// Not emulated: concurrency inside a segment between synchronisation points (no data race
// *within* such a segment can be observed), the memory model beyond that, launch limits.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <unordered_map>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
using cudaStream_t = void*;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s\n", what);
  std::fflush(stderr);
  std::_Exit(3);
}

inline void invariant(bool ok, const char* cond, const char* file, int line) {
  if (!ok) {
    std::fprintf(stderr, "cuda_emu: invariant failed: %s at %s:%d\n", cond, file, line);
    std::fflush(stderr);
    std::_Exit(3);
  }
}

enum class State { Ready, AtBarrier, AtWarp, Done };
enum class WarpOp { ShflIdx, ShflUp, ShflXor, Ballot };
// Sweep: all runnable fibers, shuffled, then all warps resolved. WarpAhead: one random warp at a
// time runs as far as it can (see run_block).
enum class Policy { Sweep, WarpAhead };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  State state = State::Done;
  WarpOp op = WarpOp::Ballot;
  int site = 0;
  int param = 0;
  uint64_t value = 0;
  uint64_t result = 0;
};

// Small stacks keep ASan's swapcontext interceptor cheap (it clears the shadow of the whole target
// stack on every switch); the lowest page is a guard page, so an overflow faults loudly.
constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kGuardBytes = 4096;

struct Runtime {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
  std::mt19937_64 rng{12345};
  uint64_t block_serial = 0;
  std::unordered_map<void*, uint64_t> shared_epoch;
  uint3 tid{0, 0, 0};
  uint3 bid{0, 0, 0};
  dim3 bdim;
  dim3 gdim;
  uint64_t switches = 0;
  Policy policy = Policy::Sweep;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

// The seed fixes the random schedule; odd seeds use the WarpAhead policy, even ones Sweep.
inline void seed(uint64_t s) {
  rt().rng.seed(s);
  rt().policy = (s & 1) ? Policy::WarpAhead : Policy::Sweep;
}

template <class T>
T* shared_fresh(T* p) {
  Runtime& r = rt();
  uint64_t& epoch = r.shared_epoch[static_cast<void*>(p)];
  if (epoch != r.block_serial) {
    // Alternate the poison between blocks: 0xA5.. (huge counts, mid-range keys) and 0xFF..
    // (all-ones: the largest composite, a NaN).
    std::memset(static_cast<void*>(p), (r.block_serial & 1) ? 0xA5 : 0xFF, sizeof(T));
    epoch = r.block_serial;
  }
  return p;
}

inline void yield_to_scheduler() {
  Runtime& r = rt();
  ++r.switches;
  swapcontext(&r.fibers[r.current].ctx, &r.scheduler);
}

inline void fiber_entry() {
  Runtime& r = rt();
  r.body();
  r.fibers[r.current].state = State::Done;
  // Returning resumes uc_link: the scheduler.
}

inline uint64_t warp_op(WarpOp op, uint64_t value, int param, unsigned mask, int site) {
  if (mask != 0xFFFFFFFFu) fail("only full-warp masks are emulated");
  Runtime& r = rt();
  Fiber& f = r.fibers[r.current];
  f.state = State::AtWarp;
  f.op = op;
  f.value = value;
  f.param = param;
  f.site = site;
  yield_to_scheduler();
  return r.fibers[r.current].result;
}

// Resolve warp w if all its lanes wait at a warp primitive; returns whether it did.
inline bool resolve_warp(int w) {
  Runtime& r = rt();
  Fiber* lanes = &r.fibers[32 * w];
  int waiting = 0;
  for (int l = 0; l < 32; ++l) waiting += lanes[l].state == State::AtWarp;
  if (waiting == 0) return false;
  if (waiting != 32) fail("warp primitive reached by only some lanes of a warp (divergence or exited lanes)");
  for (int l = 1; l < 32; ++l) {
    if (lanes[l].op != lanes[0].op || lanes[l].site != lanes[0].site) {
      fail("lanes of a warp are at different warp primitives");
    }
  }
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l) ballot |= (lanes[l].value ? uint64_t{1} : 0) << l;
  for (int l = 0; l < 32; ++l) {
    Fiber& f = lanes[l];
    switch (f.op) {
      case WarpOp::ShflIdx:
        f.result = lanes[f.param & 31].value;
        break;
      case WarpOp::ShflUp: {
        if (f.param != lanes[0].param) fail("__shfl_up_sync with lane-dependent delta");
        const int src = l - f.param;
        f.result = src >= 0 ? lanes[src].value : f.value;
        break;
      }
      case WarpOp::ShflXor:
        f.result = lanes[l ^ (f.param & 31)].value;
        break;
      case WarpOp::Ballot:
        f.result = ballot;
        break;
    }
  }
  for (int l = 0; l < 32; ++l) lanes[l].state = State::Ready;
  return true;
}

inline void run_block(unsigned n_threads) {
  Runtime& r = rt();
  if (n_threads == 0 || n_threads % 32 != 0) fail("block size must be a positive multiple of 32");
  while (r.fibers.size() < n_threads) {
    r.fibers.emplace_back();
    void* mem = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) fail("mmap of a fiber stack failed");
    if (mprotect(mem, kGuardBytes, PROT_NONE) != 0) fail("mprotect of a stack guard page failed");
    r.fibers.back().stack = static_cast<char*>(mem) + kGuardBytes;
  }
  ++r.block_serial;
  for (unsigned i = 0; i < n_threads; ++i) {
    Fiber& f = r.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
    f.state = State::Ready;
  }
  std::vector<int> order;
  order.reserve(n_threads);
  const unsigned n_warps = n_threads / 32;
  auto run_fiber = [&](int i) {
    r.current = i;
    r.tid = uint3{static_cast<unsigned>(i), 0, 0};
    ++r.switches;
    swapcontext(&r.scheduler, &r.fibers[i].ctx);
  };
  for (;;) {
    bool progressed = false;
    if (r.policy == Policy::Sweep) {
      // Every runnable fiber runs to its next synchronisation point, in a random order.
      order.clear();
      for (unsigned i = 0; i < n_threads; ++i) {
        if (r.fibers[i].state == State::Ready) order.push_back(static_cast<int>(i));
      }
      std::shuffle(order.begin(), order.end(), r.rng);
      for (int i : order) run_fiber(i);
      for (unsigned w = 0; w < n_warps; ++w) progressed |= resolve_warp(static_cast<int>(w));
    } else {
      // One random warp runs ahead through all its warp primitives up to the next barrier while
      // the others wait where they are: exposes shared memory reused before slower warps read it.
      std::vector<int> warps;
      for (unsigned w = 0; w < n_warps; ++w) {
        for (unsigned l = 0; l < 32; ++l) {
          if (r.fibers[32 * w + l].state == State::Ready) {
            warps.push_back(static_cast<int>(w));
            break;
          }
        }
      }
      if (!warps.empty()) {
        const int w = warps[std::uniform_int_distribution<size_t>(0, warps.size() - 1)(r.rng)];
        do {
          order.clear();
          for (int l = 0; l < 32; ++l) {
            if (r.fibers[32 * w + l].state == State::Ready) order.push_back(32 * w + l);
          }
          std::shuffle(order.begin(), order.end(), r.rng);
          for (int i : order) run_fiber(i);
        } while (resolve_warp(w));
        progressed = true;
      }
    }
    if (progressed) continue;
    unsigned done = 0, at_barrier = 0;
    for (unsigned i = 0; i < n_threads; ++i) {
      done += r.fibers[i].state == State::Done;
      at_barrier += r.fibers[i].state == State::AtBarrier;
    }
    if (done == n_threads) return;
    if (at_barrier + done != n_threads) fail("deadlock");
    if (done != 0) fail("__syncthreads reached by only part of the block (some threads exited)");
    for (unsigned i = 0; i < n_threads; ++i) r.fibers[i].state = State::Ready;
  }
}

// kernel<<<grid, block>>>: runs every block, one after the other, in a random order.
template <class Body>
void launch(dim3 grid, dim3 block, cudaStream_t /*stream*/, Body&& body) {
  Runtime& r = rt();
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) fail("only 1-D launches are emulated");
  if (block.x > 1024) fail("more than 1024 threads per block");
  r.body = std::function<void()>(body);
  r.gdim = grid;
  r.bdim = block;
  std::vector<unsigned> blocks(grid.x);
  for (unsigned b = 0; b < grid.x; ++b) blocks[b] = b;
  std::shuffle(blocks.begin(), blocks.end(), r.rng);
  for (unsigned b : blocks) {
    r.bid = uint3{b, 0, 0};
    run_block(block.x);
  }
  r.body = nullptr;
}

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp primitives on values of at most 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <class T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace emu

#define threadIdx (::emu::rt().tid)
#define blockIdx (::emu::rt().bid)
#define blockDim (::emu::rt().bdim)
#define gridDim (::emu::rt().gdim)

inline void __syncthreads() {
  emu::Runtime& r = emu::rt();
  r.fibers[r.current].state = emu::State::AtBarrier;
  emu::yield_to_scheduler();
}

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32, int site = __builtin_LINE()) {
  if (width != 32) emu::fail("only width-32 shuffles are emulated");
  return emu::from_bits<T>(emu::warp_op(emu::WarpOp::ShflIdx, emu::to_bits(v), src, mask, site));
}

template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, int site = __builtin_LINE()) {
  if (width != 32) emu::fail("only width-32 shuffles are emulated");
  return emu::from_bits<T>(emu::warp_op(emu::WarpOp::ShflUp, emu::to_bits(v), static_cast<int>(delta), mask, site));
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, int site = __builtin_LINE()) {
  if (width != 32) emu::fail("only width-32 shuffles are emulated");
  return emu::from_bits<T>(emu::warp_op(emu::WarpOp::ShflXor, emu::to_bits(v), lane_mask, mask, site));
}

inline unsigned __ballot_sync(unsigned mask, int pred, int site = __builtin_LINE()) {
  return static_cast<unsigned>(emu::warp_op(emu::WarpOp::Ballot, pred != 0 ? 1 : 0, 0, mask, site));
}

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  // One fiber runs at a time and never yields inside: a plain read-modify-write is atomic.
  const unsigned old = *address;
  *address = old + value;
  return old;
}

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
