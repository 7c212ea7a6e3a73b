"""From a validated HTTP body to GenerateRequests: prompt forms, images, and the checks that
must pass before a request is in flight. Rendering the answers is server/responses.py's job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from fovea.common.messages import GenerateRequest, ImageRef, TextDelta
from fovea.common.sampling import SamplingParams


class APIError(Exception):
    """Refused by the HTTP server itself: answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


# Token ids travel as msgpack ints (64 bits); the tokenizer checks them against the vocabulary.
_INT64 = 2**63
_probe = msgspec.msgpack.Encoder()


def check_token_ids(prompts: list[str | list[int]], param: str = "prompt") -> None:
    for prompt in prompts:
        if not isinstance(prompt, str):
            for t in prompt:
                if not -_INT64 <= t < _INT64:
                    raise APIError(400, f"token id {t} is out of range", param)


def check_encodable(req: GenerateRequest) -> None:
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


def split_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms -> a list of prompts, each text or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        return [""]
    return list(prompt)


def prompt_request(
    rid: str,
    prompt: str | list[int],
    sampling: SamplingParams,
    images: list[ImageRef] | None = None,
) -> GenerateRequest:
    text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
    return GenerateRequest(
        rid=rid,
        sampling=sampling,
        text=text,
        input_ids=ids,
        images=images or [],
        arrival_time=time.time(),
    )


def images_per_prompt(image_data: Any, n_prompts: int) -> list[list[ImageRef]]:
    """SGLang's `image_data` aligned with the prompts: for one prompt an image or a list of
    images; for several, a list with one entry (None, an image or a list) per prompt. An
    image is a URL / data URI / path string, or the file's bytes. ValueError if misshapen."""

    def refs(entry: Any) -> list[ImageRef]:
        items = entry if isinstance(entry, list) else [] if entry is None else [entry]
        out = []
        for item in items:
            if isinstance(item, str):
                out.append(ImageRef(url=item))
            elif isinstance(item, bytes | bytearray):
                out.append(ImageRef(data=bytes(item)))
            else:
                raise ValueError(
                    f"an image must be a URL, data URI, path or bytes, not {type(item).__name__}"
                )
        return out

    if image_data is None:
        return [[] for _ in range(n_prompts)]
    if n_prompts == 1:
        return [refs(image_data)]
    if not isinstance(image_data, list) or len(image_data) != n_prompts:
        raise ValueError(
            f"image_data must be a list with one entry for each of the {n_prompts} prompts"
        )
    return [refs(entry) for entry in image_data]


async def merge_streams(
    streams: list[AsyncIterator[TextDelta]], n: int
) -> AsyncIterator[TextDelta]:
    """Several prompts' deltas as one stream, as they arrive: prompt p's sequence i becomes
    index p * n + i (OpenAI's choice order). The first error ends the whole stream; closing
    it early cancels every reader, and each request's own iterator then aborts it (its KV
    slots are freed)."""
    queue: asyncio.Queue[TextDelta | BaseException | None] = asyncio.Queue()

    async def pump(p: int, stream: AsyncIterator[TextDelta]) -> None:
        try:
            async for d in stream:
                queue.put_nowait(msgspec.structs.replace(d, index=p * n + d.index))
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # RequestFailed, or the backend gone
            queue.put_nowait(e)

    tasks = [asyncio.ensure_future(pump(p, s)) for p, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
