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

namespace {

using fovea::vf;

// Rows this many positions ahead are prefetched: slots need not be adjacent in memory.
constexpr int64_t kAhead = 32;
// Elements of T in one 64-byte cache line.
template <typename T>
constexpr int kLine = 64 / sizeof(T);
// Query heads served by one pass over the keys: their accumulators stay in registers.
constexpr int kSub = 4;

// s[g][t] = scale * q_g . k_t for the G query heads q [G][head_dim] (s's rows are `n` apart).
// Each key row is loaded (and widened from bf16) once for all G heads; four keys' partial
// vectors per head are reduced together (hsum4).
template <int W, int G, typename T>
void scores(const float* q, const T* const* k_rows, int64_t n, int64_t head_dim, float scale,
            float* s) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    if (t + kAhead + 4 <= n)
      for (int64_t i = t + kAhead; i < t + kAhead + 4; ++i)
        for (int64_t d = 0; d < head_dim; d += kLine<T>) __builtin_prefetch(k_rows[i] + d);
    vf<W> acc[G][4] = {};
    for (int64_t d = 0; d < head_dim; d += W) {
      vf<W> qv[G];
      for (int g = 0; g < G; ++g) qv[g] = fovea::load<W>(q + g * head_dim + d);
      for (int j = 0; j < 4; ++j) {
        const vf<W> kv = fovea::load<W>(k_rows[t + j] + d);
        for (int g = 0; g < G; ++g) acc[g][j] += qv[g] * kv;
      }
    }
    for (int g = 0; g < G; ++g) {
      fovea::hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], s + g * n + t);
      for (int j = 0; j < 4; ++j) s[g * n + t + j] *= scale;
    }
  }
  for (; t < n; ++t) {
    vf<W> acc[G] = {};
    for (int64_t d = 0; d < head_dim; d += W) {
      const vf<W> kv = fovea::load<W>(k_rows[t] + d);
      for (int g = 0; g < G; ++g) acc[g] += fovea::load<W>(q + g * head_dim + d) * kv;
    }
    for (int g = 0; g < G; ++g) s[g * n + t] = fovea::hsum(acc[g]) * scale;
  }
}

// out[g][col, col + C*W) = sum_t p[g][t] * v_t[col, col + C*W): each value vector loaded
// feeds all G heads; G*C accumulators stay in registers across t. out's rows are v_dim apart.
template <int W, int G, int C, typename T>
void values(const float* p, const T* const* v_rows, int64_t n, int64_t col, int64_t v_dim,
            float* out) {
  vf<W> acc[G][C] = {};
  for (int64_t t = 0; t < n; ++t) {
    const T* v = v_rows[t] + col;
    if (t + kAhead < n)
      for (int d = 0; d < C * W; d += kLine<T>) __builtin_prefetch(v_rows[t + kAhead] + col + d);
    vf<W> vv[C];
    for (int c = 0; c < C; ++c) vv[c] = fovea::load<W>(v + c * W);
    for (int g = 0; g < G; ++g) {
      const float pg = p[g * n + t];
      for (int c = 0; c < C; ++c) acc[g][c] += pg * vv[c];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) fovea::store<W>(out + g * v_dim + col + c * W, acc[g][c]);
}

// G (<= kSub) query heads of one KV head: q [G][head_dim], out [G][v_dim]; k_rows/v_rows [n]
// point at this KV head's row of each position (values: its first v_dim elements); s is
// [G][n] scratch.
template <int W, int G, typename T>
void attend(const float* q, const T* const* k_rows, const T* const* v_rows, int64_t n,
            int64_t head_dim, int64_t v_dim, float scale, float* s, float* out) {
  scores<W, G>(q, k_rows, n, head_dim, scale, s);
  for (int g = 0; g < G; ++g) fovea::softmax_inplace(s + g * n, n);
  int64_t col = 0;
  for (; col + 4 * W <= v_dim; col += 4 * W) values<W, G, 4>(s, v_rows, n, col, v_dim, out);
  switch ((v_dim - col) / W) {
    case 3: return values<W, G, 3>(s, v_rows, n, col, v_dim, out);
    case 2: return values<W, G, 2>(s, v_rows, n, col, v_dim, out);
    case 1: return values<W, G, 1>(s, v_rows, n, col, v_dim, out);
    default: return;
  }
}

// One (sequence, KV head): the group's query heads in passes of up to kSub heads.
template <int W, typename T>
void decode_one(const float* q, const T* const* k_rows, const T* const* v_rows, int64_t n,
                int64_t group, int64_t head_dim, int64_t v_dim, float scale, float* s,
                float* out) {
  for (int64_t g0 = 0; g0 < group; g0 += kSub) {
    const float* qg = q + g0 * head_dim;
    float* og = out + g0 * v_dim;
    switch (std::min<int64_t>(kSub, group - g0)) {
      case 4: attend<W, 4>(qg, k_rows, v_rows, n, head_dim, v_dim, scale, s, og); break;
      case 3: attend<W, 3>(qg, k_rows, v_rows, n, head_dim, v_dim, scale, s, og); break;
      case 2: attend<W, 2>(qg, k_rows, v_rows, n, head_dim, v_dim, scale, s, og); break;
      default: attend<W, 1>(qg, k_rows, v_rows, n, head_dim, v_dim, scale, s, og); break;
    }
  }
}

void check_slots(const at::Tensor& slots, const at::Tensor& lens, int64_t batch,
                 int64_t pool_slots) {
  TORCH_CHECK(slots.dim() == 2 && slots.is_contiguous() && slots.scalar_type() == at::kLong &&
                  lens.dim() == 1 && lens.is_contiguous() && lens.scalar_type() == at::kLong,
              "slots [B, max_len] and lens [B] must be contiguous int64");
  TORCH_CHECK(slots.size(0) == batch && lens.size(0) == batch, "slots and lens must have B rows");
  const int64_t max_len = slots.size(1);
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t* len_p = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len_p[b] >= 1 && len_p[b] <= max_len, "lens must lie in [1, max_len]");
    for (int64_t t = 0; t < len_p[b]; ++t) {
      const int64_t slot = slot_p[b * max_len + t];
      TORCH_CHECK(slot >= 0 && slot < pool_slots, "slot ", slot, " is outside the pool");
    }
  }
}

// q [B, heads, head_dim] float32; k_cache/v_cache [pool slots, kv_heads, head_dim];
// slots [B, max_len] int64: row b's first lens[b] entries are its sequence's slots, in
// position order -> [B, heads * head_dim] float32.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& slots, const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2) &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "q must be a float32 or bfloat16 [B, heads, head_dim] with contiguous heads");
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
  const bool wide = head_dim % fovea::kWide == 0;
  const int64_t width = group * head_dim;  // one task's query (and output) elements
  auto run = [&](auto cache_tag, auto act_tag) {
    using T = decltype(cache_tag);
    using A = decltype(act_tag);
    const T* kp = k_cache.data_ptr<T>();
    const T* vp = v_cache.data_ptr<T>();
    const A* qp = q.data_ptr<A>();
    A* op = out.data_ptr<A>();
    const int64_t stride = kv_heads * head_dim;  // between one slot's rows and the next's
    at::parallel_for(0, batch * kv_heads, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scratch, qf(width), of(width);
      std::vector<const T*> k_rows, v_rows;
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t b = task / kv_heads, kvh = task % kv_heads, n = len_p[b];
        const int64_t* sl = slot_p + b * max_len;
        k_rows.resize(n);
        v_rows.resize(n);
        for (int64_t t = 0; t < n; ++t) {
          k_rows[t] = kp + sl[t] * stride + kvh * head_dim;
          v_rows[t] = vp + sl[t] * stride + kvh * head_dim;
        }
        scratch.resize(kSub * n);
        const A* qrow = qp + b * q.stride(0) + kvh * width;
        fovea::convert(qf.data(), qrow, width);
        const float sc = static_cast<float>(scale);
        if (wide)
          decode_one<fovea::kWide>(qf.data(), k_rows.data(), v_rows.data(), n, group, head_dim,
                                   head_dim, sc, scratch.data(), of.data());
        else
          decode_one<8>(qf.data(), k_rows.data(), v_rows.data(), n, group, head_dim, head_dim, sc,
                        scratch.data(), of.data());
        A* orow = op + b * heads * head_dim + kvh * width;
        fovea::convert(orow, of.data(), width);
      }
    });
  };
  fovea::dispatch_float_bf16(k_cache.scalar_type(), [&](auto cache_tag) {
    fovea::dispatch_float_bf16(q.scalar_type(), [&](auto act_tag) { run(cache_tag, act_tag); });
  });
  return out;
}

// MLA decode over a latent pool (DeepSeek-V2's absorbed attention: one shared KV row a
// position, read as the key in full and as the value by its first v_dim elements).
// q [B, heads, head_dim] float32 or bf16 with contiguous heads; cache [pool slots, 1,
// head_dim]; slots/lens as paged_decode's -> [B, heads * v_dim] in q's dtype. One task is one
// sequence; each pass over its rows serves up to kSub query heads.
at::Tensor paged_decode_latent(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& slots,
                               const at::Tensor& lens, int64_t v_dim, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2) &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "q must be a float32 or bfloat16 [B, heads, head_dim] with contiguous heads");
  TORCH_CHECK(cache.dim() == 3 && cache.is_contiguous() && cache.size(1) == 1 &&
                  cache.size(2) == q.size(2) &&
                  (cache.scalar_type() == at::kFloat || cache.scalar_type() == at::kBFloat16),
              "cache must be a contiguous float32 or bfloat16 [slots, 1, head_dim]");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  TORCH_CHECK(head_dim % 8 == 0 && v_dim % 8 == 0 && v_dim > 0 && v_dim <= head_dim,
              "head_dim and v_dim must be multiples of 8 with v_dim <= head_dim");
  check_slots(slots, lens, batch, cache.size(0));
  const int64_t max_len = slots.size(1);
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t* len_p = lens.data_ptr<int64_t>();
  auto out = at::empty({batch, heads * v_dim}, q.options());
  const bool wide = head_dim % fovea::kWide == 0 && v_dim % fovea::kWide == 0;
  auto run = [&](auto cache_tag, auto act_tag) {
    using T = decltype(cache_tag);
    using A = decltype(act_tag);
    const T* cp = cache.data_ptr<T>();
    const A* qp = q.data_ptr<A>();
    A* op = out.data_ptr<A>();
    at::parallel_for(0, batch, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> scratch, qf(heads * head_dim), of(heads * v_dim);
      std::vector<const T*> rows;
      for (int64_t b = lo; b < hi; ++b) {
        const int64_t n = len_p[b];
        const int64_t* sl = slot_p + b * max_len;
        rows.resize(n);
        for (int64_t t = 0; t < n; ++t) rows[t] = cp + sl[t] * head_dim;
        scratch.resize(kSub * n);
        fovea::convert(qf.data(), qp + b * q.stride(0), heads * head_dim);
        const float sc = static_cast<float>(scale);
        if (wide)
          decode_one<fovea::kWide>(qf.data(), rows.data(), rows.data(), n, heads, head_dim, v_dim,
                                   sc, scratch.data(), of.data());
        else
          decode_one<8>(qf.data(), rows.data(), rows.data(), n, heads, head_dim, v_dim, sc,
                        scratch.data(), of.data());
        fovea::convert(op + b * heads * v_dim, of.data(), heads * v_dim);
      }
    });
  };
  fovea::dispatch_float_bf16(cache.scalar_type(), [&](auto cache_tag) {
    fovea::dispatch_float_bf16(q.scalar_type(), [&](auto act_tag) { run(cache_tag, act_tag); });
  });
  return out;
}

// k_cache[slots[i]] = k[i] and v_cache[slots[i]] = v[i] for this step's T new tokens: k, v
// [T, kv_heads, head_dim] with contiguous heads (rows may be views into one qkv tensor), of
// the caches' dtype. torch's index_copy_ took ~10x a plain copy on such strided rows.
void store_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
              const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.dtype() == v_cache.dtype(),
              "k_cache and v_cache must be contiguous [slots, kv_heads, head_dim] alike");
  TORCH_CHECK(slots.dim() == 1 && slots.is_contiguous() && slots.scalar_type() == at::kLong,
              "slots must be a contiguous int64 [T]");
  const int64_t tokens = slots.size(0), row = k_cache.size(1) * k_cache.size(2);
  for (const at::Tensor* x : {&k, &v})
    TORCH_CHECK(x->dim() == 3 && x->size(0) == tokens && x->size(1) == k_cache.size(1) &&
                    x->size(2) == k_cache.size(2) && x->stride(2) == 1 &&
                    x->stride(1) == x->size(2) && x->dtype() == k_cache.dtype(),
                "k and v must be [T, kv_heads, head_dim] with contiguous heads, of the "
                "caches' dtype");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t pool_slots = k_cache.size(0);
  for (int64_t i = 0; i < tokens; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < pool_slots, "slot ", sp[i], " is outside the pool");
  const int64_t bytes = row * k_cache.element_size();
  auto* kc = static_cast<char*>(k_cache.data_ptr());
  auto* vc = static_cast<char*>(v_cache.data_ptr());
  const auto* kp = static_cast<const char*>(k.data_ptr());
  const auto* vp = static_cast<const char*>(v.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  at::parallel_for(0, tokens, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      std::memcpy(kc + sp[i] * bytes, kp + i * ks, bytes);
      std::memcpy(vc + sp[i] * bytes, vp + i * vs, bytes);
    }
  });
}

}  // namespace

TORCH_LIBRARY(fovea, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor lens, "
        "float scale) -> Tensor");
  m.def("paged_decode_latent(Tensor q, Tensor cache, Tensor slots, Tensor lens, int v_dim, "
        "float scale) -> Tensor");
  m.def("store_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor k, Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(fovea, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("paged_decode_latent", &paged_decode_latent);
  m.impl("store_kv", &store_kv);
}
