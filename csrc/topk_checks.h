// Argument checks and output allocation of fastgpt::topk, shared by the CPU impl (ops.cpp) and the
// CUDA impl (topk.cu) so that both raise the same errors. The Python wrapper (kernels/topk.py)
// raises ValueError/TypeError for the same conditions before it ever calls the op; these
// TORCH_CHECKs guard direct calls of torch.ops.fastgpt.topk.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <tuple>

namespace fastgpt {
namespace topk {

// Rows longer than this do not fit the 32-bit column field of the CUDA kernels' composite keys.
constexpr int64_t kMaxRowLength = std::numeric_limits<int32_t>::max();

inline void check_topk_args(const at::Tensor& x, int64_t k, c10::DeviceType expected_device) {
  TORCH_CHECK(x.device().type() == expected_device, "fastgpt::topk: x must be a ",
              c10::DeviceTypeName(expected_device), " tensor for this kernel, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "fastgpt::topk: x must be 2-D (rows, row_length), got shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastgpt::topk: x must be float32, float16 or bfloat16, got ", dtype);
  const int64_t n = x.size(1);
  TORCH_CHECK(n <= kMaxRowLength, "fastgpt::topk: rows may hold at most ", kMaxRowLength,
              " elements, got ", n);
  TORCH_CHECK(k >= 1 && k <= n, "fastgpt::topk: k must be in [1, ", n, "] (1 to the row length), got k=", k);
}

// (values in x's dtype, int64 indices), both (rows, k) and contiguous, on x's device.
inline std::tuple<at::Tensor, at::Tensor> allocate_topk_outputs(const at::Tensor& x, int64_t k) {
  at::Tensor values = at::empty({x.size(0), k}, x.options());
  at::Tensor indices = at::empty({x.size(0), k}, x.options().dtype(at::kLong));
  return std::make_tuple(values, indices);
}

}  // namespace topk
}  // namespace fastgpt
