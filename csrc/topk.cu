// fastgpt::topk on CUDA: top-k over the last dim of a 2-D tensor, several thread blocks per row.
//
//   x: (rows, n) float32 / float16 / bfloat16, any strides, 1 <= k <= n (n < 2^31).
//   values: (rows, k) in x's dtype, sorted descending; indices: (rows, k) int64.
//   Order = a stable descending sort (fastgpt.reference.topk): ties by lower index, NaN above
//   +inf, -0.0 == +0.0. Values are copied bit-exactly from x.
//
// Every element becomes a unique uint64 "composite" (topk_keys.h):
//   composite = order_key(x) << ib | (2^ib - 1 - col),   ib = index_bits(n) in {8, 16, 24, 32},
// (order_key is 32 bits for fp32, 16 for fp16/bf16; composites are < 2^(key bits + ib)),
// whose unsigned order is the op's order, so top-k is "the k largest composites" with no tie rules
// left; 0 is never a composite and marks an empty slot.
//
// Small k (k <= 256, the sampling case):
//   round r (while the row is longer than kFinalCapacity = 4096):
//     chunk_select_kernel, grid (rows * n_chunks): each 512-thread block holds a 4096-element chunk
//     in registers (8 per thread), finds the k-th largest composite of the chunk with a block-wide
//     radix select (8-bit digits from the top, shared-memory histograms, early exit as soon as the
//     boundary digit's bin is taken whole) and writes its min(k, chunk) winners, unordered, to a
//     workspace slot of k entries (unused slots = 0). The next round reads those n_chunks * k
//     candidates as its "row"; each round shrinks the row by at least 4096 / k >= 16.
//   final_select_kernel, grid (rows): one 1024-thread block per row radix-selects the k winners
//     of the last <= 4096 candidates (or of x itself when n <= 4096), ranks them (each winner's
//     rank = number of winners above it, 4 threads per winner) and writes values and indices.
//   For the GPT-2 vocabulary (n = 50257, k = 50): 13 chunk blocks, then one block over 650
//   candidates; two launches, no host sync, no data-dependent allocation (graph-capturable).
// Large k (k > 256; correctness first): composite_kernel writes the int64 composites
//   (ib = 31, so they are non-negative), at::sort sorts each row descending (unique keys: no
//   stability question), gather_kernel decodes the first k.
//
// The device code and the host-side launch sequence (launch_small / launch_large) also compile
// as plain C++ against tests/topk_emu/cuda_emu.h (FASTGPT_TOPK_EMULATE): a CPU emulation of the
// CUDA execution model (one fiber per thread, randomised order between barriers, strict warp
// convergence checks, poisoned shared memory) that tests/test_topk.py runs under AddressSanitizer.
// The torch glue at the bottom is compiled only for the real build.

#include <algorithm>
#include <cstdint>
#include <limits>

#include "topk_keys.h"

#ifdef FASTGPT_TOPK_EMULATE
// tests/topk_emu/cuda_emu.h is included first (it defines the CUDA builtins used here).
#define FASTGPT_SHARED(T, name) \
  static T name##_storage;      \
  T& name = *::emu::shared_fresh(&name##_storage)
#define FASTGPT_LAUNCH(kernel, grid, block, stream, ...) \
  ::emu::launch((grid), (block), (stream), [&] { kernel(__VA_ARGS__); })
#define FASTGPT_INVARIANT(cond) ::emu::invariant((cond), #cond, __FILE__, __LINE__)
#else
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "topk_checks.h"

#define FASTGPT_SHARED(T, name) __shared__ T name
#define FASTGPT_LAUNCH(kernel, grid, block, stream, ...)      \
  do {                                                        \
    kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__);    \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                           \
  } while (0)
// Internal invariants are checked in the emulation only: never a device-side assert.
#define FASTGPT_INVARIANT(cond) ((void)0)
#endif

namespace fastgpt {
namespace topk {

constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kWarpSize = 32;
constexpr int kBins = 256;  // 8-bit radix digits
constexpr int kSmallKMax = 256;
constexpr int kChunkThreads = 512;
constexpr int kChunkPerThread = 8;
constexpr int kChunk = kChunkThreads * kChunkPerThread;  // 4096 elements per chunk block
constexpr int kFinalThreads = 1024;
constexpr int kFinalPerThread = 4;
constexpr int kFinalCapacity = kFinalThreads * kFinalPerThread;  // 4096 candidates per final block
constexpr int kMaxRounds = 8;  // n < 2^31 needs at most 5 chunk rounds
constexpr int kSortIb = 31;    // large-k composites: key << 31 | col field < 2^63, a non-negative int64
constexpr int kElementwiseThreads = 256;

static_assert(kFinalThreads == 4 * kSmallKMax, "the final rank step gives 4 threads to each winner");
static_assert(kBins == 8 * kWarpSize, "warp_choose_digit gives 8 bins to each lane");
static_assert(kSmallKMax < kFinalCapacity && kSmallKMax < kChunk, "every chunk round must shrink the row");

inline bool use_small_path(int64_t k) { return k <= kSmallKMax; }

// Shared memory of one radix select. Three histograms in rotation let a pass clear the histogram
// of the pass after next while it counts, so each pass needs a single __syncthreads (see below).
struct alignas(16) RadixSmem {
  uint32_t hist[3][kBins];
  uint32_t taken;  // output slots handed out by the selection step (atomicAdd)
};

struct alignas(16) FinalSmem {
  RadixSmem radix;
  uint64_t winners[kSmallKMax];
};

// The k winners of a radix select: the nonzero composites c with (c & mask) >= desired. `mask`
// covers the top bits fixed so far, so the compare is "c's prefix >= the boundary prefix".
struct Selection {
  uint64_t desired;
  uint64_t mask;
  uint32_t count;  // number of winners: min(k, nonzero composites)
};

__device__ __forceinline__ bool is_winner(uint64_t c, const Selection& s) {
  return c != 0 && (c & s.mask) >= s.desired;
}

struct DigitChoice {
  uint32_t digit;   // the digit (bin) holding the k_rem-th largest counted element
  uint32_t above;   // counted elements in higher bins (all winners)
  uint32_t in_bin;  // counted elements in that bin
  uint32_t total;   // all counted elements
};

// Run by every warp of the block on the same histogram, so all warps get the same answer without
// a second barrier. Lane l owns bins [248 - 8l, 255 - 8l]: a prefix sum over lanes walks the bins
// from the highest digit down. Requires 1 <= k_rem <= total, except that the result is ignored
// when the caller takes every element (total <= k on the first pass).
__device__ __forceinline__ DigitChoice warp_choose_digit(const uint32_t* hist, uint32_t k_rem) {
  const int lane = static_cast<int>(threadIdx.x) & (kWarpSize - 1);
  // Two 16-byte loads per lane: 8 consecutive bins, conflict-free.
  const uint4* src = reinterpret_cast<const uint4*>(hist + (kBins - 8 * (lane + 1)));
  const uint4 low = src[0];   // bins 248-8l .. 251-8l
  const uint4 high = src[1];  // bins 252-8l .. 255-8l
  // h[b] = count of bin 255 - 8l - b (descending digits).
  const uint32_t h[8] = {high.w, high.z, high.y, high.x, low.w, low.z, low.y, low.x};
  uint32_t sum = 0;
#pragma unroll
  for (int b = 0; b < 8; ++b) sum += h[b];
  uint32_t incl = sum;  // inclusive prefix sum over lanes 0..l
#pragma unroll
  for (int d = 1; d < kWarpSize; d <<= 1) {
    const uint32_t v = __shfl_up_sync(kFullMask, incl, d);
    if (lane >= d) incl += v;
  }
  const uint32_t total = __shfl_sync(kFullMask, incl, kWarpSize - 1);
  const unsigned reached = __ballot_sync(kFullMask, incl >= k_rem);
  const int owner = reached ? __ffs(reached) - 1 : kWarpSize - 1;
  uint32_t cum = incl - sum;
  uint32_t digit = 0, above = 0, in_bin = 0;
  bool found = false;
#pragma unroll
  for (int b = 0; b < 8; ++b) {
    if (!found && cum + h[b] >= k_rem) {
      found = true;
      digit = static_cast<uint32_t>(kBins - 1 - 8 * lane - b);
      above = cum;
      in_bin = h[b];
    }
    cum += h[b];
  }
  DigitChoice out;
  out.digit = __shfl_sync(kFullMask, digit, owner);
  out.above = __shfl_sync(kFullMask, above, owner);
  out.in_bin = __shfl_sync(kFullMask, in_bin, owner);
  out.total = total;
  return out;
}

// Block-wide radix select of the k largest nonzero composites held E per thread in c[].
// total_bits = key bits + ib (a multiple of 8): composites are < 2^total_bits.
//
// Pass p counts, into hist[p % 3], the digit at bits [lo, lo + 8) of the elements whose higher
// bits equal the boundary prefix found so far, and clears hist[(p + 1) % 3] for the next pass.
// After the barrier every warp picks the boundary digit. Hazards: hist[(p + 1) % 3] was last read
// by the digit choice of pass p - 2, which every thread finished before the barrier of pass p - 1;
// hist[p % 3] is next written by the clear of pass p + 2, after the barrier of pass p + 1. The loop
// ends when the boundary bin is taken whole (in_bin == k_rem), at the latest on the last pass
// (composites are unique). The trip count is the same in every thread (block-uniform data).
template <int THREADS, int E>
__device__ __forceinline__ Selection block_radix_select(const uint64_t (&c)[E], uint32_t k, int total_bits,
                                                        RadixSmem& sm) {
  for (int i = threadIdx.x; i < kBins; i += THREADS) sm.hist[0][i] = 0;
  if (threadIdx.x == 0) sm.taken = 0;
  __syncthreads();

  Selection sel;
  sel.desired = 0;
  sel.mask = 0;
  sel.count = k;
  uint32_t k_rem = k;  // winners still to find among the elements matching the prefix
  for (int pass = 0, lo = total_bits - 8; lo >= 0; ++pass, lo -= 8) {
    uint32_t* hist = sm.hist[pass % 3];
#pragma unroll
    for (int j = 0; j < E; ++j) {
      if (c[j] != 0 && (c[j] & sel.mask) == sel.desired) {
        atomicAdd(&hist[static_cast<uint32_t>(c[j] >> lo) & 0xFFu], 1u);
      }
    }
    uint32_t* next = sm.hist[(pass + 1) % 3];
    for (int i = threadIdx.x; i < kBins; i += THREADS) next[i] = 0;
    __syncthreads();

    const DigitChoice ch = warp_choose_digit(hist, k_rem);
    if (pass == 0 && ch.total <= k) {
      sel.count = ch.total;  // no more than k elements at all: every one wins (mask 0)
      break;
    }
    sel.desired |= static_cast<uint64_t>(ch.digit) << lo;
    sel.mask |= uint64_t{0xFF} << lo;
    k_rem -= ch.above;
    if (ch.in_bin == k_rem) break;
  }
  return sel;
}

// Where the composites of a "row" come from: x itself (round 0) ...
template <Fmt F>
struct XSource {
  using bits_t = typename FmtTraits<F>::bits_t;
  const bits_t* x;
  int64_t row_stride;
  int64_t col_stride;
  int ib;
  __device__ __forceinline__ uint64_t load(int64_t row, int64_t col) const {
    return make_composite(order_key<F>(x[row * row_stride + col * col_stride]), static_cast<uint64_t>(col), ib);
  }
};

// ... or the previous round's candidates: (rows, row_len) composites, 0 = empty slot.
struct CandidateSource {
  const uint64_t* cand;
  int64_t row_len;
  __device__ __forceinline__ uint64_t load(int64_t row, int64_t col) const { return cand[row * row_len + col]; }
};

// One block per (row, chunk): writes the chunk's min(k, valid) winners, unordered, to
// out[(row * n_chunks + chunk) * k + slot], and zeros to the rest of its k slots.
template <class Source>
__global__ void __launch_bounds__(kChunkThreads)
    chunk_select_kernel(Source src, int64_t len, int n_chunks, int k, int total_bits, uint64_t* __restrict__ out) {
  FASTGPT_SHARED(RadixSmem, sm);
  const int64_t block = blockIdx.x;
  const int64_t row = block / n_chunks;
  const int64_t chunk = block - row * n_chunks;
  const int64_t begin = chunk * kChunk;

  uint64_t c[kChunkPerThread];
#pragma unroll
  for (int j = 0; j < kChunkPerThread; ++j) {
    // Consecutive threads read consecutive columns (coalesced); past the row end -> empty.
    const int64_t col = begin + j * kChunkThreads + threadIdx.x;
    c[j] = col < len ? src.load(row, col) : 0;
  }
  const Selection sel = block_radix_select<kChunkThreads, kChunkPerThread>(c, static_cast<uint32_t>(k), total_bits, sm);

  uint64_t* dst = out + block * k;
#pragma unroll
  for (int j = 0; j < kChunkPerThread; ++j) {
    if (is_winner(c[j], sel)) {
      const uint32_t slot = atomicAdd(&sm.taken, 1u);
      FASTGPT_INVARIANT(slot < sel.count);
      dst[slot] = c[j];
    }
  }
  for (int i = static_cast<int>(sel.count) + static_cast<int>(threadIdx.x); i < k; i += kChunkThreads) dst[i] = 0;
}

// One block per row: the k (<= kSmallKMax) winners among <= kFinalCapacity composites, sorted.
template <Fmt F, class Source>
__global__ void __launch_bounds__(kFinalThreads)
    final_select_kernel(Source src, int64_t len, int k, int ib, const typename FmtTraits<F>::bits_t* __restrict__ x,
                        int64_t row_stride, int64_t col_stride, typename FmtTraits<F>::bits_t* __restrict__ values,
                        int64_t* __restrict__ indices) {
  FASTGPT_SHARED(FinalSmem, sm);
  const int64_t row = blockIdx.x;

  uint64_t c[kFinalPerThread];
#pragma unroll
  for (int j = 0; j < kFinalPerThread; ++j) {
    const int64_t col = j * kFinalThreads + threadIdx.x;
    c[j] = col < len ? src.load(row, col) : 0;
  }
  const int total_bits = FmtTraits<F>::kWidth + ib;
  const Selection sel = block_radix_select<kFinalThreads, kFinalPerThread>(c, static_cast<uint32_t>(k), total_bits, sm.radix);
  FASTGPT_INVARIANT(sel.count == static_cast<uint32_t>(k));

#pragma unroll
  for (int j = 0; j < kFinalPerThread; ++j) {
    if (is_winner(c[j], sel)) {
      const uint32_t slot = atomicAdd(&sm.radix.taken, 1u);
      FASTGPT_INVARIANT(slot < static_cast<uint32_t>(k));
      sm.winners[slot] = c[j];
    }
  }
  __syncthreads();

  // Rank of winner e = number of winners above it (composites are unique: ranks are a
  // permutation of 0..k-1). Threads 4e..4e+3 each count a quarter; the sum stays inside a warp.
  const int e = static_cast<int>(threadIdx.x) >> 2;
  const int part = static_cast<int>(threadIdx.x) & 3;
  const uint64_t mine = e < k ? sm.winners[e] : 0;
  uint32_t rank = 0;
  if (e < k) {
    for (int j = part; j < k; j += 4) rank += sm.winners[j] > mine ? 1u : 0u;
  }
  rank += __shfl_xor_sync(kFullMask, rank, 1);
  rank += __shfl_xor_sync(kFullMask, rank, 2);
  if (e < k && part == 0) {
    FASTGPT_INVARIANT(rank < static_cast<uint32_t>(k));
    const int64_t col = composite_column(mine, ib);
    values[row * k + rank] = x[row * row_stride + col * col_stride];
    indices[row * k + rank] = col;
  }
}

// Large k, step 1: (rows, n) int64 composites of x (ib = kSortIb), row-major.
template <Fmt F>
__global__ void __launch_bounds__(kElementwiseThreads)
    composite_kernel(const typename FmtTraits<F>::bits_t* __restrict__ x, int64_t rows, int64_t n, int64_t row_stride,
                     int64_t col_stride, int64_t* __restrict__ out) {
  const int64_t total = rows * n;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t r = i / n;
    const int64_t col = i - r * n;
    out[i] = static_cast<int64_t>(
        make_composite(order_key<F>(x[r * row_stride + col * col_stride]), static_cast<uint64_t>(col), kSortIb));
  }
}

// Large k, step 3: decode the first k of each row of the descending-sorted (rows, n) composites.
template <Fmt F>
__global__ void __launch_bounds__(kElementwiseThreads)
    gather_kernel(const int64_t* __restrict__ sorted, int64_t rows, int64_t n, int64_t k,
                  const typename FmtTraits<F>::bits_t* __restrict__ x, int64_t row_stride, int64_t col_stride,
                  typename FmtTraits<F>::bits_t* __restrict__ values, int64_t* __restrict__ indices) {
  const int64_t total = rows * k;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t r = i / k;
    const int64_t j = i - r * k;
    const int64_t col = composite_column(static_cast<uint64_t>(sorted[r * n + j]), kSortIb);
    values[i] = x[r * row_stride + col * col_stride];
    indices[i] = col;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side (shared by the torch glue and the emulation driver)
// ---------------------------------------------------------------------------------------------

// The small-k rounds for a row of length n: round r reads len[r] composites per row in
// n_chunks[r] chunks and leaves len[r + 1] = n_chunks[r] * k candidates; the final kernel reads
// len[rounds] <= kFinalCapacity. Depends on shapes only (graph-capturable).
struct SmallPlan {
  int rounds = 0;
  int64_t len[kMaxRounds + 1] = {};
  int64_t n_chunks[kMaxRounds] = {};
};

inline SmallPlan plan_small(int64_t n, int64_t k) {
  SmallPlan p;
  p.len[0] = n;
  while (p.len[p.rounds] > kFinalCapacity && p.rounds < kMaxRounds) {
    const int64_t chunks = (p.len[p.rounds] + kChunk - 1) / kChunk;
    p.n_chunks[p.rounds] = chunks;
    p.len[p.rounds + 1] = chunks * k;
    ++p.rounds;
  }
  return p;
}

// Workspace (uint64 elements): round r writes buffer r % 2; rounds only shrink, so buffer 0
// sized for round 0 and buffer 1 for round 1 fit every later round.
inline int64_t small_workspace_elems(int64_t rows, const SmallPlan& p) {
  const int64_t a = p.rounds >= 1 ? p.len[1] : 0;
  const int64_t b = p.rounds >= 2 ? p.len[2] : 0;
  return rows * (a + b);
}

inline unsigned elementwise_blocks(int64_t total) {
  const int64_t blocks = (total + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65536));
}

template <Fmt F>
void launch_small(const typename FmtTraits<F>::bits_t* x, int64_t rows, int64_t n, int64_t row_stride,
                  int64_t col_stride, int k, uint64_t* workspace, typename FmtTraits<F>::bits_t* values,
                  int64_t* indices, cudaStream_t stream) {
  const SmallPlan p = plan_small(n, k);
  const int ib = index_bits(n);
  const int total_bits = FmtTraits<F>::kWidth + ib;
  uint64_t* buffers[2] = {workspace, workspace + rows * (p.rounds >= 1 ? p.len[1] : 0)};
  const XSource<F> from_x{x, row_stride, col_stride, ib};
  const uint64_t* cand = nullptr;
  for (int r = 0; r < p.rounds; ++r) {
    uint64_t* out = buffers[r % 2];
    const dim3 grid(static_cast<unsigned>(rows * p.n_chunks[r]));
    const dim3 block(kChunkThreads);
    const int chunks = static_cast<int>(p.n_chunks[r]);
    const int64_t len = p.len[r];
    if (r == 0) {
      auto* kernel = &chunk_select_kernel<XSource<F>>;
      FASTGPT_LAUNCH(kernel, grid, block, stream, from_x, len, chunks, k, total_bits, out);
    } else {
      const CandidateSource from_cand{cand, len};
      auto* kernel = &chunk_select_kernel<CandidateSource>;
      FASTGPT_LAUNCH(kernel, grid, block, stream, from_cand, len, chunks, k, total_bits, out);
    }
    cand = out;
  }
  const dim3 grid(static_cast<unsigned>(rows));
  const dim3 block(kFinalThreads);
  const int64_t len = p.len[p.rounds];
  if (p.rounds == 0) {
    auto* kernel = &final_select_kernel<F, XSource<F>>;
    FASTGPT_LAUNCH(kernel, grid, block, stream, from_x, len, k, ib, x, row_stride, col_stride, values, indices);
  } else {
    const CandidateSource from_cand{cand, len};
    auto* kernel = &final_select_kernel<F, CandidateSource>;
    FASTGPT_LAUNCH(kernel, grid, block, stream, from_cand, len, k, ib, x, row_stride, col_stride, values, indices);
  }
}

// sort_rows(int64_t* composites) sorts each of the `rows` rows of n composites in descending
// order and returns a pointer to the sorted (rows, n) row-major array.
template <Fmt F, class SortRows>
void launch_large(const typename FmtTraits<F>::bits_t* x, int64_t rows, int64_t n, int64_t row_stride,
                  int64_t col_stride, int64_t k, int64_t* composites, typename FmtTraits<F>::bits_t* values,
                  int64_t* indices, cudaStream_t stream, SortRows&& sort_rows) {
  const dim3 block(kElementwiseThreads);
  {
    auto* kernel = &composite_kernel<F>;
    const dim3 grid(elementwise_blocks(rows * n));
    FASTGPT_LAUNCH(kernel, grid, block, stream, x, rows, n, row_stride, col_stride, composites);
  }
  const int64_t* sorted = sort_rows(composites);
  {
    auto* kernel = &gather_kernel<F>;
    const dim3 grid(elementwise_blocks(rows * k));
    FASTGPT_LAUNCH(kernel, grid, block, stream, sorted, rows, n, k, x, row_stride, col_stride, values, indices);
  }
}

}  // namespace topk
}  // namespace fastgpt

#ifndef FASTGPT_TOPK_EMULATE
// ---------------------------------------------------------------------------------------------
// Torch glue: TORCH_LIBRARY_IMPL(fastgpt, CUDA). The schema is defined in ops.cpp.
// ---------------------------------------------------------------------------------------------
namespace fastgpt {
namespace topk {
namespace {

template <Fmt F>
void topk_cuda_typed(const at::Tensor& x, int64_t k, at::Tensor& values, at::Tensor& indices, cudaStream_t stream) {
  using bits_t = typename FmtTraits<F>::bits_t;
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  const bits_t* xp = reinterpret_cast<const bits_t*>(x.const_data_ptr());
  bits_t* vp = reinterpret_cast<bits_t*>(values.mutable_data_ptr());
  int64_t* ip = indices.mutable_data_ptr<int64_t>();
  const auto long_opts = x.options().dtype(at::kLong);
  if (use_small_path(k)) {
    const SmallPlan p = plan_small(n, k);
    TORCH_CHECK(p.rounds == 0 || rows * p.n_chunks[0] <= std::numeric_limits<int32_t>::max(),
                "fastgpt::topk: too many rows for one launch: ", rows, " rows of ", n, " elements");
    // Workspace from the caching allocator (stream-ordered: no sync, safe under graph capture).
    at::Tensor ws = at::empty({std::max<int64_t>(small_workspace_elems(rows, p), 1)}, long_opts);
    launch_small<F>(xp, rows, n, x.stride(0), x.stride(1), static_cast<int>(k),
                    reinterpret_cast<uint64_t*>(ws.mutable_data_ptr<int64_t>()), vp, ip, stream);
  } else {
    at::Tensor composites = at::empty({rows, n}, long_opts);
    at::Tensor sorted;
    launch_large<F>(xp, rows, n, x.stride(0), x.stride(1), k, composites.mutable_data_ptr<int64_t>(), vp, ip, stream,
                    [&](int64_t*) {
                      // Unique int64 keys: any correct sort gives the same order.
                      sorted = std::get<0>(at::sort(composites, /*dim=*/1, /*descending=*/true)).contiguous();
                      return sorted.const_data_ptr<int64_t>();
                    });
  }
}

std::tuple<at::Tensor, at::Tensor> topk_cuda(const at::Tensor& x, int64_t k) {
  check_topk_args(x, k, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [values, indices] = allocate_topk_outputs(x, k);
  TORCH_CHECK(x.size(0) <= std::numeric_limits<int32_t>::max(), "fastgpt::topk: at most 2^31 - 1 rows, got ",
              x.size(0));
  if (x.size(0) == 0) return std::make_tuple(values, indices);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  switch (x.scalar_type()) {
    case at::kFloat:
      topk_cuda_typed<Fmt::F32>(x, k, values, indices, stream);
      break;
    case at::kHalf:
      topk_cuda_typed<Fmt::F16>(x, k, values, indices, stream);
      break;
    case at::kBFloat16:
      topk_cuda_typed<Fmt::BF16>(x, k, values, indices, stream);
      break;
    default:
      TORCH_CHECK(false, "fastgpt::topk: unsupported dtype ", x.scalar_type());  // unreachable
  }
  return std::make_tuple(values, indices);
}

}  // namespace
}  // namespace topk
}  // namespace fastgpt

TORCH_LIBRARY_IMPL(fastgpt, CUDA, m) {
  m.impl("topk", &fastgpt::topk::topk_cuda);
}
#endif  // FASTGPT_TOPK_EMULATE
