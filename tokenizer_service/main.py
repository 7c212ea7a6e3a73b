"""The tokenizer service's process: one Tokenizer (tokenizer_service/tokenizer.py) between the
HTTP server, which sends it GenerateRequests, and the scheduler, which sends it TokenBatches.
Both arrive on one socket, in order, so a request's stop strings are registered before its
first tokens can arrive; requests with images or a grammar run as tasks on the event loop
meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from fovea.common.config import ServerArgs
from fovea.common.ipc import Addresses, AsyncReceiver, Sender
from fovea.common.messages import GenerateRequest, TokenBatch, ToTokenizer
from fovea.common.model_config import ModelInfo
from fovea.common.process import report_ready, setup_process
from fovea.tokenizer_service.chat_templates import ChatRenderer, ChatTemplateError
from fovea.tokenizer_service.grammar import GrammarChecker
from fovea.tokenizer_service.media import MediaLoader, MediaPolicy
from fovea.tokenizer_service.processors import load_processor
from fovea.tokenizer_service.tokenizer import Outbox, Tokenizer, load_hf_tokenizer
from fovea.tokenizer_service.video import VideoLimits

log = logging.getLogger("fovea.tokenizer")


def run_tokenizer_service(args: ServerArgs, addrs: Addresses, model: ModelInfo) -> None:
    """Process entry of the tokenizer service."""
    log = setup_process("tokenizer", args.log_level, args.log_format)
    hf = load_hf_tokenizer(args.tokenizer_path or model.path)
    processor = load_processor(model.path, _read_config(model.path), args.image_resize)
    try:
        image_token = (
            hf.convert_ids_to_tokens(processor.image_token_id) if processor is not None else None
        )
        video = processor.video if processor is not None else None
        video_token = hf.convert_ids_to_tokens(video.video_token_id) if video else None
        chat = ChatRenderer(hf, args.chat_template, processor is not None, image_token, video_token)
    except ChatTemplateError as e:
        log.error("%s", e)  # one line; the launcher sees this child exit and stops the server
        sys.exit(2)
    if not chat.available:
        log.warning("the model has no chat template: chat requests will be refused")
    if processor is not None and chat.image_refusal:
        log.warning("%s", chat.image_refusal)
    grammars = GrammarChecker(hf, model, args.grammar_compile_timeout)
    service = Tokenizer(hf, model, chat, processor, grammars=grammars)
    service.video_limits = VideoLimits.from_args(args)
    asyncio.run(_serve(args, addrs, service))


def _read_config(path: str) -> dict[str, Any]:
    """config.json of the model (the launcher already checked it); {} without one."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        return {}
    return cfg


async def _serve(args: ServerArgs, addrs: Addresses, service: Tokenizer) -> None:
    service.media = MediaLoader(MediaPolicy.from_args(args))
    # Sends are synchronous (they never block: no HWM); only the inbox waits on the loop.
    ctx: zmq.Context[Any] = zmq.Context()
    inbox: AsyncReceiver[ToTokenizer] = AsyncReceiver(
        ctx, addrs.tokenizer_in, ToTokenizer, bind=True
    )
    to_server = Sender(ctx, addrs.server_in, bind=False)
    to_scheduler = Sender(ctx, addrs.scheduler_in, bind=False)
    log.info(
        "role=tokenizer pid=%d sockets: pull %s, push %s (server), push %s (scheduler)",
        os.getpid(), addrs.tokenizer_in, addrs.server_in, addrs.scheduler_in,
    )  # fmt: skip
    report_ready(ctx, addrs, "tokenizer")

    def send(box: Outbox) -> None:
        # Scheduler first: a stop-string abort should free KV before the client hears "done".
        for m in box.to_scheduler:
            to_scheduler.send(m)
        for r in box.to_server:
            to_server.send(r)

    async def off_loop(req: GenerateRequest) -> None:
        send(await service.handle_generate_async(req))

    # Requests with images or a grammar in flight (kept referenced).
    pending: set[asyncio.Task[None]] = set()
    handlers: dict[type, Callable[[Any], Outbox]] = {
        GenerateRequest: service.handle_generate,
        TokenBatch: service.handle_tokens,
    }
    while True:
        try:
            msg = await inbox.recv()
        except msgspec.DecodeError as e:  # a malformed message: drop it, keep serving
            log.error("dropped an undecodable message: %s", e)
            continue
        if isinstance(msg, GenerateRequest) and service.goes_async(msg):
            task = asyncio.create_task(off_loop(msg))
            pending.add(task)
            task.add_done_callback(pending.discard)
            continue
        send(handlers[type(msg)](msg))
