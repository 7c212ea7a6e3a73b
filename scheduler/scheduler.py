"""The scheduler core: socket-free, driven by messages in and plans/results out.

Composed of a KV allocator, a radix cache, a policy (order, budget) and a plan builder. The
process loop (main.py) feeds it messages, asks it for a plan, and gives it the result.

Memory: running sequences are served oldest admission first. When one needs slots that are
not free, the unlocked tree is evicted (LRU) first, then the newest running sequences are
retracted, up to and including the one asking. A retracted sequence's computed tokens go into
the radix tree (so its re-admission can hit them) and it returns to the front of the waiting
queue with prompt + outputs so far as input. The oldest running sequence therefore always
progresses, and each sequence alone fits (checked on arrival): no deadlock.

Sliding-window models (`num_local_slots > 0`): a second pool for the local layers
(scheduler/window_slots.py). Every allocation takes the same number of slots from both pools,
eviction frees from both, and before each step a running sequence gives back the local pages
that left its window. The tree matches only prefixes whose window is whole
(scheduler/radix_cache.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fovea.common.messages import (
    AbortRequest,
    RequestError,
    SchedulerStats,
    SeqOutput,
    StatsRequest,
    StepPlan,
    StepResult,
    TokenizedRequest,
    ToScheduler,
)
from fovea.scheduler.abort_memory import ABORT_MEMORY_S, AbortMemory
from fovea.scheduler.batch import PlanBuilder
from fovea.scheduler.cross_images import CrossImageSlots, salted_key
from fovea.scheduler.encode_ahead import EncodeAhead
from fovea.scheduler.kv_allocator import KVAllocator
from fovea.scheduler.policy import (
    SchedulerConfig,
    StepBudget,
    admission_order,
    decode_reserve,
    finish_reason,
    usable_prefix,
    whole_image_chunk,
)
from fovea.scheduler.radix_cache import RadixCache
from fovea.scheduler.request import SeqStatus, Sequence, seq_output
from fovea.scheduler.stats import flush_cache, snapshot
from fovea.scheduler.window_slots import WindowSlots

log = logging.getLogger("fovea.scheduler")

__all__ = ["ABORT_MEMORY_S", "Scheduler"]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_slots: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        num_local_slots: int = 0,
    ) -> None:
        """num_local_slots: the workers' local (sliding-window) pool; 0: one pool for all."""
        self.config = config
        self.allocator = KVAllocator(num_slots, config.page_size)
        self.local: WindowSlots | None = None
        if num_local_slots:
            self.local = WindowSlots(num_local_slots, config.page_size, config.sliding_window)
        window = config.sliding_window if self.local else 0
        self.cache = RadixCache(
            config.page_size, disabled=config.disable_radix_cache, window=window
        )
        self.plans = PlanBuilder()
        self.cross_images = (
            CrossImageSlots(config.cross_image_slots) if config.cross_image_slots else None
        )
        self.ahead = EncodeAhead() if config.encode_ahead else None
        self.waiting: list[Sequence] = []  # retracted first, then arrival order
        self.running: list[Sequence] = []  # admission order: the newest retract first
        self.seqs: dict[str, Sequence] = {}  # every waiting or running sequence by key
        # Outboxes, emptied by the process loop after each round.
        self.outputs: list[SeqOutput] = []  # -> tokenizer service, one TokenBatch per round
        self.to_server: list[RequestError | SchedulerStats] = []
        self._aborted = AbortMemory(clock)  # aborts of sequences not seen yet
        self._arrivals = 0
        self._admissions = 0
        self.num_retractions = 0
        self.requests_seen = 0  # TokenizedRequests taken in (the router counts them too)
        self.cache_hit_tokens = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.images_encoded = 0
        self.image_cache_bytes = 0  # rank 0's encoder output cache, as of the last step
        self.cross_kv_computed = 0
        self.images_received = 0
        self.handlers: dict[type, Callable[[Any], None]] = {
            TokenizedRequest: self.add_request,
            AbortRequest: self.abort,
            StatsRequest: self.stats,
        }

    @property
    def total_slots(self) -> int:
        return self.allocator.total_slots

    @property
    def has_work(self) -> bool:
        """Sequences to serve, or images the workers are still encoding ahead (finished even
        when their prompt was aborted meanwhile: the output is cached for a retry)."""
        return bool(self.waiting or self.running or (self.ahead and self.ahead.busy))

    def handle(self, msg: ToScheduler) -> None:
        self.handlers[type(msg)](msg)

    # ------------------------------------------------------------------ messages in

    def add_request(self, req: TokenizedRequest) -> None:
        self.requests_seen += 1
        if self._aborted.holds(req.rid, req.index):
            n = len(req.input_ids)
            self.outputs.append(SeqOutput(req.rid, req.index, [], None, "abort", None, n, 0, 0))
            return
        max_new = req.sampling.max_new_tokens
        assert max_new is not None, "the tokenizer resolves max_new_tokens"
        need = len(req.input_ids) + max_new
        too_many_images = (
            self.cross_images.refusal(req.rid, req.images) if self.cross_images else None
        )
        if not req.input_ids:
            self._reject(req.rid, f"request {req.rid}: empty prompt")
        elif too_many_images is not None:
            self._reject(req.rid, too_many_images)
        elif need > self.total_slots:
            self._reject(
                req.rid,
                f"request {req.rid} needs {need} KV slots ({len(req.input_ids)} prompt + "
                f"{max_new} max new tokens) but the cache holds only {self.total_slots}; "
                "lower max_tokens or shorten the prompt",
            )
        elif self.local and (
            (local_need := self.local.request_need(req, need, self.config)) > self._local_total
        ):
            self._reject(
                req.rid,
                f"request {req.rid} needs {local_need} slots of the sliding-window layers' pool "
                f"but it holds only {self._local_total}; raise --swa-full-tokens-ratio or "
                "lower --chunked-prefill-size",
            )
        else:
            seq = Sequence(
                req.rid,
                req.index,
                list(req.input_ids),
                req.sampling,
                self._arrivals,
                images=list(req.images),
            )
            if seq.key in self.seqs:
                log.warning("request %s: duplicate sequence %s ignored", req.rid, seq.key)
                return
            if self.cross_images is not None:  # every token depends on every image
                seq.prompt_key = salted_key(seq.prompt_key, seq.images)
            self._arrivals += 1
            self.prompt_tokens += len(req.input_ids)
            self.images_received += len(req.images)
            self.seqs[seq.key] = seq
            self.waiting.append(seq)

    def abort(self, msg: AbortRequest) -> None:
        """Reason "stop" (the detokenizer matched a stop string) emits nothing: the client
        already has its final output. Other reasons emit a final "abort" output per sequence."""
        targets = [
            s
            for s in self.seqs.values()
            if s.rid == msg.rid and (msg.index is None or s.index == msg.index)
        ]
        if msg.reason != "stop" and (not targets or msg.index is None):
            # Sequences of this rid may still be on their way from the tokenizer.
            self._aborted.remember(msg.rid, msg.index)
        for seq in targets:
            if seq.status is SeqStatus.RUNNING:
                self._release(seq)
                self.running.remove(seq)
            else:
                self.waiting.remove(seq)
            seq.status = SeqStatus.FINISHED
            del self.seqs[seq.key]
            log.debug("request %s: sequence %s aborted (%s)", seq.rid, seq.key, msg.reason)
            if msg.reason != "stop":
                self.outputs.append(seq_output(seq, [], None, "abort", None))

    def stats(self, msg: StatsRequest) -> None:
        flushed = msg.flush_cache and flush_cache(self)
        self.to_server.append(snapshot(self, msg.query_id, flushed, self.config.dp_rank))

    # ------------------------------------------------------------------ one step

    def schedule(self) -> StepPlan | None:
        """Plan the next forward pass; None when there is nothing to compute."""
        decodes = sum(1 for s in self.running if s.pending == 1)
        cfg = self.config
        budget = StepBudget(
            cfg.max_prefill_tokens - decodes, cfg.chunked_prefill_size, cfg.batch_target
        )
        retractions = self.num_retractions
        self._schedule_running(budget)
        # Memory ran out this step: admitting more would only be retracted again.
        if self.num_retractions == retractions:
            self._admit_waiting(budget)
        if self.ahead is None:
            return self.plans.build()
        return self.plans.build(self.ahead.take_outbox(), self.ahead.busy)

    @property
    def _local_total(self) -> int:
        return self.local.total_slots if self.local else 0

    def _schedule_running(self, budget: StepBudget) -> None:
        """Decode every running sequence (oldest first) and continue chunked prefills within
        the budget, retracting the newest sequences when memory runs out."""
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            want = 1 if seq.pending == 1 else budget.prefill_chunk(seq.pending)
            if want > 1 and self.config.whole_images:
                want = whole_image_chunk(seq.images, seq.num_computed, want)
            if want > 0:
                grown = self._grow(i, want)
                if grown is None:  # seq was the newest left and gave way
                    return
                got, got_local = grown
                if seq.pending > 1:
                    budget.take(len(got))
                sample = len(got) == seq.pending
                seq.slots.extend(got)
                seq.local_slots.extend(got_local)
                self.plans.add_chunk(seq, got, sample, got_local)
            i += 1

    def _grow(self, i: int, want: int) -> tuple[list[int], list[int]] | None:
        """Global and local slots for up to `want` more tokens of running[i] (a prefill chunk
        may shrink to what memory holds). Evicts the tree, then retracts the newest running
        sequences, ending with running[i] itself (then None)."""
        seq = self.running[i]
        alloc = self.allocator
        if self.local is not None:
            self.local.trim(seq)
        while True:
            self._evict_for(alloc.slots_needed(seq.num_computed, want))
            room = -seq.num_computed % alloc.page_size + self._available
            n = min(want, room)
            if n < want and self.config.whole_images:
                n = whole_image_chunk(seq.images, seq.num_computed, n, extend=False)
            if n == want or (n >= 1 and want > 1):
                return self._extend(seq.slots, seq.local_slots, n)
            victim = self.running[-1]
            self._retract(victim)
            if victim is seq:
                return None

    def _admit_waiting(self, budget: StepBudget) -> None:
        """Admit in policy order until one does not fit; a prompt whose images are still
        being encoded is passed over (the ones behind it may go first), and every waiting
        prompt's images are asked for, so they are ready by the time it fits."""
        cap = self.config.max_running_requests
        full = False
        for seq in admission_order(self.waiting, self.config.schedule_policy, self.cache):
            if self.ahead is not None and seq.images and self.ahead.waits(seq):
                continue
            if full:
                if self.ahead is None:
                    return
                continue  # only to ask for the images of the prompts behind
            full = len(self.running) >= cap or not self._admit(seq, budget)

    def _admit(self, seq: Sequence, budget: StepBudget, use_cache: bool = True) -> bool:
        """Admit `seq` with its first chunk if budget and memory allow; False otherwise."""
        alloc = self.allocator
        if self.cross_images is not None and not self.cross_images.fits(seq):
            return False  # its images' cross-attention state waits for free image slots
        prefix_slots, prefix_local, node = usable_prefix(
            self.cache, seq, use_cache, self.config.whole_images
        )
        whole = self.config.whole_images and bool(seq.images)
        prefix_len = len(prefix_slots)
        extend = seq.num_tokens - prefix_len
        n = budget.prefill_chunk(extend)
        if n == 0:
            return False
        if whole:
            n = whole_image_chunk(seq.images, prefix_len, n)
        self.cache.inc_lock(node)
        room = alloc.available + self.cache.evictable_size
        if self.local is not None:
            room = min(room, self.local.available + self.cache.evictable_local)
        room -= decode_reserve(len(self.running), alloc.page_size)
        if alloc.slots_needed(prefix_len, n) > room:
            # The prefix is page-aligned, so m tokens take ceil(m / page) pages.
            n = room - room % alloc.page_size if budget.chunking else 0
            if whole:
                n = whole_image_chunk(seq.images, prefix_len, n, extend=False)
            if n <= 0:
                self.cache.dec_lock(node)
                if prefix_len and not self.running:
                    # The hit's locked path may hold more local slots than the sequence
                    # needs; alone, it is admitted without it (each sequence alone fits).
                    return self._admit(seq, budget, use_cache=False)
                return False
        self._evict_for(alloc.slots_needed(prefix_len, n))
        got, got_local = self._extend(prefix_slots, prefix_local, n)
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.status = SeqStatus.RUNNING
        if self.cross_images is not None:
            self.cross_images.take(seq)
        seq.slots = prefix_slots + got
        seq.local_slots = prefix_local + got_local
        seq.local_cursor = prefix_len
        seq.prefix_len = prefix_len
        seq.node = node
        seq.admitted_at = self._admissions
        self._admissions += 1
        seq.retracted = False
        if seq.computing_prompt_logprobs:  # entries past the hit are computed again
            seq.prompt_logprobs = (seq.prompt_logprobs or [None])[: prefix_len + 1]
        if seq.cached_tokens is None:
            seq.cached_tokens = prefix_len
            self.cache_hit_tokens += prefix_len
        budget.take(n)
        self.plans.add_chunk(seq, got, n == extend, got_local)
        return True

    # ------------------------------------------------------------------ results

    def process_result(self, result: StepResult) -> None:
        """Append each sampled token, check stop conditions, emit one SeqOutput per token;
        the first output of a sequence computing prompt logprobs carries them all."""
        self.images_encoded += result.images_encoded
        self.image_cache_bytes = result.image_cache_bytes
        if self.ahead is not None:
            self.ahead.done(result.images_ready)
        self.cross_kv_computed += result.cross_kv_computed
        for key, entries in result.prompt_logprobs.items():
            if (seq := self.seqs.get(key)) is not None and seq.computing_prompt_logprobs:
                seq.prompt_logprobs.extend(entries)  # running: retractions wait for results
        for key, token, lp in zip(result.keys, result.token_ids, result.logprobs, strict=True):
            seq = self.seqs.get(key)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue  # aborted since the plan went out
            prompt_lps = seq.take_prompt_logprobs()
            seq.output_ids.append(token)
            self.generated_tokens += 1
            reason, matched = finish_reason(seq, token, self.config)
            self.outputs.append(seq_output(seq, [token], lp, reason, matched, prompt_lps))
            if reason is not None:
                self._release(seq)
                self.running.remove(seq)
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = reason
                del self.seqs[key]

    # ------------------------------------------------------------------ memory

    def _release(self, seq: Sequence) -> None:
        """Give up `seq`'s slots: its computed tokens (page-aligned) go into the tree, the
        duplicates of what the tree already held and the partial last page are freed, its
        lock is dropped, and the workers are told to forget it."""
        n = seq.num_computed
        aligned = n - n % self.config.page_size
        local = None
        if self.local is not None:
            self.local.trim(seq)  # the tree takes only local K/V a hit can read
            local = seq.local_slots[:aligned]
        present = self.cache.insert(seq.cache_key[:aligned], seq.slots[:aligned], local)
        # Slots [prefix_len, present) duplicate the tree's; [aligned, n) is a partial page.
        self.allocator.free(seq.slots[seq.prefix_len : present] + seq.slots[aligned:])
        if self.local is not None:
            self.local.free(seq.local_slots[seq.prefix_len : present] + seq.local_slots[aligned:])
        if seq.node is not None:
            self.cache.dec_lock(seq.node)
        if self.cross_images is not None:
            self.cross_images.release(seq)  # the slots' K/V stay until given to another image
        seq.node = None
        seq.slots = []
        seq.local_slots = []
        seq.local_cursor = 0
        seq.prefix_len = 0
        self.plans.drop(seq)

    def _retract(self, seq: Sequence) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.retracted = True
        self.waiting.insert(0, seq)
        self.num_retractions += 1
        log.info(
            "request %s: sequence %s retracted (out of KV slots) after %d output tokens",
            seq.rid, seq.key, len(seq.output_ids),
        )  # fmt: skip

    @property
    def _available(self) -> int:
        """Free slots of every pool (an allocation takes as many from each)."""
        free = self.allocator.available
        return min(free, self.local.available) if self.local else free

    def _evict_for(self, need: int) -> None:
        """Evict the tree until `need` slots are free in every pool (or nothing is left)."""
        short = need - self.allocator.available
        short_local = need - self.local.available if self.local else 0
        if short > 0 or short_local > 0:
            freed, freed_local = self.cache.evict_pages(max(short, 0), max(short_local, 0))
            self.allocator.free(freed)
            if self.local is not None:
                self.local.free(freed_local)

    def _extend(
        self, held: list[int], held_local: list[int], n: int
    ) -> tuple[list[int], list[int]]:
        """n more slots of each pool after `held` (the caller made room)."""
        got = self.allocator.extend(held, n)
        got_local = self.local.extend(held_local, n) if self.local else []
        assert got is not None and got_local is not None
        return got, got_local

    # ------------------------------------------------------------------ helpers

    def _reject(self, rid: str, message: str) -> None:
        log.warning("%s", message)
        self.to_server.append(RequestError(rid=rid, message=message, status=400))
