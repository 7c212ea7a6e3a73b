// Causal self-attention of one prefill chunk on CPU: a fresh prompt (keys from the step's rows)
// or a chunk after a cached prefix (keys from the pool by slot).
//
// torch's flash SDPA ran these at ~56 GFLOP/s (26% of a 200-token prefill): its blocks suit
// long sequences. Here the keys of each KV head are laid out transposed once ([head_dim][n],
// float), so W scores (W = 16 floats on AVX-512, else 8) come from one FMA chain with no
// horizontal sums: a block of four query rows against 4W keys keeps sixteen accumulators in
// registers per step of head_dim (eight, at 2W keys, left the FMA pipes waiting: 15% slower
// at 1,050 tokens). With bf16 q, k and v on an AVX512-BF16 CPU both matmuls run on vdpbf16ps
// instead (causal_prefill_bf16: 9 heads of 64, 200 tokens 312 -> 201 us). The softmax is exact
// (two passes over a row's scores); the value sums take the block's four rows at once, so each
// value vector loaded feeds four rows.
// q is read in place (float32 or bf16 rows of the step's qkv); the output has q's dtype.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "causal_prefill.h"
#include "vec.h"

using fovea::vf;

namespace fovea::prefill {
namespace {

// Both matmuls of a block: acc[r][c] = sum_{x<k} a[r][x] * b[x * b_stride + c*W, + W) for the
// block's kRows rows. Each b vector loaded feeds all rows; the 4C accumulators stay in
// registers (16 with C = 4: enough independent FMA chains to cover the FMA latency on both
// pipes) when it is inlined, which a call by reference alone did not get (35% slower at 1,050
// tokens). Scores: a = q rows, b = transposed keys; value sums: a = weights, b = value rows.
template <int W, int C>
__attribute__((always_inline)) inline void block_matmul(const float* const* a, const float* b,
                                                        int64_t b_stride, int64_t k,
                                                        vf<W> (&out)[kRows][C]) {
  vf<W> acc[kRows][C] = {};  // local, copied out once: why in causal_prefill_bf16.cpp
  for (int64_t x = 0; x < k; ++x) {
    const float* bx = b + x * b_stride;
    vf<W> bv[C];
    for (int c = 0; c < C; ++c) bv[c] = fovea::load<W>(bx + c * W);
    for (int64_t r = 0; r < kRows; ++r) {
      const float ar = a[r][x];
      for (int c = 0; c < C; ++c) acc[r][c] += ar * bv[c];
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) out[r][c] = acc[r][c];
}

// scores[r][j, j + C*W) = scale * q_r . k_j for the block's rows r < rows; kt [head_dim][stride]
// holds the keys transposed (columns past n are zero).
template <int W, int C>
void score_cols(const float* const* q, int64_t rows, const float* kt, int64_t stride,
                int64_t j, int64_t head_dim, float scale, float* const* scores) {
  vf<W> acc[kRows][C];
  block_matmul<W, C>(q, kt + j, stride, head_dim, acc);
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < C; ++c) fovea::store<W>(scores[r] + j + c * W, acc[r][c] * scale);
}

// Keys [0, keys) (a multiple of 2W) for the block's rows, 4W keys at a time, then 2W.
template <int W>
void score_block(const float* const* q, int64_t rows, const float* kt, int64_t stride,
                 int64_t keys, int64_t head_dim, float scale, float* const* scores) {
  int64_t j = 0;
  for (; j + 4 * W <= keys; j += 4 * W)
    score_cols<W, 4>(q, rows, kt, stride, j, head_dim, scale, scores);
  for (; j < keys; j += 2 * W) score_cols<W, 2>(q, rows, kt, stride, j, head_dim, scale, scores);
}

// out[r][col, col + C*W) = sum_{t<n} p[r][t] * v[t][col, col + C*W) for the block's rows.
template <int W, int C>
void weighted_block(const float* const* p, const float* v, int64_t n, int64_t head_dim,
                    int64_t col, float* const* out) {
  vf<W> acc[kRows][C];
  block_matmul<W, C>(p, v + col, head_dim, n, acc);
  for (int64_t r = 0; r < kRows; ++r)
    for (int c = 0; c < C; ++c) fovea::store<W>(out[r] + col + c * W, acc[r][c]);
}

template <int W>
void weighted_cols(const float* const* p, const float* v, int64_t n, int64_t head_dim,
                   float* const* out) {
  int64_t col = 0;
  for (; col + 4 * W <= head_dim; col += 4 * W) weighted_block<W, 4>(p, v, n, head_dim, col, out);
  for (; col < head_dim; col += W) weighted_block<W, 1>(p, v, n, head_dim, col, out);
}

// Checks shared by both ops: q [q_len, heads, head_dim] (contiguous heads, any row stride),
// k and v alike [rows, kv_heads, head_dim] with contiguous heads, float32 or bfloat16.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2) &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "q must be a float32 or bfloat16 [n, heads, head_dim] with contiguous heads");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes() &&
                  k.scalar_type() == v.scalar_type(),
              "k and v must be [n, kv_heads, head_dim] alike");
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16,
              "k and v must be float32 or bfloat16");
  const int64_t heads = q.size(1), head_dim = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(k.size(2) == head_dim && heads % kv_heads == 0, "shapes of q, k and v disagree");
  TORCH_CHECK(head_dim % 8 == 0, "head_dim must be a multiple of 8, got ", head_dim);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == head_dim,
                "k and v rows must hold their heads contiguously");
}

// Query i (position keys_at.start + i) attends to keys [0, start + i]. Returns
// [q_len, heads * head_dim] in q's dtype.
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const KeyRows& keys_at, double scale) {
  const int64_t n = keys_at.n, q_len = q.size(0), start = keys_at.start;
  const int64_t heads = q.size(1), head_dim = q.size(2), kv_heads = k.size(1);
#if defined(__AVX512BF16__)
  if (q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && head_dim % 16 == 0)
    return causal_prefill_bf16(q, k, v, keys_at, scale);
#endif
  const int64_t group = heads / kv_heads;
  const int64_t stride = (n + kPad - 1) / kPad * kPad;  // keys padded to whole steps
  const bool wide = head_dim % fovea::kWide == 0;
  // Per KV head: keys transposed [head_dim][stride] (zero past n) and values [n][head_dim], in
  // float; written once each (no zero fill first).
  std::unique_ptr<float[]> kt(new float[kv_heads * head_dim * stride]);
  std::unique_ptr<float[]> vals(new float[kv_heads * n * head_dim]);
  fovea::dispatch_float_bf16(k.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    for_key_chunks(kv_heads, n, [&](int64_t h, int64_t t0, int64_t t1) {
      float* kh = kt.get() + h * head_dim * stride;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = keys_at.row(t);
        const T* krow = kp + r * keys_at.k_stride + h * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) kh[d * stride + t] = static_cast<float>(krow[d]);
        const T* vrow = vp + r * keys_at.v_stride + h * head_dim;
        fovea::convert(vals.get() + (h * n + t) * head_dim, vrow, head_dim);
      }
      if (t1 == n)  // this head's last keys: zero its padding
        for (int64_t d = 0; d < head_dim; ++d)
          std::fill(kh + d * stride + n, kh + (d + 1) * stride, 0.f);
    });
  });
  auto out = at::empty({q_len, heads * head_dim}, q.options());
  const int64_t blocks = (q_len + kRows - 1) / kRows;
  fovea::dispatch_float_bf16(q.scalar_type(), [&](auto act_tag) {
    using A = decltype(act_tag);
    const A* qp = q.data_ptr<A>();
    A* op = out.data_ptr<A>();
    at::parallel_for(0, heads * blocks, 1, [&](int64_t lo, int64_t hi) {
      // The block's query and output rows in float: [kRows][head_dim] each.
      std::vector<float> scores(kRows * stride), qf(kRows * head_dim), of(kRows * head_dim);
      for (int64_t task = lo; task < hi; ++task) {
        const auto [head, h, i0, rows, seen] = block_task(task, heads, group, blocks, q_len, start);
        const float* qrows[kRows];
        float* srows[kRows];
        float* orows[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          const A* src = qp + (i0 + std::min(r, rows - 1)) * q.stride(0) + head * head_dim;
          float* dst = qf.data() + r * head_dim;
          fovea::convert(dst, src, head_dim);
          qrows[r] = dst;
          srows[r] = scores.data() + r * stride;
          orows[r] = of.data() + r * head_dim;
        }
        const float* kh = kt.get() + h * head_dim * stride;
        const float sc = static_cast<float>(scale);
        const int64_t step = 2 * (wide ? fovea::kWide : 8);
        const int64_t keys = (seen + step - 1) / step * step;
        if (wide)
          score_block<fovea::kWide>(qrows, rows, kh, stride, keys, head_dim, sc, srows);
        else
          score_block<8>(qrows, rows, kh, stride, keys, head_dim, sc, srows);
        // Each row's weights exp(s - max) over its keys; zero the rest of the block's keys
        // (and whole rows past n), so the value sums can run over the block's keys for all
        // rows at once. The division by the weights' sum waits for the row's output.
        float inv_sum[kRows];
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t len = r < rows ? start + i0 + r + 1 : 0;  // keys [0, start + i0 + r]
          inv_sum[r] = len ? 1.f / fovea::exp_inplace(srows[r], len) : 0.f;
          std::fill(srows[r] + len, srows[r] + seen, 0.f);
        }
        const float* vh = vals.get() + h * n * head_dim;
        if (wide)
          weighted_cols<fovea::kWide>(srows, vh, seen, head_dim, orows);
        else
          weighted_cols<8>(srows, vh, seen, head_dim, orows);
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < head_dim; ++c) orows[r][c] *= inv_sum[r];
          fovea::convert(op + ((i0 + r) * heads + head) * head_dim, orows[r], head_dim);
        }
      }
    });
  });
  return out;
}

// A fresh prompt: q [n, heads, head_dim], k and v [n, kv_heads, head_dim] (views into the
// step's qkv are fine), float32 or bfloat16 -> [n, heads * head_dim] in q's dtype.
at::Tensor causal_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          double scale) {
  check_inputs(q, k, v);
  const int64_t n = q.size(0);
  TORCH_CHECK(k.size(0) == n, "shapes of q, k and v disagree");
  return attend(q, k, v, KeyRows{n, 0, nullptr, k.stride(0), v.stride(0)}, scale);
}

// A chunk after a cached prefix: its keys are the pool rows k_cache[slots[t]] (contiguous
// [pool slots, kv_heads, head_dim] caches, this chunk's rows already stored), positions
// [0, n); q's rows are the last q_len positions.
at::Tensor causal_prefill_paged(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& slots,
                                double scale) {
  check_inputs(q, k_cache, v_cache);
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous");
  TORCH_CHECK(slots.dim() == 1 && slots.is_contiguous() && slots.scalar_type() == at::kLong,
              "slots must be a contiguous int64 [n]");
  const int64_t n = slots.size(0), q_len = q.size(0), pool_slots = k_cache.size(0);
  TORCH_CHECK(q_len >= 1 && n >= q_len, "slots must cover the prefix and the chunk's ", q_len,
              " queries, got ", n);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < pool_slots, "slot ", sp[t], " is outside the pool");
  const int64_t row = k_cache.size(1) * k_cache.size(2);
  return attend(q, k_cache, v_cache, KeyRows{n, n - q_len, sp, row, row}, scale);
}

}  // namespace
}  // namespace fovea::prefill

TORCH_LIBRARY_FRAGMENT(fovea, m) {
  m.def("causal_prefill(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("causal_prefill_paged(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fovea, CPU, m) {
  m.impl("causal_prefill", &fovea::prefill::causal_prefill);
  m.impl("causal_prefill_paged", &fovea::prefill::causal_prefill_paged);
}
