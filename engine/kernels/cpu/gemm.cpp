// float32 matrix products through oneDNN (the library torch ships, reached via ATen's mkldnn_matmul),
// with the shapes it sees kept to a small fixed set.
//
// oneDNN's fp32 matmul measured faster than the default BLAS (MKL) on most products of a decoder
// layer and of the fused loss (benchmarks/cpu_gemm_bench.py, figures in RESULTS.md). It is exact fp32 (no reduced-precision
// math mode), only the order of the additions differs. oneDNN builds one primitive per shape, which
// costs a few milliseconds the first time; training shapes have one dimension that changes with every
// micro-batch (the token count), so that dimension is cut into blocks of BLOCK, one block of a
// multiple of QUANTUM, and a tail of under QUANTUM that the default BLAS computes. A run thus sees at
// most BLOCK / QUANTUM shapes per product, each built once.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <utility>
#include <vector>

namespace at {
namespace native {
// Exported by libtorch_cpu (declared in ATen/native/mkldnn/Matmul.h, which the wheel does not ship).
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace native
}  // namespace at

namespace {

constexpr int64_t BLOCK = 512;
constexpr int64_t QUANTUM = 64;

// c := beta * c + a @ b for float32 CPU matrices of any strides. `varying` names the dimension whose
// size changes from call to call: 0 the rows of a and c, 1 the columns of b and c, 2 the inner one.
void gemm_(at::Tensor c, const at::Tensor& a, const at::Tensor& b, double beta, int64_t varying) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2, "gemm_: 2-D tensors expected");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat,
              "gemm_: float32 tensors expected");
  TORCH_CHECK(a.size(1) == b.size(0) && c.size(0) == a.size(0) && c.size(1) == b.size(1), "gemm_: shapes ",
              a.sizes(), " @ ", b.sizes(), " -> ", c.sizes(), " do not match");
  TORCH_CHECK(varying >= 0 && varying <= 2, "gemm_: varying must be 0, 1 or 2");
  const int64_t size = varying == 0 ? a.size(0) : varying == 1 ? b.size(1) : a.size(1);
  if (size == 0 || c.numel() == 0) {
    if (varying == 2 && c.numel() > 0) {
      if (beta == 0.0) c.zero_(); else c.mul_(beta);  // beta 0 overwrites, as in BLAS
    }
    return;
  }
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (start, length) for oneDNN
  int64_t start = 0;
  for (; size - start >= BLOCK; start += BLOCK) blocks.emplace_back(start, BLOCK);
  const int64_t quantised = (size - start) / QUANTUM * QUANTUM;
  if (quantised > 0) {
    blocks.emplace_back(start, quantised);
    start += quantised;
  }
  bool first = true;
  auto product = [&](int64_t from, int64_t length, bool onednn) {
    at::Tensor pa = a, pb = b, pc = c;
    float scale = static_cast<float>(beta);
    if (varying == 0) {
      pa = a.narrow(0, from, length);
      pc = c.narrow(0, from, length);
    } else if (varying == 1) {
      pb = b.narrow(1, from, length);
      pc = c.narrow(1, from, length);
    } else {
      pa = a.narrow(1, from, length);
      pb = b.narrow(0, from, length);
      if (!first) scale = 1.0f;  // the inner blocks add up into c
    }
    first = false;
    if (onednn) {
      at::native::mkldnn_matmul(pa, pb, pc, scale, 1.0f);
    } else if (scale == 0.0f) {
      at::mm_out(pc, pa, pb);
    } else {
      pc.addmm_(pa, pb, scale, 1.0);
    }
  };
  for (const auto& blk : blocks) product(blk.first, blk.second, true);
  if (start < size) product(start, size - start, false);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zhiling_cpu, m) {
  m.def("gemm_(Tensor(a!) c, Tensor a, Tensor b, float beta, int varying) -> ()");
}

TORCH_LIBRARY_IMPL(zhiling_cpu, CPU, m) {
  m.impl("gemm_", &gemm_);
}
