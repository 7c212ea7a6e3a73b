"""The tokenizer service: turns GenerateRequests into TokenizedRequests and the scheduler's
TokenBatches into DeltaBatches, in one process, so a request's stop strings are registered before
its first tokens can arrive.

`Tokenizer` is the socket-free manager (tests drive it directly); `run_tokenizer` is the process.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from fovea.common.config import ServerArgs
from fovea.common.ipc import Addresses, Receiver, Sender
from fovea.common.messages import (
    AbortRequest,
    DeltaBatch,
    GenerateRequest,
    RequestError,
    TokenBatch,
    TokenizedRequest,
    ToTokenizer,
)
from fovea.common.model_config import ModelInfo
from fovea.common.process import report_ready, setup_process
from fovea.tokenizer_service.chat_templates import (
    ChatRenderer,
    ChatRenderError,
    ChatTemplateError,
)
from fovea.tokenizer_service.detokenize import Detokenizer

log = logging.getLogger("fovea.tokenizer")


class PromptError(ValueError):
    """A request refused here: a 400 naming `param`."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass
class Outbox:
    """What handling one message produced, per destination socket."""

    to_server: list[DeltaBatch | RequestError] = field(default_factory=list)
    to_scheduler: list[TokenizedRequest | AbortRequest] = field(default_factory=list)


def load_hf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class Tokenizer:
    """Tokenizes requests (chat template, prompt checks, n sequences) and detokenizes their
    outputs. Holds per-request detokenizer state from tokenization until every sequence ends."""

    def __init__(self, hf_tokenizer: Any, model: ModelInfo, chat: ChatRenderer) -> None:
        self.hf = hf_tokenizer
        self.model = model
        self.chat = chat
        self.detokenizer = Detokenizer(hf_tokenizer)
        # Ids the tokenizer can produce may exceed the config's vocab_size (added tokens).
        self.vocab_size = max(model.vocab_size, len(hf_tokenizer))

    def handle_generate(self, req: GenerateRequest) -> Outbox:
        box = Outbox()
        try:
            box.to_scheduler.extend(self.tokenize(req))
        except (PromptError, ChatRenderError) as e:
            box.to_server.append(RequestError(rid=req.rid, message=e.message, param=e.param))
        except Exception as e:
            log.exception("rid=%s: tokenization failed", req.rid)
            self.detokenizer.drop(req.rid)
            box.to_server.append(
                RequestError(rid=req.rid, message=f"tokenization failed: {e}", status=500)
            )
        return box

    def handle_tokens(self, batch: TokenBatch) -> Outbox:
        out = self.detokenizer.process(batch)
        box = Outbox(to_scheduler=list(out.aborts))
        if out.deltas:
            box.to_server.append(DeltaBatch(out.deltas))
        box.to_server.extend(out.errors)
        return box

    def tokenize(self, req: GenerateRequest) -> list[TokenizedRequest]:
        """The request's n sequences, after registering them with the detokenizer.
        Raises PromptError / ChatRenderError for a request to refuse."""
        ids, param = self._prompt_ids(req)
        sampling = req.sampling
        max_new = self._check_lengths(len(ids), sampling.max_new_tokens, param)
        if sampling.min_new_tokens > max_new:
            raise PromptError(
                f"min_tokens ({sampling.min_new_tokens}) exceeds the {max_new} tokens left "
                f"in the context after the {param}",
                "min_tokens",
            )
        sampling = msgspec.structs.replace(sampling, max_new_tokens=max_new)
        self.detokenizer.add(req.rid, sampling, ids)
        return [
            TokenizedRequest(
                rid=req.rid,
                index=i,
                input_ids=ids,
                sampling=sampling,
                arrival_time=req.arrival_time,
            )
            for i in range(sampling.n)
        ]

    def _prompt_ids(self, req: GenerateRequest) -> tuple[list[int], str]:
        """(token ids, the request field they came from)."""
        given = [x is not None for x in (req.text, req.input_ids, req.messages)]
        if sum(given) != 1:
            raise PromptError(
                "exactly one of prompt, prompt token ids or messages is needed", "prompt"
            )
        if req.messages is not None:
            text = self.chat.render(
                req.messages, req.add_generation_prompt, req.chat_template_kwargs
            )
            # The template already carries BOS where the model wants it.
            ids = list(self.hf.encode(text, add_special_tokens=False))
            param = "messages"
        elif req.text is not None:
            ids = list(self.hf.encode(req.text))
            param = "prompt"
        else:
            assert req.input_ids is not None
            ids = list(req.input_ids)
            param = "prompt"
            for t in ids:
                if not 0 <= t < self.vocab_size:
                    raise PromptError(
                        f"token id {t} is out of range: the vocabulary has {self.vocab_size} "
                        "tokens",
                        param,
                    )
        if not ids:
            raise PromptError(f"empty prompt: the {param} produced no tokens", param)
        return ids, param

    def _check_lengths(self, prompt_len: int, max_new_tokens: int | None, param: str) -> int:
        """max_new_tokens resolved (None: up to the context length)."""
        limit: int = self.model.context_length
        if prompt_len >= limit:
            raise PromptError(
                f"This model's maximum context length is {limit} tokens. However, your prompt is "
                f"{prompt_len} tokens, which leaves no room for a completion. Please reduce the "
                f"length of the {param}.",
                param,
            )
        if max_new_tokens is None:
            return limit - prompt_len
        if prompt_len + max_new_tokens > limit:
            raise PromptError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_new_tokens} tokens ({prompt_len} in the {param}, "
                f"{max_new_tokens} in the completion). Please reduce the length of the {param} "
                "or completion.",
                "max_tokens",
            )
        return max_new_tokens


def run_tokenizer(args: ServerArgs, addrs: Addresses, model: ModelInfo) -> None:
    log = setup_process("tokenizer", args.log_level)
    hf = load_hf_tokenizer(args.tokenizer_path or model.path)
    try:
        chat = ChatRenderer(hf, args.chat_template)
    except ChatTemplateError as e:
        log.error("%s", e)  # one line; the launcher sees this child exit and stops the server
        sys.exit(2)
    if not chat.available:
        log.warning("the model has no chat template: chat requests will be refused")
    service = Tokenizer(hf, model, chat)
    ctx: zmq.Context[Any] = zmq.Context()
    inbox: Receiver[ToTokenizer] = Receiver(ctx, addrs.tokenizer_in, ToTokenizer, bind=True)
    to_server = Sender(ctx, addrs.server_in, bind=False)
    to_scheduler = Sender(ctx, addrs.scheduler_in, bind=False)
    log.info(
        "role=tokenizer pid=%d sockets: pull %s, push %s (server), push %s (scheduler)",
        os.getpid(), addrs.tokenizer_in, addrs.server_in, addrs.scheduler_in,
    )  # fmt: skip
    report_ready(ctx, addrs, "tokenizer")

    handlers: dict[type, Callable[[Any], Outbox]] = {
        GenerateRequest: service.handle_generate,
        TokenBatch: service.handle_tokens,
    }
    while True:
        try:
            msg = inbox.recv()
        except msgspec.DecodeError as e:  # a malformed message: drop it, keep serving
            log.error("dropped an undecodable message: %s", e)
            continue
        box = handlers[type(msg)](msg)
        # Scheduler first: a stop-string abort should free KV before the client hears "done".
        for m in box.to_scheduler:
            to_scheduler.send(m)
        for r in box.to_server:
            to_server.send(r)
