// Runs csrc/topk.cu's kernels and host launch sequence under the CPU emulation of cuda_emu.h.
//
//   driver FMT ROWS N ROW_STRIDE COL_STRIDE K SEED IN_PATH OUT_PATH
//     FMT: 0 float32, 1 float16, 2 bfloat16. IN_PATH: the raw storage of x (element (r, c) at
//     r * ROW_STRIDE + c * COL_STRIDE). OUT_PATH receives ROWS*K values (raw bits of FMT) then
//     ROWS*K int64 indices. Exit 0 on success, 2 on bad usage, 3 on an emulation check failure.
//
// Built by tests/test_topk.py:  g++ -std=c++17 -O1 -g -fsanitize=address,undefined -I csrc
//   tests/topk_emu/driver.cpp. It mirrors the torch glue of topk.cu (path choice, workspace
//   sizing), with std::sort standing in for at::sort on the large-k path.
#include "cuda_emu.h"

#define FASTGPT_TOPK_EMULATE 1
#include "../../csrc/topk.cu"

#include <fstream>
#include <iterator>
#include <string>

using namespace fastgpt::topk;

namespace {

template <Fmt F>
int run(int64_t rows, int64_t n, int64_t rs, int64_t cs, int64_t k, const std::vector<char>& in, std::ofstream& out) {
  using bits_t = typename FmtTraits<F>::bits_t;
  const int64_t extent = rows == 0 ? 0 : (rows - 1) * rs + (n - 1) * cs + 1;
  if (static_cast<int64_t>(in.size()) != extent * static_cast<int64_t>(sizeof(bits_t))) {
    std::fprintf(stderr, "driver: input has %zu bytes, expected %lld\n", in.size(),
                 static_cast<long long>(extent * sizeof(bits_t)));
    return 2;
  }
  // Exactly-sized heap copies so that ASan sees any access past the ends.
  std::vector<bits_t> x(static_cast<size_t>(extent));
  std::memcpy(x.data(), in.data(), in.size());
  std::vector<bits_t> values(static_cast<size_t>(rows * k), static_cast<bits_t>(~bits_t{0}));  // NaN bits
  std::vector<int64_t> indices(static_cast<size_t>(rows * k), -1);
  if (use_small_path(k)) {
    const SmallPlan p = plan_small(n, k);
    std::vector<uint64_t> ws(static_cast<size_t>(std::max<int64_t>(small_workspace_elems(rows, p), 1)));
    // Uninitialised, as at::empty; all-ones is the largest composite, so a slot that a kernel
    // forgets to write wins the next round and shows up in the result.
    std::memset(ws.data(), 0xFF, ws.size() * sizeof(uint64_t));
    launch_small<F>(x.data(), rows, n, rs, cs, static_cast<int>(k), ws.data(), values.data(), indices.data(), nullptr);
    std::fprintf(stderr, "driver: small path, %d chunk rounds\n", p.rounds);
  } else {
    std::vector<int64_t> composites(static_cast<size_t>(rows * n));
    std::memset(composites.data(), 0xFF, composites.size() * sizeof(int64_t));
    std::vector<int64_t> sorted;
    launch_large<F>(x.data(), rows, n, rs, cs, k, composites.data(), values.data(), indices.data(), nullptr,
                    [&](int64_t* c) {
                      sorted.assign(c, c + rows * n);
                      for (int64_t r = 0; r < rows; ++r) {
                        std::sort(sorted.begin() + r * n, sorted.begin() + (r + 1) * n, std::greater<int64_t>());
                      }
                      return static_cast<const int64_t*>(sorted.data());
                    });
    std::fprintf(stderr, "driver: large path\n");
  }
  out.write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(values.size() * sizeof(bits_t)));
  out.write(reinterpret_cast<const char*>(indices.data()),
            static_cast<std::streamsize>(indices.size() * sizeof(int64_t)));
  std::fprintf(stderr, "driver: %llu context switches\n", static_cast<unsigned long long>(emu::rt().switches));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 10) {
    std::fprintf(stderr, "usage: driver FMT ROWS N ROW_STRIDE COL_STRIDE K SEED IN_PATH OUT_PATH\n");
    return 2;
  }
  const int fmt = std::stoi(argv[1]);
  const int64_t rows = std::stoll(argv[2]), n = std::stoll(argv[3]);
  const int64_t rs = std::stoll(argv[4]), cs = std::stoll(argv[5]);
  const int64_t k = std::stoll(argv[6]);
  emu::seed(std::stoull(argv[7]));
  if (rows < 1 || n < 1 || k < 1 || k > n || rs < 0 || cs < 0) {
    std::fprintf(stderr, "driver: bad shape arguments\n");
    return 2;
  }
  std::ifstream in_file(argv[8], std::ios::binary);
  const std::vector<char> in((std::istreambuf_iterator<char>(in_file)), std::istreambuf_iterator<char>());
  std::ofstream out(argv[9], std::ios::binary);
  switch (fmt) {
    case 0:
      return run<Fmt::F32>(rows, n, rs, cs, k, in, out);
    case 1:
      return run<Fmt::F16>(rows, n, rs, cs, k, in, out);
    case 2:
      return run<Fmt::BF16>(rows, n, rs, cs, k, in, out);
    default:
      std::fprintf(stderr, "driver: FMT must be 0, 1 or 2\n");
      return 2;
  }
}
