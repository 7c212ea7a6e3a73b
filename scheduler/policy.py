"""Admission order and per-step budgets.

Order: sequences that were retracted go first (they already waited once), in queue order.
The rest go first-come-first-served, except with the "lpm" policy when the queue is long
(>= LPM_MIN_WAITING): then the longest cached prefix goes first, so requests sharing a prefix
run while that prefix is still in the tree (ties keep arrival order).

Budget: one step computes at most `max_prefill_tokens` tokens, decode tokens included; one
sequence's prefill chunk is capped at `chunked_prefill_size` (-1: no chunking, and a prompt
larger than the whole budget is still taken when it is the step's only prefill, otherwise it
could never run). Running sequences are served in order, so by default (cap = budget) the
oldest prompt finishes first.

Batch target: a step takes no further prompt once its prompt tokens reach
`prefill_batch_tokens` (decode tokens do not count; the prompt that crosses it keeps its
whole chunk, so a step always takes at least one). A prompt batched with others gets its
first token only when all of them are computed: cheap on a GPU (the default is the whole
budget), not on a CPU, where a step's time grows with each token beyond the cost of one
weight read, hence CPU_PREFILL_BATCH_TOKENS (measurements and its throughput price:
docs/cpu.md).

Models whose image tokens attend to each other in full (Gemma 3) need each image computed in
one chunk: chunks end before an image rather than inside it, and a prefix hit that ends inside
one is cut back to its start (`whole_image_chunk`, `whole_image_prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fovea.common.config import ServerArgs
from fovea.common.messages import ImageInput
from fovea.common.model_config import ModelInfo, images_attend_bidirectionally
from fovea.scheduler.radix_cache import RadixCache, RadixNode
from fovea.scheduler.request import Sequence

LPM_MIN_WAITING = 8
CPU_PREFILL_BATCH_TOKENS = 32


@dataclass(frozen=True)
class SchedulerConfig:
    context_length: int
    eos_token_ids: tuple[int, ...] = ()
    page_size: int = 1
    max_prefill_tokens: int = 2048
    chunked_prefill_size: int = 2048
    prefill_batch_tokens: int | None = None  # None: no target within max_prefill_tokens
    max_running_requests: int = 128
    schedule_policy: str = "lpm"
    disable_radix_cache: bool = False
    whole_images: bool = False  # never split an image across chunks (bidirectional images)
    # The workers' cross-attention image slots (Mllama; scheduler/cross_images.py); 0: the
    # model keeps no per-image state beside the KV cache.
    cross_image_slots: int = 0
    # The local layers' window when the workers keep a second pool for them (0: one pool).
    sliding_window: int = 0
    dp_rank: int = 0  # this replica's rank (--dp-size): stats and metrics name it
    # What the workers' pools hold per token, for /get_server_info (worker/kv_pool.py).
    kv_kind: str = "kv"
    kv_bytes_per_token: int = 0
    local_kv_bytes_per_token: int = 0
    # The workers encode images ahead of their prefill (StepPlan.encode): a prompt with images
    # waits for them without holding running sequences' decodes (scheduler/encode_ahead.py).
    encode_ahead: bool = False

    @staticmethod
    def from_args(
        args: ServerArgs,
        model: ModelInfo,
        max_seqs: int,
        device: str,
        cross_image_slots: int = 0,
        sliding_window: int = 0,
        dp_rank: int = 0,
        *,
        kv_kind: str = "kv",
        kv_bytes_per_token: int = 0,
        local_kv_bytes_per_token: int = 0,
        encode_ahead: bool = False,
    ) -> SchedulerConfig:
        """`max_seqs`: rows in the workers' request table, a hard cap on running sequences;
        `device`: the workers' device type; `cross_image_slots`: the smallest image pool of
        the ranks; `sliding_window`: the window of the workers' local pool (0: none);
        `kv_kind` / `*kv_bytes_per_token`: the pools' layout, reported only."""
        auto_batch = CPU_PREFILL_BATCH_TOKENS if device == "cpu" else None
        return SchedulerConfig(
            context_length=model.context_length,
            eos_token_ids=tuple(model.eos_token_ids),
            page_size=args.page_size,
            max_prefill_tokens=args.max_prefill_tokens,
            chunked_prefill_size=args.chunked_prefill_size,
            prefill_batch_tokens=args.prefill_batch_tokens or auto_batch,
            max_running_requests=min(args.max_running_requests, max_seqs),
            schedule_policy=args.schedule_policy,
            disable_radix_cache=args.disable_radix_cache,
            whole_images=images_attend_bidirectionally(model.architecture),
            cross_image_slots=cross_image_slots,
            sliding_window=sliding_window,
            dp_rank=dp_rank,
            kv_kind=kv_kind,
            kv_bytes_per_token=kv_bytes_per_token,
            local_kv_bytes_per_token=local_kv_bytes_per_token,
            encode_ahead=encode_ahead,
        )

    @property
    def batch_target(self) -> int:
        """Prompt tokens after which a step takes no further prompt."""
        return self.prefill_batch_tokens or self.max_prefill_tokens


def admission_order(waiting: list[Sequence], policy: str, cache: RadixCache) -> list[Sequence]:
    """The waiting queue in the order admission should try it. With lpm this matches every
    waiting prompt against the tree (marking those prefixes recently used)."""
    retracted = [s for s in waiting if s.retracted]
    fresh = sorted((s for s in waiting if not s.retracted), key=lambda s: s.arrival)
    if policy == "lpm" and len(waiting) >= LPM_MIN_WAITING and not cache.disabled:
        hit = {s.key: len(cache.match_prefix(s.match_key)[0]) for s in fresh}
        fresh.sort(key=lambda s: -hit[s.key])  # stable: ties stay in arrival order
    return retracted + fresh


def decode_reserve(num_running: int, page_size: int) -> int:
    """Slots admission leaves free so that every running sequence can decode at least one
    more step without retraction (retraction handles longer shortfalls)."""
    return num_running * page_size


@dataclass
class StepBudget:
    tokens_left: int  # max_prefill_tokens minus the tokens already scheduled this step
    chunk_cap: int  # chunked_prefill_size; -1: no chunking
    batch_target: int  # SchedulerConfig.batch_target
    prefill_tokens: int = 0  # prompt tokens scheduled this step (decode tokens not counted)

    @property
    def prefill_scheduled(self) -> bool:
        return self.prefill_tokens > 0

    @property
    def chunking(self) -> bool:
        return self.chunk_cap != -1

    def prefill_chunk(self, pending: int) -> int:
        """How many of a sequence's `pending` tokens it may compute this step (0: none)."""
        if self.prefill_tokens >= self.batch_target:
            return 0
        if not self.chunking:
            fits = pending <= self.tokens_left
            return pending if fits or not self.prefill_scheduled else 0
        return max(0, min(pending, self.chunk_cap, self.tokens_left))

    def take(self, n: int) -> None:
        self.tokens_left -= n
        self.prefill_tokens += n


def whole_image_chunk(images: list[ImageInput], start: int, n: int, extend: bool = True) -> int:
    """For models whose images attend to themselves in full (the image must be computed in
    one chunk): n adjusted so that tokens [start, start + n) do not end inside an image. The
    chunk stops at that image's start; an image that starts the chunk is taken whole (past
    the chunk cap and budget) if `extend`, else not at all (0: memory cannot hold it)."""
    end = start + n
    for img in images:
        lo, hi = img.offset, img.offset + img.num_tokens
        if lo < end < hi:
            if lo > start:
                return lo - start
            return hi - start if extend else 0
    return n


def whole_image_prefix(images: list[ImageInput], prefix_len: int, page_size: int) -> int:
    """A cached prefix that ends inside an image is cut back to the image's start (page
    aligned down): the image's tokens must be computed together."""
    cut = True
    while cut:
        cut = False
        for img in images:
            if img.offset < prefix_len < img.offset + img.num_tokens:
                prefix_len = img.offset - img.offset % page_size
                cut = True
    return prefix_len


def usable_prefix(
    cache: RadixCache, seq: Sequence, use_cache: bool, whole_images: bool
) -> tuple[list[int], list[int], RadixNode]:
    """The cached prefix `seq` may start from (global slots, local slots, node): at least its
    last known token is computed, to get the logits of the next one; the tree cuts a hit
    whose window is not whole, and a hit ending inside an image computed whole is cut back
    to the image's start, until neither applies."""
    key = seq.match_key if use_cache else []
    while True:
        slots, local, node = cache.match(key)
        cut = len(slots)
        if whole_images and seq.images:
            cut = whole_image_prefix(seq.images, cut, cache.page_size)
        if cut == len(slots):
            return slots, local, node
        key = seq.cache_key[:cut]


def finish_reason(seq: Sequence, token: int, cfg: SchedulerConfig) -> tuple[str | None, int | None]:
    """(reason, matched stop token) once `token` (already appended) ends `seq`, else (None,
    None)."""
    sp = seq.sampling
    n_out = len(seq.output_ids)
    if sp.grammar is not None and token in cfg.eos_token_ids:
        # The workers let EOS through only once the grammar is complete, and the grammar
        # then has terminated: the sequence ends whatever ignore_eos and min_new_tokens say.
        return "stop", token
    if n_out >= sp.min_new_tokens:
        eos = not sp.ignore_eos and token in cfg.eos_token_ids
        if eos or token in sp.stop_token_ids:
            return "stop", token
    if n_out >= seq.max_new_tokens or seq.num_tokens >= cfg.context_length:
        return "length", None
    return None, None
