// Order-preserving keys for fastgpt::topk, shared by the CPU op (ops.cpp), the CUDA kernels
// (topk.cu) and the CPU emulation of those kernels (tests/topk_emu). Pure C++: no torch here.
//
// The op's order is that of a stable descending sort (fastgpt.reference.topk):
//   * larger value first; NaN ranks above +inf (whatever its sign bit or payload);
//   * -0.0 and +0.0 are equal (as with float ==), so they are ordered by index like any tie;
//   * equal values (and NaNs among themselves) by ascending column index.
//
// order_key() maps the raw bits of an fp32 / fp16 / bf16 value to an unsigned key of the format's
// width (32 or 16 bits) whose unsigned order is that value order (NaN -> the largest key, -0 -> the
// key of +0). It works on the bits alone, never on float compares, so flush-to-zero or fast-math
// flags cannot make a denormal tie with zero. The smallest key, that of -inf, is nonzero.
//
// make_composite() packs (key, column) into one uint64 whose unsigned order is exactly the op's
// order, unique per element:  composite = key << ib | (2^ib - 1 - col)  with col < 2^ib.
// The inverted column makes a lower index win a tie in a *descending* order. A composite is never
// zero (no key is), so 0 marks an empty slot in the kernels. Composites of one row are below
// 2^(kWidth + ib): 16-bit formats need fewer radix passes.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTGPT_HD __host__ __device__ __forceinline__
#else
#define FASTGPT_HD inline
#endif

namespace fastgpt {
namespace topk {

// Input formats; the kernels read the raw storage bits, never do arithmetic on the values.
enum class Fmt : int { F32 = 0, F16 = 1, BF16 = 2 };

template <Fmt F>
struct FmtTraits;

template <>
struct FmtTraits<Fmt::F32> {
  using bits_t = uint32_t;
  static constexpr uint32_t kSign = 0x80000000u;
  static constexpr uint32_t kAbs = 0x7FFFFFFFu;
  static constexpr uint32_t kInf = 0x7F800000u;
  static constexpr int kWidth = 32;
};

template <>
struct FmtTraits<Fmt::F16> {
  using bits_t = uint16_t;
  static constexpr uint32_t kSign = 0x8000u;
  static constexpr uint32_t kAbs = 0x7FFFu;
  static constexpr uint32_t kInf = 0x7C00u;
  static constexpr int kWidth = 16;
};

template <>
struct FmtTraits<Fmt::BF16> {
  using bits_t = uint16_t;
  static constexpr uint32_t kSign = 0x8000u;
  static constexpr uint32_t kAbs = 0x7FFFu;
  static constexpr uint32_t kInf = 0x7F80u;
  static constexpr int kWidth = 16;
};

// Unsigned order of the result == the op's value order (see the top of the file).
template <Fmt F>
FASTGPT_HD uint32_t order_key(typename FmtTraits<F>::bits_t raw) {
  using T = FmtTraits<F>;
  const uint32_t bits = static_cast<uint32_t>(raw);
  const uint32_t magnitude = bits & T::kAbs;
  // Flip the sign bit of a positive value, every bit of a negative one (written as selects so
  // that the compiler can make it branch-free): then unsigned order is value order.
  uint32_t key = bits ^ ((bits & T::kSign) ? (T::kSign | T::kAbs) : T::kSign);
  key = magnitude == 0 ? T::kSign : key;                 // -0 and +0 share the key of +0
  key = magnitude > T::kInf ? (T::kSign | T::kAbs) : key;  // any NaN: all ones, above +inf
  return key;
}

// Bits of the column field of a composite for rows of length n: enough for n - 1, rounded up to a
// whole byte (the radix passes take 8 bits at a time), at least 8 and at most 32.
inline int index_bits(int64_t n) {
  int bits = 0;
  while (bits < 32 && (int64_t{1} << bits) < n) ++bits;
  bits = (bits + 7) / 8 * 8;
  return bits < 8 ? 8 : bits;
}

FASTGPT_HD uint64_t make_composite(uint32_t key, uint64_t col, int ib) {
  const uint64_t col_mask = (uint64_t{1} << ib) - 1;
  return (static_cast<uint64_t>(key) << ib) | (col_mask - col);
}

FASTGPT_HD int64_t composite_column(uint64_t composite, int ib) {
  const uint64_t col_mask = (uint64_t{1} << ib) - 1;
  return static_cast<int64_t>(col_mask - (composite & col_mask));
}

}  // namespace topk
}  // namespace fastgpt
