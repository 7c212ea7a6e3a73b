// Causal self-attention of one prefill chunk with no cached prefix (a fresh prompt), on CPU.
//
// torch's flash SDPA ran these at ~56 GFLOP/s (26% of a 200-token prefill): its blocks suit
// long sequences. Here the keys of each KV head are laid out transposed once ([head_dim][n],
// float), so eight scores come from one FMA chain with no horizontal sums: a block of four
// query rows against sixteen keys keeps eight accumulators in registers per step of head_dim.
// The softmax is exact (two passes over a row's scores); the value sums take the block's
// four rows at once, so each value vector loaded feeds four rows.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "vec.h"

using fovea::load8;
using fovea::store8;
using fovea::vec8;

namespace {

constexpr int64_t kRows = 4;   // query rows per block
constexpr int64_t kKeys = 16;  // keys per inner step (two vectors)

// scores[r][j] = scale * q_r . k_j for rows r < rows and keys j < keys (a multiple of 16);
// kt [head_dim][stride] holds the keys transposed (columns past n are zero).
void score_block(const float* const* q, int64_t rows, const float* kt, int64_t stride,
                 int64_t keys, int64_t head_dim, float scale, float* const* scores) {
  for (int64_t j = 0; j < keys; j += kKeys) {
    vec8 acc[kRows][2] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const vec8 k0 = load8(kt + d * stride + j), k1 = load8(kt + d * stride + j + 8);
      for (int64_t r = 0; r < kRows; ++r) {
        const float qd = q[r][d];
        acc[r][0] += qd * k0;
        acc[r][1] += qd * k1;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      store8(scores[r] + j, acc[r][0] * scale);
      store8(scores[r] + j + 8, acc[r][1] * scale);
    }
  }
}

// out[r][col, col + 32) = sum_{t<n} p[r][t] * v[t][col, col + 32) for the block's rows:
// each value vector loaded feeds all rows (16 accumulators: fits AVX2's 16 registers).
void weighted_block(const float* const* p, const float* v, int64_t n, int64_t head_dim,
                    int64_t col, float* const* out) {
  vec8 acc[kRows][4] = {};
  for (int64_t t = 0; t < n; ++t) {
    const float* row = v + t * head_dim + col;
    const vec8 v0 = load8(row), v1 = load8(row + 8), v2 = load8(row + 16), v3 = load8(row + 24);
    for (int64_t r = 0; r < kRows; ++r) {
      const float pr = p[r][t];
      acc[r][0] += pr * v0;
      acc[r][1] += pr * v1;
      acc[r][2] += pr * v2;
      acc[r][3] += pr * v3;
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int j = 0; j < 4; ++j) store8(out[r] + col + 8 * j, acc[r][j]);
}

// The same for 8 columns (head_dim not a multiple of 32).
void weighted_block8(const float* const* p, const float* v, int64_t n, int64_t head_dim,
                     int64_t col, float* const* out) {
  vec8 acc[kRows] = {};
  for (int64_t t = 0; t < n; ++t) {
    const vec8 v0 = load8(v + t * head_dim + col);
    for (int64_t r = 0; r < kRows; ++r) acc[r] += p[r][t] * v0;
  }
  for (int64_t r = 0; r < kRows; ++r) store8(out[r] + col, acc[r]);
}

// q [n, heads, head_dim] float32 contiguous; k, v [n, kv_heads, head_dim] (rows of head_dim
// contiguous, any row stride), float32 or bfloat16 -> [n, heads * head_dim] float32.
at::Tensor causal_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == at::kFloat,
              "q must be a contiguous float32 [n, heads, head_dim]");
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
  const int64_t stride = (n + kKeys - 1) / kKeys * kKeys;  // keys padded to whole steps
  // Per KV head: keys transposed [head_dim][stride] and values [n][head_dim], in float.
  std::vector<float> kt(kv_heads * head_dim * stride, 0.f), vf(kv_heads * n * head_dim);
  fovea::dispatch_float_bf16(k.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    at::parallel_for(0, kv_heads, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t h = lo; h < hi; ++h)
        for (int64_t t = 0; t < n; ++t) {
          const T* krow = kp + t * k.stride(0) + h * head_dim;
          const T* vrow = vp + t * v.stride(0) + h * head_dim;
          float* kd = kt.data() + h * head_dim * stride + t;
          for (int64_t d = 0; d < head_dim; ++d) kd[d * stride] = static_cast<float>(krow[d]);
          for (int64_t d = 0; d < head_dim; d += 8)
            store8(vf.data() + (h * n + t) * head_dim + d, load8(vrow + d));
        }
    });
  });
  auto out = at::empty({n, heads * head_dim}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t blocks = (n + kRows - 1) / kRows;
  // Task order pairs cheap early blocks with costly late ones, so contiguous task ranges
  // (how parallel_for splits) carry similar work.
  at::parallel_for(0, heads * blocks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> scores(kRows * stride), scratch(kRows * head_dim);
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t head = task % heads, rank = task / heads;
      const int64_t blk = rank % 2 == 0 ? rank / 2 : blocks - 1 - rank / 2;
      const int64_t h = head / group, i0 = blk * kRows, rows = std::min(kRows, n - i0);
      const float* qrows[kRows];
      float* srows[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        qrows[r] = qp + ((i0 + std::min(r, rows - 1)) * heads + head) * head_dim;
        srows[r] = scores.data() + r * stride;
      }
      const int64_t keys = (i0 + rows + kKeys - 1) / kKeys * kKeys;
      score_block(qrows, rows, kt.data() + h * head_dim * stride, stride, keys, head_dim,
                  static_cast<float>(scale), srows);
      // Softmax each row over its keys; zero the rest of the block's keys (and whole rows
      // past n), so the value sums can run over the block's keys for all rows at once.
      float* orows[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        const int64_t len = r < rows ? i0 + r + 1 : 0;  // row i0 + r sees keys [0, i0 + r]
        if (len) fovea::softmax_inplace(srows[r], len);
        std::fill(srows[r] + len, srows[r] + i0 + rows, 0.f);
        orows[r] = r < rows ? op + ((i0 + r) * heads + head) * head_dim
                            : scratch.data() + (r - rows) * head_dim;
      }
      const float* vh = vf.data() + h * n * head_dim;
      int64_t col = 0;
      for (; col + 32 <= head_dim; col += 32)
        weighted_block(srows, vh, i0 + rows, head_dim, col, orows);
      for (; col < head_dim; col += 8)
        weighted_block8(srows, vh, i0 + rows, head_dim, col, orows);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fovea, m) {
  m.def("causal_prefill(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fovea, CPU, m) { m.impl("causal_prefill", &causal_prefill); }
