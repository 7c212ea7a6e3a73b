"""The HTTP process's FastAPI app, assembled from its routers (the process: server/main.py).

The server never tokenizes: it validates, hands GenerateRequests to the tokenizer service and
streams back the TextDeltas (server/requests.py). Routes: server/openai_routes.py (OpenAI) and
server/native_routes.py (SGLang's native routes, health, info, metrics); both read one
ServerContext (server/context.py). Errors are OpenAI error objects with a 4xx status (5xx only
when the backend itself is gone).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fovea.common.config import ServerArgs
from fovea.common.ipc import Addresses
from fovea.common.model_config import ModelInfo
from fovea.server import native_routes, openai_routes, responses
from fovea.server.context import ServerContext
from fovea.server.drain import Drain
from fovea.server.guards import ApiKeyAuth, BodyLimit, JSONBody, RefuseWhileDraining
from fovea.server.request_build import APIError
from fovea.server.requests import RequestFailed, RequestManager


def create_app(
    args: ServerArgs, model: ModelInfo, addrs: Addresses, drain: Drain | None = None
) -> FastAPI:
    ctx = ServerContext(args, model, drain or Drain(args.shutdown_timeout))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mgr = RequestManager(addrs, log_requests=args.log_requests)
        mgr.start()
        ctx.attach(mgr)
        yield
        ctx.attach(None)
        mgr.close()

    app = FastAPI(title="Fovea", lifespan=lifespan)
    app.state.ctx = ctx
    app.include_router(openai_routes.router)
    app.include_router(native_routes.router)
    if args.enable_metrics:
        app.include_router(native_routes.metrics_router)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> Response:
        return responses.error(e.status, e.message, e.param)

    @app.exception_handler(RequestFailed)
    async def _failed(request: Request, e: RequestFailed) -> Response:
        return responses.error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        return responses.error(400, *responses.describe_validation(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        message = str(e.detail)
        if e.status_code in (404, 405):  # say which route: "Not Found" alone does not help
            message = f"{message}: {request.method} {request.url.path}"
        return responses.error(e.status_code, message)

    # Added last, so outermost: the key is checked before the body is read, then the size,
    # then whether the server drains; a body is JSON whatever its Content-Type says.
    app.add_middleware(JSONBody)
    app.add_middleware(RefuseWhileDraining, drain=ctx.drain)
    app.add_middleware(BodyLimit, max_bytes=args.max_request_bytes)
    if args.api_key:
        app.add_middleware(ApiKeyAuth, api_key=args.api_key)
    return app
