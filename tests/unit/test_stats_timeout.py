"""A state query no scheduler answers ends in a 503 to retry, not an uncaught TimeoutError
(the HTTP routes /get_server_info, /get_load and /flush_cache would answer 500)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from fovea.common.ipc import Addresses
from fovea.server.requests import RequestFailed, RequestManager


def test_an_unanswered_state_query_is_a_503() -> None:
    addrs = Addresses.local()

    async def query() -> None:
        manager = RequestManager(addrs)
        try:
            await manager.replica_stats(timeout=0.2)
        finally:
            manager.close()

    try:
        with pytest.raises(RequestFailed) as e:
            asyncio.run(query())
    finally:
        if addrs.ipc_dir:
            shutil.rmtree(addrs.ipc_dir, ignore_errors=True)
    assert (e.value.status, e.value.message) == (
        503,
        "the scheduler did not answer within 0.2 s; try again",
    )
