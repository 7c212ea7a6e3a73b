// What the float and bf16 halves of the causal prefill kernel share (causal_prefill.cpp,
// causal_prefill_bf16.cpp): the block shape, the key rows of a call, the layout's task split.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace fovea::prefill {

constexpr int64_t kRows = 4;   // query rows per block
constexpr int64_t kPad = 32;   // keys are padded to whole steps of 2 * W (W <= 16)
// Keys per task when a call lays its keys out: a few KV heads alone (3 on 2 threads) left a
// thread idle a third of the time. Even, so a bf16 value pair never spans two tasks.
constexpr int64_t kLayoutKeys = 128;

// The keys of one call: positions [0, n), the queries being the last n - start of them. Key
// and value row t is row t of k/v (a fresh prompt: start = 0) or, after a cached prefix, pool
// row slots[t] of the caches (this chunk's rows already stored there).
struct KeyRows {
  int64_t n, start;
  const int64_t* slots;  // nullptr: row t is t
  int64_t k_stride, v_stride;  // elements between one row and the next
  int64_t row(int64_t t) const { return slots ? slots[t] : t; }
};

// f(h, t0, t1) lays out KV head h's keys [t0, t1): the layout runs as (head, kLayoutKeys keys)
// tasks.
template <typename F>
void for_key_chunks(int64_t kv_heads, int64_t n, const F& f) {
  const int64_t chunks = (n + kLayoutKeys - 1) / kLayoutKeys;
  at::parallel_for(0, kv_heads * chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t t0 = task % chunks * kLayoutKeys;
      f(task / chunks, t0, std::min(n, t0 + kLayoutKeys));
    }
  });
}

// One attention task of heads * blocks (blocks of kRows query rows): its query head, KV head,
// first query row, row count and the keys any of its rows sees. The order pairs cheap early
// blocks with costly late ones, so contiguous task ranges (how parallel_for splits) carry
// similar work.
struct BlockTask {
  int64_t head, kv_head, i0, rows, seen;
};

inline BlockTask block_task(int64_t task, int64_t heads, int64_t group, int64_t blocks,
                            int64_t q_len, int64_t start) {
  const int64_t head = task % heads, rank = task / heads;
  const int64_t blk = rank % 2 == 0 ? rank / 2 : blocks - 1 - rank / 2;
  const int64_t i0 = blk * kRows, rows = std::min(kRows, q_len - i0);
  return {head, head / group, i0, rows, start + i0 + rows};
}

// Both matmuls on vdpbf16ps: q, k and v bf16, head_dim a multiple of 16, an AVX512-BF16 CPU
// (defined only when built for one). Query i (position keys_at.start + i) attends to keys
// [0, start + i]; returns [q_len, heads * head_dim] bf16.
at::Tensor causal_prefill_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const KeyRows& keys_at, double scale);

}  // namespace fovea::prefill
