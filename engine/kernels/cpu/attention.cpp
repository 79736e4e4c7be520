// Causal attention within each sample of a padding-free row, float32 on CPU: forward and backward.
//
// A padding-free micro-batch lays its samples end to end (engine/segment_attention.py). torch's CPU
// flash attention, called once per sample, computes each sample's whole [n, n] square whenever n is
// at most its 512-wide key block, so a causal sample costs as much as a non-causal one, and every
// call allocates its own buffers. Here one call covers all samples: each sample's queries go in
// blocks of QUERY_BLOCK rows, and a block meets only the keys up to its last query, so about half
// the square plus a thin diagonal band is computed. Per block the scores [rows, keys] are written
// where the kept probabilities go (or into one scratch buffer, rows x the longest sample, when they
// are not kept) and every product is one BLAS call.
//
// Forward keeps the log-sum-exp of every query and, when they fit the caller's budget, the
// probabilities themselves (the causal part of each block: about n^2 / 2 floats per sample and
// head); otherwise backward recomputes them from the log-sum-exp (P = exp(S - lse)), as flash
// attention does. With D = rowsum(dO * O):
//   dV += P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = scale dS K,  dK += scale dS^T Q.
// The Python side (segment_causal.py) holds the autograd Function, the checks and the float64
// reference the tests compare against. Built by extension.py with the other CPU kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

constexpr int64_t kW = Vec::size();
constexpr int64_t QUERY_BLOCK = 64;

// The BLAS's Fortran sgemm where torch's library exports it (its MKL on x86 builds), found at load
// time; a weak reference, so a torch without it still loads this library and the products go
// through ATen's addmm on views of the same memory instead.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// Set by segment_causal_use_aten_products: the products go through ATen even where sgemm exists
// (the tests run both ways).
bool aten_products = false;

at::Tensor view_of(const float* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(data), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// Row-major c[m, n] = alpha op(a) op(b) + beta c, op(a) [m, k], op(b) [k, n]; leading dimensions
// are row strides. On the column-major BLAS a row-major matrix is its own transpose, so the call
// computes c^T = op(b)^T op(a)^T.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ != nullptr && !aten_products) {
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  at::Tensor A = trans_a ? view_of(a, k, m, lda).t() : view_of(a, m, k, lda);
  at::Tensor B = trans_b ? view_of(b, n, k, ldb).t() : view_of(b, k, n, ldb);
  at::Tensor C = view_of(c, m, n, ldc);
  at::addmm_out(C, C, A, B, beta, alpha);
}

// c[m, n] = alpha a[m, k] b[n, k]^T + beta c
void mm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
           float beta, float* c, int64_t ldc) {
  gemm(false, true, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// c[m, n] = alpha a[m, k] b[k, n] + beta c
void mm_nn(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
           float beta, float* c, int64_t ldc) {
  gemm(false, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// c[m, n] = alpha a[k, m]^T b[k, n] + beta c
void mm_tn(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
           float beta, float* c, int64_t ldc) {
  gemm(true, false, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

float row_max(const float* s, int64_t count) {
  int64_t j = 0;
  float best = -std::numeric_limits<float>::infinity();
  if (count >= kW) {
    Vec acc = Vec::loadu(s);
    for (j = kW; j + kW <= count; j += kW) acc = at::vec::maximum(acc, Vec::loadu(s + j));
    best = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, acc);
  }
  for (; j < count; ++j) best = std::max(best, s[j]);
  return best;
}

// s[j] := exp(s[j] - shift) for j < count; returns their sum.
float exp_shifted_(float* s, int64_t count, float shift) {
  const Vec vshift(shift);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kW <= count; j += kW) {
    Vec p = (Vec::loadu(s + j) - vshift).exp();
    p.store(s + j);
    acc = acc + p;
  }
  float total = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; j < count; ++j) {
    s[j] = std::exp(s[j] - shift);
    total += s[j];
  }
  return total;
}

void scale_(float* s, int64_t count, float factor) {
  const Vec vf(factor);
  int64_t j = 0;
  for (; j + kW <= count; j += kW) (Vec::loadu(s + j) * vf).store(s + j);
  for (; j < count; ++j) s[j] *= factor;
}

// dp[j] := p[j] * (dp[j] - d) for j < count
void softmax_grad_(float* dp, const float* p, int64_t count, float d) {
  const Vec vd(d);
  int64_t j = 0;
  for (; j + kW <= count; j += kW) (Vec::loadu(p + j) * (Vec::loadu(dp + j) - vd)).store(dp + j);
  for (; j < count; ++j) dp[j] = p[j] * (dp[j] - d);
}

float dot(const float* x, const float* y, int64_t count) {
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kW <= count; j += kW) acc = acc + Vec::loadu(x + j) * Vec::loadu(y + j);
  float total = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < count; ++j) total += x[j] * y[j];
  return total;
}

struct Layout {  // one [heads, tokens, dim] operand: element (h, t, d) at h * head + t * token + d
  const float* data;
  int64_t head, token;
  const float* at(int64_t h, int64_t t) const { return data + h * head + t * token; }
};

Layout layout_of(const at::Tensor& x) { return {x.const_data_ptr<float>(), x.stride(0), x.stride(1)}; }

std::vector<int64_t> checked_bounds(const at::Tensor& cu, int64_t tokens) {
  TORCH_CHECK(cu.dim() == 1 && cu.scalar_type() == at::kLong && cu.numel() >= 2,
              "segment_causal_attention: cu_seqlens must be a 1-D int64 tensor of at least 2 entries");
  auto c = cu.contiguous();
  std::vector<int64_t> bounds(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel());
  TORCH_CHECK(bounds.front() == 0 && bounds.back() == tokens, "segment_causal_attention: cu_seqlens must run from 0 to ",
              tokens, ", got ", bounds.front(), " to ", bounds.back());
  for (size_t i = 1; i < bounds.size(); ++i)
    TORCH_CHECK(bounds[i] >= bounds[i - 1], "segment_causal_attention: cu_seqlens must not decrease");
  return bounds;
}

void check_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && t->device().is_cpu() && t->stride(2) == 1,
                "segment_causal_attention: q, k, v must be float32 CPU [heads, tokens, dim] with dim contiguous");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(1) == k.size(1) && q.size(2) == k.size(2) && k.size(0) > 0 &&
                  q.size(0) % k.size(0) == 0,
              "segment_causal_attention: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not fit");
}

int64_t longest(const std::vector<int64_t>& bounds) {
  int64_t best = 0;
  for (size_t i = 1; i < bounds.size(); ++i) best = std::max(best, bounds[i] - bounds[i - 1]);
  return best;
}

// Layout of the kept probabilities: per sample and head, the sample's query blocks one after
// another, each [rows, keys] with keys = the block's end (the causal part only). starts[s] sums the
// per-head sizes of the samples before s: sample s, head h begins at heads * starts[s] + h *
// (starts[s + 1] - starts[s]), and the buffer holds heads * starts.back() floats.
std::vector<int64_t> probs_starts(const std::vector<int64_t>& bounds) {
  std::vector<int64_t> starts(bounds.size(), 0);
  for (size_t s = 1; s < bounds.size(); ++s) {
    const int64_t n = bounds[s] - bounds[s - 1];
    int64_t size = 0;
    for (int64_t a = 0; a < n; a += QUERY_BLOCK) {
      const int64_t rows = std::min(QUERY_BLOCK, n - a);
      size += rows * (a + rows);
    }
    starts[s] = starts[s - 1] + size;
  }
  return starts;
}

// q [H, T, D], k and v [Hkv, T, D]; returns out [T, H, D], lse [H, T] and, when they take at most
// max_probs_bytes, the probabilities (flat; probs_starts gives the layout), else an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_causal_forward(const at::Tensor& q, const at::Tensor& k,
                                                                      const at::Tensor& v, const at::Tensor& cu,
                                                                      double scale, int64_t max_probs_bytes) {
  check_operands(q, k, v);
  const int64_t heads = q.size(0), tokens = q.size(1), dim = q.size(2), kv_heads = k.size(0);
  const int64_t group = heads / kv_heads;
  const auto bounds = checked_bounds(cu, tokens);
  const int64_t segments = static_cast<int64_t>(bounds.size()) - 1, width = longest(bounds);
  auto out = at::empty({tokens, heads, dim}, q.options());
  auto lse = at::empty({heads, tokens}, q.options());
  const auto starts = probs_starts(bounds);
  const bool keep = 4 * heads * starts.back() <= max_probs_bytes;
  auto probs = at::empty({keep ? heads * starts.back() : 0}, q.options());
  const Layout Q = layout_of(q), K = layout_of(k), V = layout_of(v);
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  float* pp = probs.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
  at::parallel_for(0, segments * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(keep ? 0 : QUERY_BLOCK * std::max<int64_t>(width, 1));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seg = task / kv_heads, kvh = task % kv_heads;
      const int64_t start = bounds[seg], n = bounds[seg + 1] - start;
      const int64_t per_head = starts[seg + 1] - starts[seg];
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        float* kept = keep ? pp + heads * starts[seg] + h * per_head : nullptr;
        for (int64_t a = 0; a < n; a += QUERY_BLOCK) {
          const int64_t rows = std::min(QUERY_BLOCK, n - a), keys = a + rows;
          const int64_t ld = keep ? keys : std::max<int64_t>(width, 1);
          float* s = keep ? kept : scores.data();
          if (keep) kept += rows * keys;
          mm_nt(rows, keys, dim, alpha, Q.at(h, start + a), Q.token, K.at(kvh, start), K.token, 0.f, s, ld);
          for (int64_t i = 0; i < rows; ++i) {
            float* row = s + i * ld;
            const int64_t seen = a + i + 1;
            const float top = row_max(row, seen);
            const float total = exp_shifted_(row, seen, top);
            scale_(row, seen, 1.f / total);
            std::fill(row + seen, row + keys, 0.f);
            lp[h * tokens + start + a + i] = top + std::log(total);
          }
          mm_nn(rows, dim, keys, 1.f, s, ld, V.at(kvh, start), V.token, 0.f, op + ((start + a) * heads + h) * dim,
                heads * dim);
        }
      }
    }
  });
  return {out, lse, probs};
}

// grad_out and out [T, H, D] contiguous, lse [H, T]; returns dq [T, H, D], dk and dv [T, Hkv, D].
std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_causal_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor& out, const at::Tensor& lse,
                                                                       const at::Tensor& probs, const at::Tensor& cu,
                                                                       double scale) {
  check_operands(q, k, v);
  const int64_t heads = q.size(0), tokens = q.size(1), dim = q.size(2), kv_heads = k.size(0);
  const int64_t group = heads / kv_heads;
  TORCH_CHECK(grad_out.is_contiguous() && out.is_contiguous() && lse.is_contiguous() &&
                  grad_out.sizes() == out.sizes() && out.size(0) == tokens && out.size(1) == heads &&
                  out.size(2) == dim && lse.size(0) == heads && lse.size(1) == tokens,
              "segment_causal_attention backward: grad_out/out must be contiguous [T, H, D], lse [H, T]");
  const auto bounds = checked_bounds(cu, tokens);
  const int64_t segments = static_cast<int64_t>(bounds.size()) - 1, width = longest(bounds);
  const auto starts = probs_starts(bounds);
  const bool kept = probs.numel() > 0;
  TORCH_CHECK(!kept || (probs.is_contiguous() && probs.numel() == heads * starts.back()),
              "segment_causal_attention backward: the kept probabilities do not fit these samples");
  const float* kp = kept ? probs.const_data_ptr<float>() : nullptr;
  auto dq = at::empty({tokens, heads, dim}, q.options());
  auto dk = at::zeros({tokens, kv_heads, dim}, q.options());
  auto dv = at::zeros({tokens, kv_heads, dim}, q.options());
  const Layout Q = layout_of(q), K = layout_of(k), V = layout_of(v);
  const float* gp = grad_out.const_data_ptr<float>();
  const float* op = out.const_data_ptr<float>();
  const float* lp = lse.const_data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const float alpha = static_cast<float>(scale);
  const int64_t row = heads * dim, kv_row = kv_heads * dim;
  at::parallel_for(0, segments * kv_heads, 1, [&](int64_t begin, int64_t end) {
    const int64_t wide = std::max<int64_t>(width, 1);
    std::vector<float> recomputed(kept ? 0 : QUERY_BLOCK * wide), grads(QUERY_BLOCK * wide), row_dots(QUERY_BLOCK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seg = task / kv_heads, kvh = task % kv_heads;
      const int64_t start = bounds[seg], n = bounds[seg + 1] - start;
      const int64_t per_head = starts[seg + 1] - starts[seg];
      float* dk_seg = dkp + start * kv_row + kvh * dim;
      float* dv_seg = dvp + start * kv_row + kvh * dim;
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
        const float* kept_block = kept ? kp + heads * starts[seg] + h * per_head : nullptr;
        for (int64_t a = 0; a < n; a += QUERY_BLOCK) {
          const int64_t rows = std::min(QUERY_BLOCK, n - a), keys = a + rows;
          const int64_t ld = kept ? keys : wide;
          const float* g_blk = gp + (start + a) * row + h * dim;
          const float* q_blk = Q.at(h, start + a);
          float* dp = grads.data();
          const float* p = kept_block;
          if (kept) {
            kept_block += rows * keys;
          } else {  // recompute P = exp(S - lse) from the forward's log-sum-exp
            float* fresh = recomputed.data();
            mm_nt(rows, keys, dim, alpha, q_blk, Q.token, K.at(kvh, start), K.token, 0.f, fresh, ld);
            for (int64_t i = 0; i < rows; ++i) {
              float* pr = fresh + i * ld;
              const int64_t seen = a + i + 1;
              exp_shifted_(pr, seen, lp[h * tokens + start + a + i]);
              std::fill(pr + seen, pr + keys, 0.f);
            }
            p = fresh;
          }
          for (int64_t i = 0; i < rows; ++i) row_dots[i] = dot(g_blk + i * row, op + (start + a + i) * row + h * dim, dim);
          mm_tn(keys, dim, rows, 1.f, p, ld, g_blk, row, 1.f, dv_seg, kv_row);
          mm_nt(rows, keys, dim, 1.f, g_blk, row, V.at(kvh, start), V.token, 0.f, dp, ld);
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t seen = a + i + 1;
            softmax_grad_(dp + i * ld, p + i * ld, seen, row_dots[i]);
            std::fill(dp + i * ld + seen, dp + i * ld + keys, 0.f);
          }
          mm_nn(rows, dim, keys, alpha, dp, ld, K.at(kvh, start), K.token, 0.f, dqp + (start + a) * row + h * dim, row);
          mm_tn(keys, dim, rows, alpha, dp, ld, q_blk, Q.token, 1.f, dk_seg, kv_row);
        }
      }
    }
  });
  return {dq, dk, dv};
}

// Sends this process's products through ATen (on) or back to the BLAS where there is one (off);
// returns the way they go now: "blas" or "aten".
std::string segment_causal_use_aten_products(bool on) {
  aten_products = on;
  return sgemm_ != nullptr && !aten_products ? "blas" : "aten";
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zhiling_cpu, m) {
  m.def(
      "segment_causal_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, int max_probs_bytes) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("segment_causal_use_aten_products(bool on) -> str", &segment_causal_use_aten_products);  // no tensors: catch-all
  m.def(
      "segment_causal_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor probs, Tensor cu_seqlens, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(zhiling_cpu, CPU, m) {
  m.impl("segment_causal_forward", &segment_causal_forward);
  m.impl("segment_causal_backward", &segment_causal_backward);
}
