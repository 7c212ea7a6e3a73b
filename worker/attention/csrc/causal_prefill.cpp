// Causal self-attention of one prefill chunk with no cached prefix (a fresh prompt), on CPU.
//
// torch's flash SDPA ran these at ~56 GFLOP/s (26% of a 200-token prefill): its blocks suit
// long sequences. Here the keys of each KV head are laid out transposed once ([head_dim][n],
// float), so W scores (W = 16 floats on AVX-512, else 8) come from one FMA chain with no
// horizontal sums: a block of four query rows against 2W keys keeps eight accumulators in
// registers per step of head_dim. The softmax is exact (two passes over a row's scores); the
// value sums take the block's four rows at once, so each value vector loaded feeds four rows.
// q is read in place (float32 or bf16 rows of the step's qkv); the output has q's dtype.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "vec.h"

using fovea::vf;

namespace {

constexpr int64_t kRows = 4;   // query rows per block
constexpr int64_t kPad = 32;   // keys are padded to whole steps of 2 * W (W <= 16)

// scores[r][j] = scale * q_r . k_j for rows r < rows and keys j < keys (a multiple of 2W);
// kt [head_dim][stride] holds the keys transposed (columns past n are zero).
template <int W>
void score_block(const float* const* q, int64_t rows, const float* kt, int64_t stride,
                 int64_t keys, int64_t head_dim, float scale, float* const* scores) {
  for (int64_t j = 0; j < keys; j += 2 * W) {
    vf<W> acc[kRows][2] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const float* kd = kt + d * stride + j;
      const vf<W> k0 = fovea::load<W>(kd), k1 = fovea::load<W>(kd + W);
      for (int64_t r = 0; r < kRows; ++r) {
        const float qd = q[r][d];
        acc[r][0] += qd * k0;
        acc[r][1] += qd * k1;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      fovea::store<W>(scores[r] + j, acc[r][0] * scale);
      fovea::store<W>(scores[r] + j + W, acc[r][1] * scale);
    }
  }
}

// out[r][col, col + C*W) = sum_{t<n} p[r][t] * v[t][col, col + C*W) for the block's rows:
// each value vector loaded feeds all rows (4C accumulators in registers).
template <int W, int C>
void weighted_block(const float* const* p, const float* v, int64_t n, int64_t head_dim,
                    int64_t col, float* const* out) {
  vf<W> acc[kRows][C] = {};
  for (int64_t t = 0; t < n; ++t) {
    const float* row = v + t * head_dim + col;
    vf<W> vv[C];
    for (int c = 0; c < C; ++c) vv[c] = fovea::load<W>(row + c * W);
    for (int64_t r = 0; r < kRows; ++r) {
      const float pr = p[r][t];
      for (int c = 0; c < C; ++c) acc[r][c] += pr * vv[c];
    }
  }
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

// q [n, heads, head_dim] float32 contiguous; k, v [n, kv_heads, head_dim] (rows of head_dim
// contiguous, any row stride), float32 or bfloat16 -> [n, heads * head_dim] float32.
at::Tensor causal_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2) &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "q must be a float32 or bfloat16 [n, heads, head_dim] with contiguous heads");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes() &&
                  k.scalar_type() == v.scalar_type(),
              "k and v must be [n, kv_heads, head_dim] alike");
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16,
              "k and v must be float32 or bfloat16");
  const int64_t n = q.size(0), heads = q.size(1), head_dim = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(k.size(0) == n && k.size(2) == head_dim && heads % kv_heads == 0,
              "shapes of q, k and v disagree");
  TORCH_CHECK(head_dim % 8 == 0, "head_dim must be a multiple of 8, got ", head_dim);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == head_dim,
                "k and v rows must hold their heads contiguously");
  const int64_t group = heads / kv_heads;
  const int64_t stride = (n + kPad - 1) / kPad * kPad;  // keys padded to whole steps
  const bool wide = head_dim % fovea::kWide == 0;
  // Per KV head: keys transposed [head_dim][stride] and values [n][head_dim], in float.
  std::vector<float> kt(kv_heads * head_dim * stride, 0.f), vals(kv_heads * n * head_dim);
  fovea::dispatch_float_bf16(k.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    at::parallel_for(0, kv_heads, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t h = lo; h < hi; ++h) {
        // Column by column: the writes run along kt's rows; the n key rows read stay in L1.
        const T* kh = kp + h * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) {
          float* kd = kt.data() + (h * head_dim + d) * stride;
          for (int64_t t = 0; t < n; ++t) kd[t] = static_cast<float>(kh[t * k.stride(0) + d]);
        }
        for (int64_t t = 0; t < n; ++t) {
          const T* vrow = vp + t * v.stride(0) + h * head_dim;
          fovea::convert(vals.data() + (h * n + t) * head_dim, vrow, head_dim);
        }
      }
    });
  });
  auto out = at::empty({n, heads * head_dim}, q.options());
  const int64_t blocks = (n + kRows - 1) / kRows;
  fovea::dispatch_float_bf16(q.scalar_type(), [&](auto act_tag) {
    using A = decltype(act_tag);
    const A* qp = q.data_ptr<A>();
    A* op = out.data_ptr<A>();
    // Task order pairs cheap early blocks with costly late ones, so contiguous task ranges
    // (how parallel_for splits) carry similar work.
    at::parallel_for(0, heads * blocks, 1, [&](int64_t lo, int64_t hi) {
      // The block's query and output rows in float: [kRows][head_dim] each.
      std::vector<float> scores(kRows * stride), qf(kRows * head_dim), of(kRows * head_dim);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t head = task % heads, rank = task / heads;
        const int64_t blk = rank % 2 == 0 ? rank / 2 : blocks - 1 - rank / 2;
        const int64_t h = head / group, i0 = blk * kRows, rows = std::min(kRows, n - i0);
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
        const float* kh = kt.data() + h * head_dim * stride;
        const float sc = static_cast<float>(scale);
        const int64_t step = 2 * (wide ? fovea::kWide : 8);
        const int64_t keys = (i0 + rows + step - 1) / step * step;
        if (wide)
          score_block<fovea::kWide>(qrows, rows, kh, stride, keys, head_dim, sc, srows);
        else
          score_block<8>(qrows, rows, kh, stride, keys, head_dim, sc, srows);
        // Softmax each row over its keys; zero the rest of the block's keys (and whole rows
        // past n), so the value sums can run over the block's keys for all rows at once.
        for (int64_t r = 0; r < kRows; ++r) {
          const int64_t len = r < rows ? i0 + r + 1 : 0;  // row i0 + r sees keys [0, i0 + r]
          if (len) fovea::softmax_inplace(srows[r], len);
          std::fill(srows[r] + len, srows[r] + i0 + rows, 0.f);
        }
        const float* vh = vals.data() + h * n * head_dim;
        if (wide)
          weighted_cols<fovea::kWide>(srows, vh, i0 + rows, head_dim, orows);
        else
          weighted_cols<8>(srows, vh, i0 + rows, head_dim, orows);
        for (int64_t r = 0; r < rows; ++r)
          fovea::convert(op + ((i0 + r) * heads + head) * head_dim, orows[r], head_dim);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fovea, m) {
  m.def("causal_prefill(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fovea, CPU, m) { m.impl("causal_prefill", &causal_prefill); }
