// Decode attention over a paged KV pool on CPU, reading K/V rows in place by slot.
//
// torch's path gathers every sequence's K/V into a padded [B, max_len] copy and then runs
// SDPA, whose flash kernel is tuned for long query blocks: at decode (one query per
// sequence) the copy and the kernel's set-up cost more than the arithmetic. Here one task is
// one (sequence, KV head): it scores the group's query heads against each slot's key row, takes
// the softmax and sums the value rows, touching each K/V row once and copying nothing.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

using fovea::hsum;
using fovea::load8;
using fovea::vec8;

namespace {

// Rows this many positions ahead are prefetched: slots need not be adjacent in memory.
constexpr int64_t kAhead = 20;

// out[0:8W) = sum_t p[t] * rows[t][0:8W): W accumulators stay in registers across t.
template <int W, typename T>
void weighted_sum(const float* p, const T* const* rows, int64_t n, int64_t col, float* out) {
  vec8 acc[W] = {};
  for (int64_t t = 0; t < n; ++t) {
    const T* v = rows[t] + col;
    if (t + kAhead < n)
      for (int j = 0; j < W; j += 2) __builtin_prefetch(rows[t + kAhead] + col + 8 * j);
    for (int j = 0; j < W; ++j) acc[j] += p[t] * load8(v + 8 * j);
  }
  std::memcpy(out, acc, sizeof acc);
}

template <typename T>
void weighted_sum_any(int w, const float* p, const T* const* rows, int64_t n, int64_t col,
                      float* out) {
  switch (w) {
    case 8: return weighted_sum<8>(p, rows, n, col, out);
    case 7: return weighted_sum<7>(p, rows, n, col, out);
    case 6: return weighted_sum<6>(p, rows, n, col, out);
    case 5: return weighted_sum<5>(p, rows, n, col, out);
    case 4: return weighted_sum<4>(p, rows, n, col, out);
    case 3: return weighted_sum<3>(p, rows, n, col, out);
    case 2: return weighted_sum<2>(p, rows, n, col, out);
    default: return weighted_sum<1>(p, rows, n, col, out);
  }
}

// One (sequence, KV head): q and out are the group's [group, head_dim] query/output rows;
// k_rows/v_rows [n] point at this KV head's row of each position; scores is [group, n].
template <typename T>
void decode_one(const float* q, const T* const* k_rows, const T* const* v_rows, int64_t n,
                int64_t group, int64_t head_dim, float scale, float* scores, float* out) {
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * head_dim;
    float* s = scores + g * n;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {  // four positions at once: four independent FMA chains
      if (g == 0 && t + kAhead + 4 <= n)
        for (int64_t i = t + kAhead; i < t + kAhead + 4; ++i)
          for (int64_t d = 0; d < head_dim; d += 16) __builtin_prefetch(k_rows[i] + d);
      vec8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t d = 0; d < head_dim; d += 8) {
        const vec8 qv = load8(qg + d);
        a0 += qv * load8(k_rows[t] + d);
        a1 += qv * load8(k_rows[t + 1] + d);
        a2 += qv * load8(k_rows[t + 2] + d);
        a3 += qv * load8(k_rows[t + 3] + d);
      }
      s[t] = hsum(a0) * scale;
      s[t + 1] = hsum(a1) * scale;
      s[t + 2] = hsum(a2) * scale;
      s[t + 3] = hsum(a3) * scale;
    }
    for (; t < n; ++t) {
      vec8 a = {};
      for (int64_t d = 0; d < head_dim; d += 8) a += load8(qg + d) * load8(k_rows[t] + d);
      s[t] = hsum(a) * scale;
    }
    fovea::softmax_inplace(s, n);
    for (int64_t col = 0; col < head_dim; col += 64) {
      const int w = static_cast<int>(std::min<int64_t>(64, head_dim - col) / 8);
      weighted_sum_any(w, s, v_rows, n, col, out + g * head_dim + col);
    }
  }
}

// q [B, heads, head_dim] float32; k_cache/v_cache [pool slots, kv_heads, head_dim];
// slots [B, max_len] int64: row b's first lens[b] entries are its sequence's slots, in
// position order -> [B, heads * head_dim] float32.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& slots, const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == at::kFloat,
              "q must be a contiguous float32 [B, heads, head_dim]");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.dtype() == v_cache.dtype(),
              "k_cache and v_cache must be contiguous [slots, kv_heads, head_dim] alike");
  TORCH_CHECK(slots.dim() == 2 && slots.is_contiguous() && slots.scalar_type() == at::kLong &&
                  lens.dim() == 1 && lens.is_contiguous() && lens.scalar_type() == at::kLong,
              "slots [B, max_len] and lens [B] must be contiguous int64");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), group = heads / kv_heads;
  TORCH_CHECK(head_dim % 8 == 0, "head_dim must be a multiple of 8, got ", head_dim);
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16,
              "the KV cache must be float32 or bfloat16");
  TORCH_CHECK(k_cache.size(2) == head_dim && heads % kv_heads == 0 && slots.size(0) == batch &&
                  lens.size(0) == batch,
              "shapes of q, caches, slots and lens disagree");
  const int64_t max_len = slots.size(1);
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t* len_p = lens.data_ptr<int64_t>();
  const int64_t pool_slots = k_cache.size(0);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len_p[b] >= 1 && len_p[b] <= max_len, "lens must lie in [1, max_len]");
    for (int64_t t = 0; t < len_p[b]; ++t) {
      const int64_t slot = slot_p[b * max_len + t];
      TORCH_CHECK(slot >= 0 && slot < pool_slots, "slot ", slot, " is outside the pool");
    }
  }
  auto out = at::empty({batch, heads * head_dim}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    const int64_t stride = kv_heads * head_dim;  // between one slot's rows and the next's
    at::parallel_for(0, batch * kv_heads, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scores;
      std::vector<const scalar_t*> k_rows, v_rows;
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / kv_heads, kvh = task % kv_heads, n = len_p[b];
        const int64_t* sl = slot_p + b * max_len;
        k_rows.resize(n);
        v_rows.resize(n);
        for (int64_t t = 0; t < n; ++t) {
          k_rows[t] = kp + sl[t] * stride + kvh * head_dim;
          v_rows[t] = vp + sl[t] * stride + kvh * head_dim;
        }
        scores.resize(group * n);
        const int64_t off = (b * heads + kvh * group) * head_dim;
        decode_one<scalar_t>(qp + off, k_rows.data(), v_rows.data(), n, group, head_dim,
                             static_cast<float>(scale), scores.data(), op + off);
      }
    });
  };
  fovea::dispatch_float_bf16(k_cache.scalar_type(), run);
  return out;
}

}  // namespace

TORCH_LIBRARY(fovea, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fovea, CPU, m) { m.impl("paged_decode", &paged_decode); }
