// RMSNorm (+ residual add), SiLU-and-mul and rotary embedding, each one pass over memory.
//
// In torch each is a chain of elementwise ops, every one a pass over the activations with its
// own allocation and (on bf16) its own float round trip: at prefill they were ~20% of a step.
// Each kernel keeps the roundings torch's chain makes on bf16 tensors, so outputs equal the
// torch ops' except for the float summation order of RMSNorm's mean.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "vec.h"

using fovea::load;
using fovea::round_to;
using fovea::store;
using fovea::vf;

namespace {

// Rows per parallel task: small batches (a decode step's few rows) stay on one thread.
int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 32768 / row_elems); }

void check_act(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
  TORCH_CHECK(x.size(-1) % 8 == 0, name, "'s last dimension must be a multiple of 8");
}

// x, residual [T, H] contiguous, weight [H] -> (out, sum): sum = x + residual (x itself when
// there is no residual), out = weight * (sum * rsqrt(mean(sum^2) + eps)), statistics in float.
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x,
                                            const std::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps) {
  check_act(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [T, hidden]");
  const int64_t rows = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [hidden] of x's dtype");
  if (residual)
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type(),
                "residual must be a contiguous tensor like x");
  at::Tensor out = at::empty_like(x);
  at::Tensor sum = residual ? at::empty_like(x) : x;
  fovea::dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* rp = residual ? residual->data_ptr<T>() : nullptr;
    const T* wp = weight.data_ptr<T>();
    T* sp = sum.data_ptr<T>();
    T* op = out.data_ptr<T>();
    auto row = [&](auto width, int64_t r) {
      constexpr int W = decltype(width)::value;
      const int64_t base = r * hidden;
      vf<W> sq = {};
      for (int64_t d = 0; d < hidden; d += W) {
        vf<W> v = load<W>(xp + base + d);
        if (rp) {
          v = round_to<W>(v + load<W>(rp + base + d), T{});
          store<W>(sp + base + d, v);
        }
        sq += v * v;
      }
      const float inv = 1.f / std::sqrt(fovea::hsum(sq) / hidden + static_cast<float>(eps));
      for (int64_t d = 0; d < hidden; d += W) {
        const vf<W> normed = round_to<W>(load<W>(sp + base + d) * inv, T{});
        store<W>(op + base + d, load<W>(wp + d) * normed);
      }
    };
    at::parallel_for(0, rows, grain(hidden), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) fovea::by_width(hidden, [&](auto w) { row(w, r); });
    });
  });
  return {out, sum};
}

// gate_up [T, 2I] contiguous (gate columns first) -> silu(gate) * up [T, I]. Any I: the last
// I % W columns take a scalar loop (Qwen2.5-VL's vision MLP has I = 3420).
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "gate_up must be float32 or bfloat16");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be a contiguous [T, 2 * I]");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  fovea::dispatch_float_bf16(gate_up.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* gp = gate_up.data_ptr<T>();
    T* op = out.data_ptr<T>();
    auto row = [&](auto width, int64_t r, float* a) {
      constexpr int W = decltype(width)::value;
      const int64_t body = inter - inter % W;
      const T* g = gp + r * 2 * inter;
      const T* u = g + inter;
      T* o = op + r * inter;
      for (int64_t d = 0; d < body; d += W) store<W>(a + d, load<W>(g + d));
      for (int64_t d = body; d < inter; ++d) a[d] = static_cast<float>(g[d]);
      // A plain loop over floats: gcc vectorises its exp through glibc's libmvec.
      for (int64_t d = 0; d < inter; ++d) a[d] = a[d] / (1.f + std::exp(-a[d]));
      for (int64_t d = 0; d < body; d += W)
        store<W>(o + d, round_to<W>(load<W>(a + d), T{}) * load<W>(u + d));
      for (int64_t d = body; d < inter; ++d)  // T(float) rounds as store<W> does
        o[d] = static_cast<T>(static_cast<float>(static_cast<T>(a[d])) * static_cast<float>(u[d]));
    };
    at::parallel_for(0, rows, grain(inter), [&](int64_t lo, int64_t hi) {
      std::vector<float> act(inter);
      for (int64_t r = lo; r < hi; ++r)
        fovea::by_width(inter, [&](auto w) { row(w, r, act.data()); });
    });
  });
  return out;
}

// x [T, heads, D] (rows of D contiguous, heads adjacent), cos/sin [T, D] contiguous, in place:
// x = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x[D/2:], x[:D/2]).
void rotate(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t row_stride = x.stride(0);
  fovea::dispatch_float_bf16(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.data_ptr<T>();
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    at::parallel_for(0, tokens * heads, grain(dim), [&](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t t = task / heads, h = task % heads;
        T* row = xp + t * row_stride + h * dim;
        const T* c = cp + t * dim;
        const T* s = sp + t * dim;
        fovea::by_width(half, [&](auto width) {
          constexpr int W = decltype(width)::value;
          for (int64_t d = 0; d < half; d += W) {
            const vf<W> x1 = load<W>(row + d), x2 = load<W>(row + half + d);
            const vf<W> a = round_to<W>(x1 * load<W>(c + d), T{}) -
                            round_to<W>(x2 * load<W>(s + d), T{});
            const vf<W> b = round_to<W>(x2 * load<W>(c + half + d), T{}) +
                            round_to<W>(x1 * load<W>(s + half + d), T{});
            store<W>(row + d, a);
            store<W>(row + half + d, b);
          }
        });
      }
    });
  });
}

void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin) {
  for (const at::Tensor* x : {&q, &k}) {
    check_act(*x, "q and k");
    TORCH_CHECK(x->dim() == 3 && x->stride(2) == 1 && x->stride(1) == x->size(2) &&
                    x->scalar_type() == q.scalar_type() && x->size(0) == q.size(0),
                "q and k must be [T, heads, D] with contiguous heads, of one dtype");
  }
  const int64_t dim = q.size(2);
  TORCH_CHECK(k.size(2) == dim && dim % 16 == 0, "head_dim must be equal and a multiple of 16");
  for (const at::Tensor* c : {&cos, &sin})
    TORCH_CHECK(c->is_contiguous() && c->numel() == q.size(0) * dim &&
                    c->scalar_type() == q.scalar_type(),
                "cos and sin must be contiguous [T, (1,) head_dim] of q's dtype");
  rotate(q, cos, sin);
  rotate(k, cos, sin);
}

// NaN tests on the bits: -ffast-math lets gcc assume no float is NaN (x != x is false).
inline bool is_nan(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x7fffffffu) > 0x7f800000u;
}

// The index of the largest of x[0, n): the first on ties, the first NaN if there is one
// (torch.argmax's rules). One pass: each lane keeps its own largest value and where it first
// saw it (a strict > never moves a lane to a later equal value); the lanes with the row's
// largest value then give their smallest index.
template <int W>
int64_t argmax_row(const float* x, int64_t n) {
  using vi = decltype(vf<W>{} > vf<W>{});  // int32 lanes, -1 where a comparison holds
  using vu = typename fovea::Lanes<W>::u;
  const vu abs_mask = vu{} + 0x7fffffffu, inf_bits = vu{} + 0x7f800000u;
  const int64_t body = n - n % W;
  float best = x[0];
  int64_t at = 0;
  bool nan = false;
  if (body > 0) {
    vf<W> m = load<W>(x);
    vi idx;
    for (int l = 0; l < W; ++l) idx[l] = l;
    vi cur = idx, bad = ((vu)m & abs_mask) > inf_bits;
    for (int64_t i = W; i < body; i += W) {
      const vf<W> v = load<W>(x + i);
      cur += W;
      const vi up = v > m;
      m = up ? v : m;
      idx = up ? cur : idx;
      bad |= ((vu)v & abs_mask) > inf_bits;
    }
    for (int l = 0; l < W; ++l) {
      nan = nan || bad[l];
      if (m[l] > best || (m[l] == best && idx[l] < at)) best = m[l], at = idx[l];
    }
  }
  for (int64_t i = body; i < n; ++i) {
    nan = nan || is_nan(x[i]);
    if (x[i] > best) best = x[i], at = i;
  }
  if (nan)
    for (int64_t i = 0; i < n; ++i)
      if (is_nan(x[i])) return i;
  return at;
}

// logits [N, V] float32, rows contiguous -> [N] int64: argmax of each row.
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "logits must be a float32 [N, V] with contiguous rows");
  const int64_t rows = logits.size(0), cols = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(cols > 0, "argmax of an empty row");
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* xp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) op[r] = argmax_row<fovea::kWide>(xp + r * stride, cols);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fovea, m) {
  m.def("rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("argmax_rows(Tensor logits) -> Tensor");
}

TORCH_LIBRARY_IMPL(fovea, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rotary_", &rotary_);
  m.impl("argmax_rows", &argmax_rows);
}
