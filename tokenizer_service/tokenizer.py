"""The tokenizer service's manager: turns GenerateRequests into TokenizedRequests and the
scheduler's TokenBatches into DeltaBatches, so a request's stop strings are registered before
its first tokens can arrive.

A request with images is rendered and checked first (a bad prompt fails before any fetch), then
its images are fetched concurrently and decoded and preprocessed off the event loop, so a slow
image URL delays only its own request. Text requests are handled inline.

`Tokenizer` is socket-free (tests drive it directly); the process around it is
tokenizer_service/main.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fovea.common import metrics as fovea_metrics
from fovea.common.grammar_compiler import GrammarError
from fovea.common.messages import (
    AbortRequest,
    DeltaBatch,
    GenerateRequest,
    ImageInput,
    ImageRef,
    RequestError,
    TokenBatch,
    TokenizedRequest,
    VideoRef,
)
from fovea.common.model_config import ModelInfo
from fovea.tokenizer_service.chat_templates import (
    ChatRenderer,
    ChatRenderError,
    image_refs,
    video_refs,
)
from fovea.tokenizer_service.detokenize import Detokenizer
from fovea.tokenizer_service.grammar import GRAMMAR_PARAMS, GrammarChecker
from fovea.tokenizer_service.media import MediaError, MediaLoader
from fovea.tokenizer_service.processors import ImageProcessor, ProcessedImage
from fovea.tokenizer_service.video import VideoLimits
from fovea.tokenizer_service.video_input import expand_runs, load_videos, run_offsets

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
    dp_rank: int | None = None  # the replica the request named (GenerateRequest.dp_rank)


def image_hash(file_hash: bytes, processed: ProcessedImage) -> bytes:
    """The image's cache key: its bytes' hash, or for a processing variant, a hash of both."""
    if not processed.variant:
        return file_hash
    return hashlib.blake2b(file_hash + processed.variant, digest_size=len(file_hash)).digest()


def image_inputs(
    file_hashes: list[bytes], processed: list[ProcessedImage], offsets: list[int]
) -> list[ImageInput]:
    """One ImageInput per placeholder run (`offsets`: each run's start; images in order, each
    image's parts in order). The runs of an image with several key its hash with their index."""
    if len(offsets) != sum(len(p.parts) for p in processed):
        raise ValueError(f"{len(offsets)} image placeholder runs for {len(processed)} images")
    out: list[ImageInput] = []
    starts = iter(offsets)
    for file_hash, p in zip(file_hashes, processed, strict=True):
        key = image_hash(file_hash, p)
        for k, part in enumerate(p.parts):
            run_key = span_hash(key, k) if p.spans else key
            out.append(
                ImageInput(
                    run_key,
                    next(starts),
                    part.num_tokens,
                    part.pixel_values,
                    part.grid,
                    part.second_per_grid_t,
                    list(part.pixel_scale),
                    list(part.pixel_shift),
                )
            )
    return out


def span_hash(image_key: bytes, index: int) -> bytes:
    """The cache key of run `index` of an image shown as several runs (MiniCPM-V slices)."""
    return hashlib.blake2b(
        image_key + b"span" + index.to_bytes(4, "little"), digest_size=len(image_key)
    ).digest()


def _grammar_refusal(req: GenerateRequest, e: GrammarError) -> PromptError:
    assert req.sampling.grammar is not None
    return PromptError(e.message, GRAMMAR_PARAMS.get(req.sampling.grammar.kind, "grammar"))


def load_hf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class Tokenizer:
    """Tokenizes requests (chat template, prompt checks, n sequences) and detokenizes their
    outputs. Holds per-request detokenizer state from tokenization until every sequence ends."""

    def __init__(
        self,
        hf_tokenizer: Any,
        model: ModelInfo,
        chat: ChatRenderer,
        processor: ImageProcessor | None = None,
        media: MediaLoader | None = None,
        grammars: GrammarChecker | None = None,
    ) -> None:
        self.hf = hf_tokenizer
        self.model = model
        self.chat = chat
        self.processor = processor
        self.media = media
        self.grammars = grammars or GrammarChecker(hf_tokenizer, model)
        self.video_limits = VideoLimits()  # the service sets the server's (--max-video-*)
        self.detokenizer = Detokenizer(hf_tokenizer)
        # Ids the tokenizer can produce may exceed the config's vocab_size (added tokens).
        self.vocab_size = max(model.vocab_size, len(hf_tokenizer))

    def handle_generate(self, req: GenerateRequest) -> Outbox:
        try:
            return Outbox(to_scheduler=list(self.tokenize(req)), dp_rank=req.dp_rank)
        except Exception as e:
            return self._refusal(req, e)

    def goes_async(self, req: GenerateRequest) -> bool:
        """Whether `req` goes the async way: it has images to fetch, or a grammar to compile
        (in a thread, which the loop awaits). Never raises: it runs in the service's loop,
        outside any request's error handling."""
        if req.sampling.grammar is not None:
            return True
        try:
            return bool(req.images or req.videos) or bool(
                req.messages and (image_refs(req.messages) or video_refs(req.messages))
            )
        except ChatRenderError:
            return True  # a malformed image part: tokenize_async refuses it with this message

    async def handle_generate_async(self, req: GenerateRequest) -> Outbox:
        """handle_generate for a request that may carry images or a grammar."""
        try:
            return Outbox(to_scheduler=list(await self.tokenize_async(req)), dp_rank=req.dp_rank)
        except Exception as e:
            return self._refusal(req, e)

    def _refusal(self, req: GenerateRequest, e: Exception) -> Outbox:
        """A refused request's error: a 400 for what the client can fix, else a 500."""
        if isinstance(e, PromptError | ChatRenderError):
            err = RequestError(rid=req.rid, message=e.message, param=e.param)
        elif isinstance(e, MediaError):
            param = e.param or ("messages" if req.messages is not None else "prompt")
            err = RequestError(rid=req.rid, message=e.message, param=param)
        else:
            log.exception("rid=%s: tokenization failed", req.rid, exc_info=e)
            self.detokenizer.drop(req.rid)
            err = RequestError(rid=req.rid, message=f"tokenization failed: {e}", status=500)
        return Outbox(to_server=[err])

    def handle_tokens(self, batch: TokenBatch) -> Outbox:
        out = self.detokenizer.process(batch)
        box = Outbox(to_scheduler=list(out.aborts))
        if out.deltas:
            box.to_server.append(DeltaBatch(out.deltas))
        box.to_server.extend(out.errors)
        return box

    def tokenize(self, req: GenerateRequest) -> list[TokenizedRequest]:
        """The request's n sequences, after registering them with the detokenizer.
        Raises PromptError / ChatRenderError for a request to refuse (and for images: those
        go through tokenize_async)."""
        ids, param = self._prompt_ids(req)
        self._check_placeholders(ids, [], [], param)
        if req.sampling.grammar is not None:
            try:
                self.grammars.check_sync(req.sampling.grammar)
            except GrammarError as e:
                raise _grammar_refusal(req, e) from e
        return self._sequences(req, ids, [], param)

    async def tokenize_async(self, req: GenerateRequest) -> list[TokenizedRequest]:
        """tokenize, fetching and preprocessing the request's images and compiling its grammar
        off the loop. Also raises MediaError."""
        ids, param = self._prompt_ids(req)
        refs = image_refs(req.messages) if req.messages is not None else req.images
        vrefs = video_refs(req.messages) if req.messages is not None else req.videos
        self._check_placeholders(ids, refs, vrefs, param)
        if req.sampling.grammar is not None:  # before any image is fetched
            try:
                await self.grammars.check(req.sampling.grammar)
            except GrammarError as e:
                raise _grammar_refusal(req, e) from e
        if not refs and not vrefs:
            return self._sequences(req, ids, [], param)
        assert self.processor is not None and self.media is not None
        processor = self.processor
        videos: list[ImageInput] = []
        if vrefs:
            assert processor.video is not None  # _check_placeholders refused otherwise
            video = processor.video
            loaded_videos = await load_videos(self.media, video, vrefs, self.video_limits)
            counts = [v.num_tokens for _, v in loaded_videos]
            ids = expand_runs(ids, video.video_token_id, counts)
            videos = image_inputs(
                [h for h, _ in loaded_videos], [v for _, v in loaded_videos], [0] * len(counts)
            )
        metrics = fovea_metrics.get()
        t0 = time.perf_counter()
        loaded = await self.media.load_all(refs) if refs else []
        if metrics is not None:
            metrics.image_fetch.observe(time.perf_counter() - t0)

        def preprocess_all() -> list[ProcessedImage]:
            out = []
            for im in loaded:
                t = time.perf_counter()
                out.append(processor.preprocess_in_request(im.image, len(loaded)))
                if metrics is not None:
                    metrics.image_preprocess.observe(time.perf_counter() - t)
            return out

        try:
            processed = await asyncio.to_thread(preprocess_all)
            ids, offsets = processor.expand_placeholders(ids, processed)
        except ValueError as e:
            raise PromptError(f"image could not be processed: {e}", param) from e
        images = image_inputs([im.hash for im in loaded], processed, offsets)
        if videos:
            assert processor.video is not None
            starts = run_offsets(
                ids, processor.video.video_token_id, [v.num_tokens for v in videos]
            )
            videos = [
                msgspec.structs.replace(v, offset=at) for v, at in zip(videos, starts, strict=True)
            ]
            images = sorted(images + videos, key=lambda i: i.offset)
        return self._sequences(req, ids, images, param)

    def _check_placeholders(
        self, ids: list[int], refs: list[ImageRef], vrefs: list[VideoRef], param: str
    ) -> None:
        """Images and videos must pair up one to one with their placeholders in the prompt."""
        video = self.processor.video if self.processor is not None else None
        if vrefs and video is None:
            raise PromptError("this model does not accept video inputs", param)
        if video is not None and len(vrefs) != ids.count(video.video_token_id):
            raise PromptError(
                f"the prompt has {ids.count(video.video_token_id)} video placeholders but "
                f"{len(vrefs)} videos were given",
                param,
            )
        if vrefs and len(refs) + len(vrefs) > (limit := self._max_media()):
            raise PromptError(
                f"too many images and videos: {len(refs) + len(vrefs)} given, at most {limit} "
                "per request (--max-images-per-request)",
                param,
            )
        if self.processor is None:
            if refs:
                raise PromptError("this model does not accept image inputs", param)
            return
        n = ids.count(self.processor.image_token_id)
        if n != len(refs):
            raise PromptError(
                f"the prompt has {n} image placeholders but {len(refs)} images were given",
                param,
            )

    def _max_media(self) -> int:
        return self.media.policy.max_images if self.media is not None else 1 << 30

    def _sequences(
        self, req: GenerateRequest, ids: list[int], images: list[ImageInput], param: str
    ) -> list[TokenizedRequest]:
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
                images=images,
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
                req.messages,
                req.add_generation_prompt,
                req.chat_template_kwargs,
                continue_final_message=req.continue_final_message,
                tools=req.tools,
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
