"""HTTP routes: OpenAI chat/completions/models, SGLang's /generate, health and info.

The server never tokenizes: it validates, hands a GenerateRequest to the tokenizer service and
streams back the TextDeltas (server/requests.py). Errors are OpenAI error objects with a 4xx
status (5xx only when the backend itself is gone).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fovea.common import metrics as fovea_metrics
from fovea.common.config import ServerArgs
from fovea.common.ipc import Addresses
from fovea.common.messages import GenerateRequest, TextDelta
from fovea.common.model_config import ModelInfo
from fovea.common.sampling import SamplingError, SamplingParams, validate_sampling
from fovea.server import responses as R
from fovea.server.drain import Drain, DrainingServer, install_drain
from fovea.server.guards import ApiKeyAuth, BodyLimit, RefuseWhileDraining
from fovea.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateReqInput,
    native_sampling,
    new_id,
)
from fovea.server.requests import RequestFailed, RequestManager

log = logging.getLogger("fovea.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# Token ids travel as msgpack ints (64 bits); the tokenizer checks them against the vocabulary.
_INT64 = 2**63
_probe = msgspec.msgpack.Encoder()


def _check_token_ids(prompts: list[str | list[int]]) -> None:
    for prompt in prompts:
        if not isinstance(prompt, str):
            for t in prompt:
                if not -_INT64 <= t < _INT64:
                    raise APIError(400, f"token id {t} is out of range", "prompt")


def _check_encodable(req: GenerateRequest) -> None:
    """What msgpack cannot carry to the tokenizer: a lone UTF-16 surrogate (a JSON escape such
    as \\ud800 parses to one) or an integer past 64 bits in chat_template_kwargs. Found by
    encoding once here, so the request is refused before it is in flight."""
    try:
        _probe.encode(req)
    except UnicodeEncodeError as e:
        bad = ascii(e.object[e.start : e.end])
        raise APIError(
            400, f"the request holds text that is not valid Unicode: {e.reason} ({bad})"
        ) from None
    except (OverflowError, msgspec.EncodeError) as e:
        raise APIError(400, f"the request holds a value that cannot be used: {e}") from None


def create_app(
    args: ServerArgs, model: ModelInfo, addrs: Addresses, drain: Drain | None = None
) -> FastAPI:
    state: dict[str, RequestManager] = {}
    drain = drain or Drain(args.shutdown_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mgr = RequestManager(addrs, log_requests=args.log_requests)
        mgr.start()
        state["mgr"] = mgr
        yield
        mgr.close()

    app = FastAPI(title="Fovea", lifespan=lifespan)

    def manager() -> RequestManager:
        return state["mgr"]

    def _checked(sampling: SamplingParams) -> SamplingParams:
        try:
            validate_sampling(sampling, model.vocab_size, model.context_length)
        except SamplingError as e:
            raise APIError(400, str(e), e.param) from e
        return sampling

    def generate_checked(req: GenerateRequest) -> AsyncIterator[TextDelta]:
        _check_encodable(req)
        return manager().generate(req)

    async def until_gone(request: Request, work: Awaitable[Any]) -> Response:
        """`work`'s result as JSON; 499 if the client leaves first, and then `work` is
        cancelled: closing its request iterators aborts the requests and frees their KV."""
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
        return R.json(task.result())

    app.state.inflight = lambda: manager().num_inflight if "mgr" in state else 0
    app.state.cut_off = lambda message: manager().fail_all(message) if "mgr" in state else None

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Response:
        return R.error(e.status, e.message, e.param)

    @app.exception_handler(RequestFailed)
    async def _failed(request: Request, e: RequestFailed) -> Response:
        return R.error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        return R.error(400, *R.describe_validation(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        message = str(e.detail)
        if e.status_code in (404, 405):  # say which route: "Not Found" alone does not help
            message = f"{message}: {request.method} {request.url.path}"
        return R.error(e.status_code, message)

    # Added last, so outermost: the key is checked before the body is read, then the size,
    # then whether the server drains.
    app.add_middleware(RefuseWhileDraining, drain=drain)
    app.add_middleware(BodyLimit, max_bytes=args.max_request_bytes)
    if args.api_key:
        app.add_middleware(ApiKeyAuth, api_key=args.api_key)

    def check_model(name: str | None) -> None:
        if name not in (None, "", "default", args.model_name, args.model_path):
            raise APIError(404, f"The model `{name}` does not exist.", "model")

    async def run(
        request: Request, req: GenerateRequest, stream: bool, render: R.Renderer
    ) -> Response:
        deltas = generate_checked(req)
        if stream:
            # Wait for the first delta before answering 200, so a refused request (prompt too
            # long, bad template) still gets its 4xx status rather than an error event.
            first = await anext(deltas)
            return StreamingResponse(
                render.stream(_prepend(first, deltas)), media_type="text/event-stream"
            )
        return await until_gone(request, render.collect(deltas))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        sampling = _checked(body.sampling())
        req = GenerateRequest(
            rid=new_id("chatcmpl"),
            sampling=sampling,
            messages=[m.to_message() for m in body.messages],
            add_generation_prompt=body.add_generation_prompt,
            chat_template_kwargs=body.chat_template_kwargs or {},
        )
        render = R.ChatRenderer(req.rid, args.model_name, sampling, body.include_usage)
        return await run(request, req, body.stream, render)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        prompts = R.split_prompts(body.prompt)
        _check_token_ids(prompts)
        if len(prompts) != 1:
            if body.stream:
                raise APIError(400, "streaming supports one prompt per request", "prompt")
            return await _batch(request, body, prompts)
        sampling = _checked(body.sampling())
        req = R.prompt_request(new_id("cmpl"), prompts[0], sampling)
        render = R.CompletionRenderer(req.rid, args.model_name, sampling, body.include_usage)
        return await run(request, req, body.stream, render)

    async def _batch(request: Request, body: CompletionRequest, prompts: list[Any]) -> Response:
        sampling = _checked(body.sampling())
        rid = new_id("cmpl")
        renders = [R.CompletionRenderer(rid, args.model_name, sampling, False) for _ in prompts]
        reqs = [R.prompt_request(f"{rid}-{i}", p, sampling) for i, p in enumerate(prompts)]
        for req in reqs:  # all checked before any is sent
            _check_encodable(req)

        async def collect_all() -> Any:
            results = await asyncio.gather(
                *(r.collect(manager().generate(q)) for r, q in zip(renders, reqs, strict=True))
            )
            return R.merge_completions(rid, args.model_name, results, sampling.n)

        return await until_gone(request, collect_all())

    @app.post("/generate")
    async def generate(body: GenerateReqInput, request: Request) -> Response:
        if (body.text is None) == (body.input_ids is None):
            raise APIError(400, "give exactly one of text and input_ids", "text")
        try:
            sampling = native_sampling(
                body.sampling_params, body.return_logprob, body.top_logprobs_num
            )
        except KeyError as e:
            raise APIError(
                400, f"unknown sampling parameter {e.args[0]!r}", "sampling_params"
            ) from e
        except msgspec.ValidationError as e:
            raise APIError(400, f"sampling_params: {e}", "sampling_params") from e
        sampling = _checked(sampling)
        prompts = R.split_prompts(body.text if body.text is not None else body.input_ids)
        _check_token_ids(prompts)
        try:
            images = R.images_per_prompt(body.image_data, len(prompts))
        except ValueError as e:
            raise APIError(400, str(e), "image_data") from e
        reqs = [
            R.prompt_request(new_id("gen"), p, sampling, imgs)
            for p, imgs in zip(prompts, images, strict=True)
        ]
        if len(reqs) == 1:
            return await run(request, reqs[0], body.stream, R.NativeRenderer(reqs[0].rid))
        if body.stream:
            raise APIError(400, "streaming supports one prompt per request", "text")
        for req in reqs:  # all checked before any is sent
            _check_encodable(req)

        async def collect_all() -> Any:
            outs = await asyncio.gather(
                *(R.NativeRenderer(r.rid).collect(manager().generate(r)) for r in reqs)
            )
            return [o for out in outs for o in (out if isinstance(out, list) else [out])]

        return await until_gone(request, collect_all())

    @app.get("/v1/models")
    async def models() -> Response:
        return R.json(R.model_list(args, model))

    if args.enable_metrics:

        @app.get("/metrics")
        async def metrics() -> Response:
            body, content_type = await asyncio.to_thread(fovea_metrics.render)
            return Response(body, media_type=content_type)

    # /health is 503 until one generation went through end to end (the launcher's warm-up
    # does one before it reports ready), so a load balancer never routes to a cold server.
    warm = {"done": False}

    @app.get("/health")
    async def health() -> Response:
        if manager().failed:
            return R.error(503, manager().failed or "unavailable")
        if not warm["done"]:
            return R.error(503, "starting: no generation has completed yet")
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate(request: Request) -> Response:
        req = GenerateRequest(
            rid=new_id("health"),
            sampling=SamplingParams(max_new_tokens=1, temperature=0.0),
            input_ids=[0],
        )
        try:
            await asyncio.wait_for(R.NativeRenderer(req.rid).collect(manager().generate(req)), 60)
        except (RequestFailed, TimeoutError) as e:
            return R.error(503, f"generation failed: {e}")
        warm["done"] = True
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def model_info() -> Response:
        return R.json(R.model_info(args, model))

    @app.get("/get_server_info")
    async def server_info() -> Response:
        stats = await manager().stats()
        info: dict[str, Any] = {"version": R.VERSION, "args": R.public_args(args)}
        info["scheduler"] = msgspec.to_builtins(stats)
        info["inflight_requests"] = manager().num_inflight
        return R.json(info)

    return app


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


def run_http_server(args: ServerArgs, addrs: Addresses, model: ModelInfo) -> None:
    """Process entry of the HTTP server."""
    import uvicorn

    from fovea.common.process import report_ready, setup_process

    log = setup_process("http", args.log_level, args.log_format)
    drain = Drain(args.shutdown_timeout)
    app = create_app(args, model, addrs, drain)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level if args.log_level != "info" else "warning",
        timeout_keep_alive=30,
        # Our drain already waited for requests in flight (server/drain.py).
        timeout_graceful_shutdown=2,
    )
    server = DrainingServer(config)

    async def serve() -> None:
        install_drain(server, drain, app.state.inflight, app.state.cut_off)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.05)
        if server.started:
            import zmq

            log.info(
                "role=http pid=%d listen=http://%s:%d sockets: in=%s tokenizer=%s scheduler=%s",
                os.getpid(),
                args.host,
                args.port,
                addrs.server_in,
                addrs.tokenizer_in,
                addrs.scheduler_in,
            )
            report_ready(zmq.Context.instance(), addrs, "http")
        await task
        if not server.started:
            raise SystemExit(1)

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())
