"""The local (sliding-window) layers' slot pool: what each sequence may give back early.

Models with sliding-window layers (Gemma 3) keep two pools in the workers: the global layers'
K/V for every token (the main KVAllocator) and the local layers' K/V in a second pool, whose
slots this class hands out (its own KVAllocator, same page size and slot-id convention). Every
token of a running sequence has one slot in each; `Sequence.local_slots[i]` is 0 once token
i's local page went back to this pool (0 is in the scratch page, never handed out).

What may go (`trim`): a query at position q of a local layer reads positions > q - window.
A sequence that has computed p tokens only ever queries positions >= p, and a prefix hit on
it ends at most at p rounded down to a page (A), which reads [A - window + 1, A). So the
pages lying wholly below `p - p % page - window + 1` are read by no one again, except the
window of the prompt's own hit point (`prompt_anchor`): a later request with the same prompt
matches up to its last token but one, so those pages are kept for the tree. Only the
sequence's own pages (positions >= prefix_len) are freed; a matched prefix's belong to the tree.

Bound: a running sequence holds at most its window, the prompt anchor's window, its current
chunk and a few partial pages (`max_held`); the scheduler refuses a request whose bound
exceeds the pool, so each sequence alone fits, as with the global pool.
"""

from __future__ import annotations

from collections.abc import Iterable

from fovea.common.messages import TokenizedRequest
from fovea.scheduler.kv_allocator import KVAllocator
from fovea.scheduler.policy import SchedulerConfig
from fovea.scheduler.request import Sequence


class WindowSlots:
    def __init__(self, num_slots: int, page_size: int, window: int) -> None:
        if window < 1:
            raise ValueError(f"sliding window must be >= 1, got {window}")
        self.allocator = KVAllocator(num_slots, page_size)
        self.page_size = page_size
        self.window = window
        self.freed_early = 0  # local slots given back by trim since start (stats and tests)

    @property
    def total_slots(self) -> int:
        return self.allocator.total_slots

    @property
    def available(self) -> int:
        return self.allocator.available

    def extend(self, held: list[int], n: int) -> list[int] | None:
        return self.allocator.extend(held, n)

    def free(self, slots: Iterable[int]) -> None:
        """Return the pages of the non-zero slots among `slots`."""
        self.allocator.free(s for s in slots if s)

    def prompt_anchor(self, seq: Sequence) -> int:
        """Where a hit on `seq`'s prompt, asked again, would end: its last token but one,
        rounded down to a page."""
        a = len(seq.prompt_ids) - 1
        return a - a % self.page_size

    def trim(self, seq: Sequence) -> int:
        """Free `seq`'s own local pages that no later query and no hit can read (see the
        module docstring); returns how many slots went back."""
        ps, w = self.page_size, self.window
        p = seq.num_computed
        dead_end = p - p % ps - w + 1  # positions below it are read by no one again
        anchor = self.prompt_anchor(seq)
        keep_lo, keep_hi = anchor - w + 1, anchor  # the anchor's window
        freed = 0
        c = seq.local_cursor
        while c + ps <= dead_end:
            if not (c < keep_hi and c + ps > keep_lo):
                self.allocator.free(seq.local_slots[c : c + ps])
                seq.local_slots[c : c + ps] = [0] * ps
                freed += ps
            c += ps
        seq.local_cursor = c
        self.freed_early += freed
        return freed

    def request_need(self, req: TokenizedRequest, need: int, config: SchedulerConfig) -> int:
        """Local slots a request of `need` slots (prompt + max new tokens) holds at most."""
        chunk = (
            len(req.input_ids) if config.chunked_prefill_size == -1 else config.chunked_prefill_size
        )
        if config.whole_images:  # an image is one chunk, past the cap
            chunk = max([chunk, *(img.num_tokens for img in req.images)])
        return self.max_held(need, chunk)

    def max_held(self, num_tokens: int, chunk: int) -> int:
        """The most local slots one sequence of `num_tokens` tokens holds at once when its
        prefill chunks are at most `chunk` tokens: its window and the prompt anchor's, the
        chunk, and the partial pages around each."""
        return min(num_tokens, chunk + 2 * self.window + 4 * self.page_size)
