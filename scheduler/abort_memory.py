"""Aborts that arrived before the sequences they name: the tokenizer may still be sending a
request's sequences when the server aborts it. Each is remembered for ABORT_MEMORY_S, at most
ABORT_MEMORY_MAX at once (the oldest go first)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

ABORT_MEMORY_S = 60.0  # how long an abort for a not-yet-seen request is remembered
ABORT_MEMORY_MAX = 10_000


class AbortMemory:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # (rid, index or None for every index) -> expiry time; oldest first.
        self._expiry: OrderedDict[tuple[str, int | None], float] = OrderedDict()

    def remember(self, rid: str, index: int | None) -> None:
        now = self._clock()
        while self._expiry and (
            next(iter(self._expiry.values())) <= now or len(self._expiry) >= ABORT_MEMORY_MAX
        ):
            self._expiry.popitem(last=False)
        self._expiry[(rid, index)] = now + ABORT_MEMORY_S
        self._expiry.move_to_end((rid, index))

    def holds(self, rid: str, index: int) -> bool:
        """Sequence (rid, index) was aborted (by index or as a whole) and not long ago."""
        now = self._clock()
        for k in ((rid, None), (rid, index)):
            expiry = self._expiry.get(k)
            if expiry is not None and expiry > now:
                return True
        return False
