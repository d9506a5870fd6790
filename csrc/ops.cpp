// fastgpt's custom operators: the schema of fastgpt::topk and its CPU implementation.
//
// fastgpt::topk(Tensor x, int k) -> (Tensor values, Tensor indices)
//   x: (rows, n) float32 / float16 / bfloat16, any strides; 1 <= k <= n.
//   values: (rows, k) in x's dtype, sorted descending; indices: (rows, k) int64 columns of x.
//   Order: a stable descending sort (fastgpt.reference.topk): ties by lower index, NaN above +inf,
//   -0.0 == +0.0. The CUDA implementation lives in topk.cu; the fake (meta) one in kernels/topk.py.
//
// CPU algorithm, per row: the unique uint64 composite (order key, inverted column) of every element
// (topk_keys.h); the k largest by a min-heap pass (k <= n/16) or nth_element (larger k); sort those
// k descending; decode. Rows run in parallel with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "topk_checks.h"
#include "topk_keys.h"

namespace fastgpt {
namespace topk {
namespace {

template <Fmt F>
void topk_rows_cpu(const at::Tensor& x, int64_t k, at::Tensor& values, at::Tensor& indices) {
  using bits_t = typename FmtTraits<F>::bits_t;
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  const int64_t rs = x.stride(0);
  const int64_t cs = x.stride(1);
  // Raw storage bits: the order comes from the bits (order_key), values are copied bit-exactly.
  const bits_t* xp = reinterpret_cast<const bits_t*>(x.const_data_ptr());
  bits_t* vp = reinterpret_cast<bits_t*>(values.mutable_data_ptr());
  int64_t* ip = indices.mutable_data_ptr<int64_t>();
  constexpr int kIb = 32;  // column field width: n <= 2^31 - 1 always fits

  // Small k: one pass keeping the k best composites in a min-heap; almost every element costs one
  // compare with the heap's minimum. Large k: nth_element over all composites.
  const bool use_heap = k * 16 <= n;
  // Grain 1: a row is already thousands of elements of work.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> buf(static_cast<size_t>(use_heap ? k : n));
    const auto greater = std::greater<uint64_t>();
    for (int64_t r = begin; r < end; ++r) {
      const bits_t* row = xp + r * rs;
      auto composite = [&](int64_t c) {
        return make_composite(order_key<F>(row[c * cs]), static_cast<uint64_t>(c), kIb);
      };
      if (use_heap) {
        // buf[0, k) is a min-heap (std::greater) of the k largest composites seen so far. An
        // element whose order key is below the heap minimum's key cannot enter: one compare.
        for (int64_t c = 0; c < k; ++c) buf[c] = composite(c);
        std::make_heap(buf.begin(), buf.end(), greater);
        uint32_t min_key = static_cast<uint32_t>(buf.front() >> kIb);
        for (int64_t c = k; c < n; ++c) {
          const uint32_t key = order_key<F>(row[c * cs]);
          if (key < min_key) continue;
          const uint64_t v = make_composite(key, static_cast<uint64_t>(c), kIb);
          if (v > buf.front()) {
            std::pop_heap(buf.begin(), buf.end(), greater);
            buf.back() = v;
            std::push_heap(buf.begin(), buf.end(), greater);
            min_key = static_cast<uint32_t>(buf.front() >> kIb);
          }
        }
      } else {
        for (int64_t c = 0; c < n; ++c) buf[c] = composite(c);
        // Composites are unique, so "the k largest" is a set and any selection algorithm agrees.
        std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), greater);
      }
      std::sort(buf.begin(), buf.begin() + k, greater);
      bits_t* vrow = vp + r * k;
      int64_t* irow = ip + r * k;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t col = composite_column(buf[j], kIb);
        irow[j] = col;
        vrow[j] = row[col * cs];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& x, int64_t k) {
  check_topk_args(x, k, c10::DeviceType::CPU);
  auto [values, indices] = allocate_topk_outputs(x, k);
  if (x.size(0) == 0) return std::make_tuple(values, indices);
  switch (x.scalar_type()) {
    case at::kFloat:
      topk_rows_cpu<Fmt::F32>(x, k, values, indices);
      break;
    case at::kHalf:
      topk_rows_cpu<Fmt::F16>(x, k, values, indices);
      break;
    case at::kBFloat16:
      topk_rows_cpu<Fmt::BF16>(x, k, values, indices);
      break;
    default:
      TORCH_CHECK(false, "fastgpt::topk: unsupported dtype ", x.scalar_type());  // unreachable
  }
  return std::make_tuple(values, indices);
}

}  // namespace
}  // namespace topk
}  // namespace fastgpt

TORCH_LIBRARY(fastgpt, m) {
  m.def("topk(Tensor x, int k) -> (Tensor values, Tensor indices)");
}

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("topk", &fastgpt::topk::topk_cpu);
}
