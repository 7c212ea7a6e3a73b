"""Fixtures every end-to-end module shares: an openai client of the module's `server` fixture
(each module builds its own with server_harness.serve_module) and a loopback image host."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from server_harness import Server
from vision_helpers import ImageHost


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.openai_client()


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    h = ImageHost()
    yield h
    h.httpd.shutdown()
