// Fused CPU kernels for the elementwise parts of a Llama-style decoder layer (float32).
//
// Each op reads its inputs once and writes its outputs once: the eager torch versions of the same
// maths run 5 to 10 separate passes over [tokens, hidden] tensors (one per pow, mean, rsqrt, mul,
// cat, neg, add, ...) plus as many again in autograd's backward, and on CPU those passes, not the
// arithmetic, are the cost. Vectorised with ATen's Vectorized<float> (AVX2/AVX-512 when this file is
// compiled for them; exp is ATen's Sleef exp). Built on first use by engine/kernels/cpu/extension.py.
// The Python side (rms_norm.py, silu_mul.py, rope.py) holds the autograd Functions, the argument
// checks and the float64 references the tests compare against.
//
// Rounding follows the torch expressions they replace (separate multiplies and adds, no FMA
// contraction: the build passes -ffp-contract=off), so results agree with eager torch to a few ulp.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

float reduce_add(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// ---- RMSNorm: y = w * (x * rsqrt(mean(x^2) + eps)), rows of x [n, h] --------------------------

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t n = x.size(0), h = x.size(1);
  auto y = at::empty_like(x);
  auto rstd = at::empty({n}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * h;
      float* yr = yp + r * h;
      Vec acc(0.f);
      int64_t i = 0;
      for (; i + kW <= h; i += kW) {
        Vec v = Vec::loadu(xr + i);
        acc = acc + v * v;
      }
      float squares = reduce_add(acc);
      for (; i < h; ++i) squares += xr[i] * xr[i];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(h) + static_cast<float>(eps));
      rp[r] = inv;
      const Vec vinv(inv);
      i = 0;
      for (; i + kW <= h; i += kW) (Vec::loadu(wp + i) * (Vec::loadu(xr + i) * vinv)).store(yr + i);
      for (; i < h; ++i) yr[i] = wp[i] * (xr[i] * inv);
    }
  });
  return {y, rstd};
}

// With xh = x * rstd: dw = sum_rows(g * xh); dx = rstd * (g*w - xh * mean(g*w*xh)).
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                     const at::Tensor& rstd) {
  const int64_t n = x.size(0), h = x.size(1);
  auto dx = at::empty_like(x);
  // Each task owns a contiguous range of rows and its own dw row; the rows are summed at the end.
  // The split depends only on n and the thread count: the same inputs give the same bits.
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + 15) / 16));
  auto partial = at::zeros({tasks, h}, x.options());
  const float* gp = g.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const int64_t rows_per_task = (n + tasks - 1) / tasks;
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      float* dw = pp + task * h;
      const int64_t row_end = std::min(n, (task + 1) * rows_per_task);
      for (int64_t r = task * rows_per_task; r < row_end; ++r) {
        const float* gr = gp + r * h;
        const float* xr = xp + r * h;
        float* out = dxp + r * h;
        const float inv = rp[r];
        const Vec vinv(inv);
        Vec acc(0.f);
        int64_t i = 0;
        for (; i + kW <= h; i += kW) {
          const Vec xh = Vec::loadu(xr + i) * vinv;
          const Vec gv = Vec::loadu(gr + i);
          (Vec::loadu(dw + i) + gv * xh).store(dw + i);
          acc = acc + gv * Vec::loadu(wp + i) * xh;
        }
        float dot = reduce_add(acc);
        for (; i < h; ++i) {
          const float xh = xr[i] * inv;
          dw[i] += gr[i] * xh;
          dot += gr[i] * wp[i] * xh;
        }
        const float mean_dot = dot / static_cast<float>(h);
        const Vec vmean(mean_dot);
        i = 0;
        for (; i + kW <= h; i += kW) {
          const Vec xh = Vec::loadu(xr + i) * vinv;
          ((Vec::loadu(gr + i) * Vec::loadu(wp + i) - xh * vmean) * vinv).store(out + i);
        }
        for (; i < h; ++i) out[i] = (gr[i] * wp[i] - (xr[i] * inv) * mean_dot) * inv;
      }
    }
  });
  return {dx, partial.sum(0)};
}

// ---- SwiGLU gate: y = silu(a) * b = a / (1 + exp(-a)) * b, elementwise ------------------------

at::Tensor silu_mul_forward(const at::Tensor& a, const at::Tensor& b) {
  auto y = at::empty_like(a);
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, a.numel(), 16384, [&](int64_t begin, int64_t end) {
    const Vec one(1.f);
    int64_t i = begin;
    for (; i + kW <= end; i += kW) {
      const Vec x = Vec::loadu(ap + i);
      (x / (one + x.neg().exp()) * Vec::loadu(bp + i)).store(yp + i);
    }
    for (; i < end; ++i) yp[i] = ap[i] / (1.f + std::exp(-ap[i])) * bp[i];
  });
  return y;
}

// With s = sigmoid(a): db = g * a * s; da = g * b * s * (1 + a * (1 - s)).
std::tuple<at::Tensor, at::Tensor> silu_mul_backward(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b) {
  auto da = at::empty_like(a);
  auto db = at::empty_like(b);
  const float* gp = g.const_data_ptr<float>();
  const float* ap = a.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* dap = da.data_ptr<float>();
  float* dbp = db.data_ptr<float>();
  at::parallel_for(0, a.numel(), 16384, [&](int64_t begin, int64_t end) {
    const Vec one(1.f);
    int64_t i = begin;
    for (; i + kW <= end; i += kW) {
      const Vec x = Vec::loadu(ap + i);
      const Vec gv = Vec::loadu(gp + i);
      const Vec s = one / (one + x.neg().exp());
      (gv * (x * s)).store(dbp + i);
      (gv * Vec::loadu(bp + i) * s * (one + x * (one - s))).store(dap + i);
    }
    for (; i < end; ++i) {
      const float x = ap[i];
      const float s = 1.f / (1.f + std::exp(-x));
      dbp[i] = gp[i] * (x * s);
      dap[i] = gp[i] * bp[i] * s * (1.f + x * (1.f - s));
    }
  });
  return {da, db};
}

// ---- Rotary embedding: out = x * cos + rotate_half(x) * sin -----------------------------------
// x [B, L, H, D] contiguous (the layout of the q/k projections before HF transposes them),
// cos/sin [B, L, D] contiguous, D even; rotate_half(x) = cat(-x[D/2:], x[:D/2]). backward applies
// the transpose of that linear map to a gradient: dx1 = g1*c1 + g2*s2, dx2 = g2*c2 - g1*s1.

at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
  const int64_t positions = x.size(0) * x.size(1), heads = x.size(2), d = x.size(3), half = d / 2;
  auto out = at::empty_like(x);
  const float* xp = x.const_data_ptr<float>();
  const float* cp = cos.const_data_ptr<float>();
  const float* sp = sin.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, positions, 16, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* c = cp + p * d;
      const float* s = sp + p * d;
      for (int64_t head = 0; head < heads; ++head) {
        const float* in = xp + (p * heads + head) * d;
        float* o = op + (p * heads + head) * d;
        int64_t i = 0;
        if (!backward) {
          for (; i + kW <= half; i += kW) {
            const Vec x1 = Vec::loadu(in + i), x2 = Vec::loadu(in + half + i);
            (x1 * Vec::loadu(c + i) + x2.neg() * Vec::loadu(s + i)).store(o + i);
            (x2 * Vec::loadu(c + half + i) + x1 * Vec::loadu(s + half + i)).store(o + half + i);
          }
          for (; i < half; ++i) {
            const float x1 = in[i], x2 = in[half + i];
            o[i] = x1 * c[i] + (-x2) * s[i];
            o[half + i] = x2 * c[half + i] + x1 * s[half + i];
          }
        } else {
          for (; i + kW <= half; i += kW) {
            const Vec g1 = Vec::loadu(in + i), g2 = Vec::loadu(in + half + i);
            (g1 * Vec::loadu(c + i) + g2 * Vec::loadu(s + half + i)).store(o + i);
            (g2 * Vec::loadu(c + half + i) + (g1 * Vec::loadu(s + i)).neg()).store(o + half + i);
          }
          for (; i < half; ++i) {
            const float g1 = in[i], g2 = in[half + i];
            o[i] = g1 * c[i] + g2 * s[half + i];
            o[half + i] = g2 * c[half + i] + (-(g1 * s[i]));
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(zhiling_cpu, m) {
  m.def("rms_norm_forward(Tensor x, Tensor w, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor g, Tensor x, Tensor w, Tensor rstd) -> (Tensor, Tensor)");
  m.def("silu_mul_forward(Tensor a, Tensor b) -> Tensor");
  m.def("silu_mul_backward(Tensor g, Tensor a, Tensor b) -> (Tensor, Tensor)");
  m.def("rope_apply(Tensor x, Tensor cos, Tensor sin, bool backward) -> Tensor");
}

TORCH_LIBRARY_IMPL(zhiling_cpu, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("silu_mul_forward", &silu_mul_forward);
  m.impl("silu_mul_backward", &silu_mul_backward);
  m.impl("rope_apply", &rope_apply);
}
