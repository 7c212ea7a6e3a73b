"""The HTTP process: uvicorn serving the app of server/app.py, with the drain on SIGTERM
(server/drain.py); it reports ready to the launcher once the port listens.
"""

from __future__ import annotations

import asyncio
import os

from fovea.common.config import ServerArgs
from fovea.common.ipc import Addresses
from fovea.common.model_config import ModelInfo
from fovea.server.app import create_app
from fovea.server.context import ServerContext
from fovea.server.drain import Drain, DrainingServer, install_drain


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
        ctx: ServerContext = app.state.ctx
        install_drain(server, drain, lambda: ctx.inflight, ctx.cut_off)
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
