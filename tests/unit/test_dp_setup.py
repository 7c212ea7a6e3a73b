"""Data-parallel set-up without processes: each replica's CPUs, its sockets and role names,
the flags' checks, and the server's sum of the replicas' stats."""

from __future__ import annotations

import pytest

from fovea.common.config import ServerArgs, check_args
from fovea.common.ipc import Addresses
from fovea.common.messages import SchedulerStats
from fovea.server.requests import merge_stats
from fovea.worker.cpu_threads import auto_threads, parse_cpulist, replica_cpus


def test_parse_cpulist() -> None:
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpulist("") == []


def test_replica_cpus_split_the_usable_cpus() -> None:
    one_node = [list(range(8))]
    assert [replica_cpus(list(range(8)), one_node, d, 2) for d in range(2)] == [
        {0, 1, 2, 3},
        {4, 5, 6, 7},
    ]
    assert [replica_cpus(list(range(8)), one_node, d, 3) for d in range(3)] == [
        {0, 1},
        {2, 3, 4},
        {5, 6, 7},
    ]
    # Two CPUs, two replicas (this machine): one each, and one thread each by the auto rule.
    assert [replica_cpus([0, 1], [[0, 1]], d, 2) for d in range(2)] == [{0}, {1}]
    assert auto_threads(1) == 1
    # Fewer CPUs than replicas: they share, round robin.
    assert [replica_cpus([3], [[3]], d, 2) for d in range(2)] == [{3}, {3}]


def test_replica_cpus_follow_numa_nodes() -> None:
    nodes = [[0, 1, 2, 3], [4, 5, 6, 7]]
    usable = list(range(8))
    assert [replica_cpus(usable, nodes, d, 2) for d in range(2)] == [{0, 1, 2, 3}, {4, 5, 6, 7}]
    # Four nodes, two replicas: two whole nodes each.
    four = [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [replica_cpus(usable, four, d, 2) for d in range(2)] == [{0, 1, 4, 5}, {2, 3, 6, 7}]
    # Fewer nodes than replicas: shares taken in node order; an affinity mask is respected.
    assert [replica_cpus([1, 2, 5, 6, 7], nodes, d, 4) for d in range(4)] == [
        {1},
        {2},
        {5},
        {6, 7},
    ]


def test_replica_addresses_and_roles() -> None:
    one = Addresses.local(1)
    assert one.schedulers == [one.scheduler_in] and one.replica(0) == one
    assert one.role("scheduler") == "scheduler"
    two = Addresses.local(2)
    r1 = two.replica(1)
    assert r1.dp_rank == 1 and r1.scheduler_in == two.schedulers[1]
    assert r1.scheduler_in.endswith("/scheduler_in_dp1")
    assert r1.worker_plan == two.worker_plan + "_dp1"
    assert r1.worker_result == two.worker_result + "_dp1"
    assert (r1.server_in, r1.tokenizer_in, r1.launcher_in) == (
        two.server_in,
        two.tokenizer_in,
        two.launcher_in,
    )
    assert two.replica(0).worker_plan == two.worker_plan + "_dp0"
    assert r1.replica(0) == two.replica(0)
    assert (r1.role("scheduler"), r1.role("worker0")) == ("scheduler-dp1", "worker0-dp1")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"dp_size": 0}, "--dp-size must be >= 1, got 0"),
        (
            {"dp_size": 2, "nnodes": 2, "dist_init_addr": "h:5000"},
            "--dp-size > 1 runs its replicas on one node; across nodes, run one server per "
            "replica behind a router (deploy/README.md)",
        ),
        ({"dp_cache_threshold": 1.5}, "--dp-cache-threshold must be in [0, 1], got 1.5"),
        (
            {"dp_balance_rel_threshold": 0.5},
            "--dp-balance-abs-threshold must be >= 0 and --dp-balance-rel-threshold >= 1",
        ),
    ],
)
def test_dp_flags_checked(kw: dict[str, object], message: str) -> None:
    assert check_args(ServerArgs(model_path="m", **kw)) == message  # type: ignore[arg-type]


def stats(dp_rank: int, free: int, tree: int, flushed: bool) -> SchedulerStats:
    return SchedulerStats(
        query_id="q", total_slots=100, free_slots=free, tree_slots=tree, evictable_slots=tree,
        running=0, waiting=0, steps=3 + dp_rank, cache_hit_tokens=5, prompt_tokens=9,
        generated_tokens=4, flushed=flushed, dp_rank=dp_rank,
    )  # fmt: skip


def test_merge_stats_sums_the_replicas() -> None:
    merged = merge_stats([stats(0, 90, 10, True), stats(1, 70, 30, False)])
    assert merged == SchedulerStats(
        query_id="q", total_slots=200, free_slots=160, tree_slots=40, evictable_slots=40,
        running=0, waiting=0, steps=7, cache_hit_tokens=10, prompt_tokens=18,
        generated_tokens=8, flushed=False, dp_rank=0,
    )  # fmt: skip
    assert merge_stats([stats(0, 90, 10, True)]).flushed
