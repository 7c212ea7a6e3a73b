"""What every HTTP route reads: the server's arguments, the model, the request manager, and the
few steps all generating routes share (check, send, answer or stream). One per app, in
`app.state.ctx`; routes take it as a parameter `ctx: Ctx`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import Response, StreamingResponse

from fovea.common.config import ServerArgs
from fovea.common.messages import GenerateRequest, TextDelta
from fovea.common.model_config import ModelInfo
from fovea.common.sampling import SamplingError, SamplingParams, validate_sampling
from fovea.server import responses
from fovea.server.drain import Drain
from fovea.server.request_build import APIError, check_encodable, merge_streams
from fovea.server.requests import RequestManager


class ServerContext:
    def __init__(self, args: ServerArgs, model: ModelInfo, drain: Drain) -> None:
        self.args, self.model, self.drain = args, model, drain
        self._manager: RequestManager | None = None
        # /health is 503 until one generation went through end to end (the launcher's warm-up
        # does one before it reports ready), so a load balancer never routes to a cold server.
        self.warm = False

    @property
    def manager(self) -> RequestManager:
        assert self._manager is not None, "used outside the app's lifespan"
        return self._manager

    def attach(self, manager: RequestManager | None) -> None:
        self._manager = manager

    @property
    def inflight(self) -> int:
        return self._manager.num_inflight if self._manager is not None else 0

    def cut_off(self, message: str) -> None:
        if self._manager is not None:
            self._manager.fail_all(message)

    def check_model(self, name: str | None) -> None:
        """The served name and the local path it resolved to both name this model; no name
        (also SGLang's router's "unknown", which it writes where the client gave none) means it."""
        unnamed = (None, "", "default", "unknown")
        if name not in (*unnamed, self.args.model_name, self.args.model_path):
            raise APIError(404, f"The model `{name}` does not exist.", "model")

    def checked(self, sampling: SamplingParams) -> SamplingParams:
        try:
            validate_sampling(sampling, self.model.vocab_size, self.model.context_length)
        except SamplingError as e:
            raise APIError(400, str(e), e.param) from e
        return sampling

    def generate(self, reqs: list[GenerateRequest]) -> AsyncIterator[TextDelta]:
        """One request's deltas, or several requests' merged (request p's sequence i as index
        p * n + i). Every request is checked before any is sent."""
        for req in reqs:
            check_encodable(req)
        if len(reqs) == 1:
            return self.manager.generate(reqs[0])
        n = reqs[0].sampling.n
        return merge_streams([self.manager.generate(r) for r in reqs], n)

    async def run(
        self,
        request: Request,
        reqs: list[GenerateRequest],
        stream: bool,
        render: responses.Renderer,
    ) -> Response:
        deltas = self.generate(reqs)
        if stream:
            # Wait for the first delta before answering 200, so a refused request (prompt too
            # long, bad template) still gets its 4xx status rather than an error event.
            first = await anext(deltas)
            return StreamingResponse(
                render.stream(_prepend(first, deltas)), media_type="text/event-stream"
            )
        return await until_gone(request, render.collect(deltas))


async def context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ServerContext, Depends(context)]  # a route's parameter: `ctx: Ctx`


async def until_gone(request: Request, work: Awaitable[Any]) -> Response:
    """`work`'s result as JSON; 499 if the client leaves first, and then `work` is cancelled:
    closing its request iterators aborts the requests and frees their KV."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    # cancel() only asks: the task is not done (nor cancelled()) until its next step.
    if not task.done():
        return Response(status_code=499)
    return responses.json(task.result())


async def _prepend(first: TextDelta, rest: AsyncIterator[TextDelta]) -> AsyncIterator[TextDelta]:
    yield first
    async for d in rest:
        yield d


async def _wait_disconnect(request: Request) -> None:
    # The body is already read: the next ASGI message is the disconnect.
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return
