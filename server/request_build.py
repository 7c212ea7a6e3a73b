"""From a validated HTTP body to GenerateRequests: prompt forms, images, and the checks that
must pass before a request is in flight. Rendering the answers is server/responses.py's job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec

from fovea.common.messages import GenerateRequest, ImageRef, TextDelta, VideoRef
from fovea.common.sampling import SamplingParams

T = TypeVar("T")


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
    videos: list[VideoRef] | None = None,
) -> GenerateRequest:
    text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
    return GenerateRequest(
        rid=rid,
        sampling=sampling,
        text=text,
        input_ids=ids,
        images=images or [],
        videos=videos or [],
        arrival_time=time.time(),
    )


def _per_prompt(data: Any, n_prompts: int, name: str, ref: Callable[[Any], T]) -> list[list[T]]:
    """`data` aligned with the prompts: for one prompt an item or a list of items; for several,
    a list with one entry (None, an item or a list) per prompt."""

    def refs(entry: Any) -> list[T]:
        items = entry if isinstance(entry, list) else [] if entry is None else [entry]
        return [ref(item) for item in items]

    if data is None:
        return [[] for _ in range(n_prompts)]
    if n_prompts == 1:
        return [refs(data)]
    if not isinstance(data, list) or len(data) != n_prompts:
        raise ValueError(
            f"{name} must be a list with one entry for each of the {n_prompts} prompts"
        )
    return [refs(entry) for entry in data]


def _image_ref(item: Any) -> ImageRef:
    if isinstance(item, str):
        return ImageRef(url=item)
    if isinstance(item, bytes | bytearray):
        return ImageRef(data=bytes(item))
    raise ValueError(f"an image must be a URL, data URI, path or bytes, not {type(item).__name__}")


def _video_ref(item: Any) -> VideoRef:
    if isinstance(item, str):
        return VideoRef(url=item)
    if isinstance(item, bytes | bytearray):
        return VideoRef(data=bytes(item))
    if isinstance(item, dict):
        fields = VideoRef.__struct_fields__
        unknown = sorted(set(item) - set(fields))
        if unknown:
            raise ValueError(f"a video dict has unknown keys {unknown}; known: {list(fields)}")
        try:  # VideoRef is array-like: its fields in order
            return msgspec.convert([item.get(f) for f in fields], VideoRef)
        except msgspec.ValidationError as e:
            raise ValueError(f"a video dict is malformed: {e}") from None
    raise ValueError(
        f"a video must be a URL, data URI, path, bytes or a dict, not {type(item).__name__}"
    )


def images_per_prompt(image_data: Any, n_prompts: int) -> list[list[ImageRef]]:
    """SGLang's `image_data` aligned with the prompts: for one prompt an image or a list of
    images; for several, a list with one entry (None, an image or a list) per prompt. An
    image is a URL / data URI / path string, or the file's bytes. ValueError if misshapen."""
    return _per_prompt(image_data, n_prompts, "image_data", _image_ref)


def videos_per_prompt(video_data: Any, n_prompts: int) -> list[list[VideoRef]]:
    """`video_data` aligned with the prompts as image_data is. A video is a URL / data URI /
    path string, the file's bytes, or a dict with one of "url" and "data" and any of "fps",
    "max_frames", "min_pixels", "max_pixels". ValueError if misshapen."""
    return _per_prompt(video_data, n_prompts, "video_data", _video_ref)


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
