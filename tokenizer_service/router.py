"""Which replica runs a request (--dp-size > 1): the one whose prefix cache holds the longest
prefix of its tokens and images, else the least loaded; sglang-router's cache_aware policy,
with the routing key the schedulers' own (image placeholders as image-hash values).

The router keeps, per replica, a copy of its radix tree (keys only: the slot ids are the keys
themselves) that replays the replica's TreeEvents (inserts and evictions) in the order the
scheduler made them, so it holds exactly the scheduler's keys as of the last ReplicaState. The
load of a replica is the waiting + running tokens it last reported, plus the prompt tokens of
the requests sent to it that it had not taken in yet (counted on both sides), so a burst of
requests sees its own earlier decisions without waiting for a report.

Policy (sglang-router's cache_aware; loads in tokens where it counts requests):
1. Imbalance: if max(load) - min(load) > abs_threshold and max(load) > rel_threshold *
   min(load), the least loaded replica ("imbalance").
2. Else the replica with the longest cached prefix of the request's key (ties: the least
   loaded of them) when that prefix covers more than cache_threshold of the key ("prefix").
3. Else the least loaded ("load"); among equally loaded ones the smallest tree (sglang-router's
   choice here: the most cache room, and idle replicas take different prefixes in turn).
Remaining ties go to the lowest dp rank.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from fovea.common import metrics as fovea_metrics
from fovea.common.messages import ReplicaState, TokenizedRequest
from fovea.scheduler.cross_images import salted_key
from fovea.scheduler.radix_cache import RadixCache
from fovea.scheduler.request import radix_key


@dataclass(frozen=True)
class RoutingPolicy:
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 4096
    balance_rel_threshold: float = 1.5


class Decision(NamedTuple):
    dp_rank: int
    reason: str  # "prefix", "load", "imbalance" or "pinned"
    matched: int  # tokens of the key cached on dp_rank's tree (0 unless "prefix")


@dataclass
class ReplicaView:
    tree: RadixCache
    reported_load: int = 0  # waiting + running tokens, as of `reported_seen`
    reported_seen: int = 0  # TokenizedRequests the replica had taken in
    sent: int = 0  # TokenizedRequests sent to it
    # (count of sent after it, its prompt tokens) of the requests it has not taken in yet.
    in_transit: deque[tuple[int, int]] = field(default_factory=deque)

    @property
    def load(self) -> int:
        return self.reported_load + sum(tokens for _, tokens in self.in_transit)


class Router:
    def __init__(
        self,
        dp_size: int,
        page_size: int,
        policy: RoutingPolicy,
        salted: bool = False,
    ) -> None:
        """`salted`: the schedulers salt keys with the request's image set (cross-attention
        models, scheduler/cross_images.py), so the router does too."""
        self.policy = policy
        self.salted = salted
        self.replicas = [ReplicaView(RadixCache(page_size)) for _ in range(dp_size)]

    def key(self, req: TokenizedRequest) -> list[int]:
        """The request's radix key as its scheduler will compute it (Sequence.prompt_key)."""
        key = radix_key(req.input_ids, req.images)
        return salted_key(key, req.images) if self.salted and req.images else key

    def loads(self) -> list[int]:
        return [r.load for r in self.replicas]

    def choose(self, key: list[int]) -> Decision:
        p = self.policy
        loads = self.loads()
        lo, hi = min(loads), max(loads)
        least = min(range(len(loads)), key=lambda d: (loads[d], self.replicas[d].tree.total_size))
        if hi - lo > p.balance_abs_threshold and hi > p.balance_rel_threshold * lo:
            return Decision(least, "imbalance", 0)
        # As the scheduler matches: all but the last token, whose logits give the next one.
        matched = [len(r.tree.match_prefix(key[:-1])[0]) for r in self.replicas]
        best = max(matched)
        if key and best / len(key) > p.cache_threshold:
            ranks = [d for d, m in enumerate(matched) if m == best]
            return Decision(min(ranks, key=lambda d: (loads[d], d)), "prefix", best)
        return Decision(least, "load", 0)

    def route(self, reqs: list[TokenizedRequest], pinned: int | None = None) -> int:
        """The replica for one request's sequences (all go to one); counts them as sent."""
        m = fovea_metrics.get()
        t0 = time.perf_counter()
        if pinned is not None:
            decision = Decision(pinned, "pinned", 0)
        else:
            decision = self.choose(self.key(reqs[0]))
            if m is not None:
                m.dp_route.observe(time.perf_counter() - t0)
        replica = self.replicas[decision.dp_rank]
        for req in reqs:
            replica.sent += 1
            replica.in_transit.append((replica.sent, len(req.input_ids)))
        if m is not None:
            m.dp_routed.labels(str(decision.dp_rank), decision.reason).inc()
        return decision.dp_rank

    def apply(self, state: ReplicaState) -> None:
        """Replay a replica's tree events and take in its load."""
        replica = self.replicas[state.dp_rank]
        for ev in state.events:
            if ev.removed:
                replica.tree.remove_suffix(ev.key, ev.removed)
            else:
                replica.tree.insert(ev.key, ev.key)
        replica.reported_load = state.load_tokens
        replica.reported_seen = state.seen
        while replica.in_transit and replica.in_transit[0][0] <= state.seen:
            replica.in_transit.popleft()
