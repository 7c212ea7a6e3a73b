"""The offline Engine: the same processes as launch_server, minus HTTP, driven from Python.

    from fovea import Engine
    with Engine(model_path="SmolLM2-135M-Instruct") as llm:
        outs = llm.generate(["Hello"], {"max_new_tokens": 8, "temperature": 0})

The request manager lives on a private event loop in a background thread; `generate` blocks on
it, and `async_generate` bridges to the caller's loop. If a child process dies, pending and later
requests fail with RuntimeError instead of hanging.
"""

from __future__ import annotations

import asyncio
import io
import threading
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import msgspec

from fovea.common.config import ServerArgs, check_args
from fovea.common.messages import GenerateRequest, TextDelta
from fovea.common.sampling import SamplingParams, validate_sampling
from fovea.launcher.launch import ChildDied, ProcessGroup, prepare
from fovea.server.native_responses import NativeRenderer, kv_pools
from fovea.server.openai_protocol import native_sampling
from fovea.server.request_build import images_per_prompt, prompt_request, videos_per_prompt
from fovea.server.requests import RequestFailed, RequestManager

T = TypeVar("T")
Prompt = str | list[int]


class Engine:
    def __init__(self, model_path: str, **kwargs: Any) -> None:
        args = ServerArgs(model_path=model_path, **kwargs)
        problem = check_args(args)
        if problem:
            raise ValueError(problem)
        self.args, self.model = prepare(args)
        self._group = ProcessGroup(self.args, self.model, with_http=False)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fovea-engine", daemon=True
        )
        self._closed = False
        self._group.start()
        try:
            self._group.wait_ready()
        except BaseException:
            self._closed = True  # nothing for shutdown (or __del__) to do
            self._group.stop()
            raise
        self._thread.start()
        self._mgr: RequestManager = self._call(self._make_manager())
        self._watch = threading.Thread(target=self._supervise, name="fovea-watch", daemon=True)
        self._watch.start()

    async def _make_manager(self) -> RequestManager:
        mgr = RequestManager(self._group.addrs)
        mgr.start()
        return mgr

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _supervise(self) -> None:
        while not self._closed:
            try:
                self._group.wait_any_exit(0.5)
            except ChildDied as e:
                if not self._closed:
                    self._loop.call_soon_threadsafe(self._mgr.fail_all, f"engine stopped: {e}")
                return

    # ------------------------------------------------------------------ requests

    def _requests(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None,
        image_data: Any = None,
        video_data: Any = None,
    ) -> tuple[list[GenerateRequest], bool]:
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)
        )
        plist: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item,arg-type]
        params = (
            sampling_params
            if isinstance(sampling_params, list)
            else [sampling_params or {}] * len(plist)
        )
        if len(params) != len(plist):
            raise ValueError(f"{len(plist)} prompts but {len(params)} sampling_params")
        images = images_per_prompt(_encode_pil(image_data), len(plist))
        videos = videos_per_prompt(video_data, len(plist))
        reqs = [
            prompt_request(
                uuid.uuid4().hex,
                prompt if isinstance(prompt, str) else list(prompt),
                _sampling(p),
                imgs,
                vids,
            )
            for prompt, p, imgs, vids in zip(plist, params, images, videos, strict=True)
        ]
        return reqs, single

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        image_data: Any = None,
        video_data: Any = None,
    ) -> Any:
        """Outputs in SGLang's shape ({"text", "output_ids", "meta_info"}): one dict for one
        prompt, else a list in prompt order (a list per prompt when n > 1).

        image_data: for one prompt, an image or a list of images; for several, one entry per
        prompt (None, an image or a list). An image is a URL, data URI, local path (under
        allowed_local_media_path), bytes of an image file, or a PIL image. Each prompt holds
        one image placeholder of the model's chat template per image, in order.

        video_data: the same shapes for videos. A video is a URL, data URI, local path, the
        file's bytes, or a dict with one of "url" / "data" and any of "fps", "max_frames",
        "min_pixels", "max_pixels"; one video placeholder (<|video_pad|> for Qwen2-VL) per
        video, in order."""
        reqs, single = self._requests(prompts, sampling_params, image_data, video_data)

        async def run_all() -> list[Any]:
            return await asyncio.gather(
                *(NativeRenderer([r.rid], r.sampling).collect(self._mgr.generate(r)) for r in reqs)
            )

        outs = self._wrap(lambda: self._call(run_all()))
        return outs[0] if single else outs

    async def async_generate(
        self,
        prompt: Prompt,
        sampling_params: dict[str, Any] | None = None,
        stream: bool = False,
        image_data: Any = None,
        video_data: Any = None,
    ) -> Any:
        """One prompt. stream=False: the output dict; stream=True: an async iterator of
        cumulative outputs, one per new piece of text. image_data and video_data as for
        generate."""
        (req,), _ = self._requests(prompt, sampling_params, image_data, video_data)
        if stream:
            return self._stream(req)
        fut = asyncio.run_coroutine_threadsafe(
            NativeRenderer([req.rid], req.sampling).collect(self._mgr.generate(req)), self._loop
        )
        try:
            return await asyncio.wrap_future(fut)
        except RequestFailed as e:
            raise ValueError(e.message) from e

    async def _stream(self, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        render = NativeRenderer([req.rid], req.sampling)
        deltas = self._mgr.generate(req)  # an async generator: it has aclose()

        async def next_delta() -> TextDelta:
            return await anext(deltas)

        try:
            while True:
                fut = asyncio.run_coroutine_threadsafe(next_delta(), self._loop)
                try:
                    delta = await asyncio.wrap_future(fut)
                except StopAsyncIteration:
                    return
                except RequestFailed as e:
                    raise ValueError(e.message) from e
                yield render.chunks(delta)[0]
        finally:
            # Abandoned early: closing the iterator on its own loop aborts the request.
            asyncio.run_coroutine_threadsafe(deltas.aclose(), self._loop)  # type: ignore[attr-defined]

    def _wrap(self, fn: Any) -> Any:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        try:
            return fn()
        except RequestFailed as e:
            if e.status >= 500:
                raise RuntimeError(e.message) from e
            raise ValueError(e.message) from e

    def get_server_info(self) -> dict[str, Any]:
        stats: dict[str, Any] = msgspec.to_builtins(
            self._wrap(lambda: self._call(self._mgr.stats()))
        )
        stats["kv_pools"] = kv_pools(stats)
        return {"scheduler": stats}

    # ------------------------------------------------------------------ lifetime

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Bounded: shutdown also runs from __del__ (garbage collection at any point of a
            # caller's program), where the loop may already be gone; waiting on it would hang.
            if self._thread.is_alive() and hasattr(self, "_mgr"):
                self._call(self._close_manager(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread.is_alive():
                self._thread.join(5)
            self._group.stop()

    async def _close_manager(self) -> None:
        self._mgr.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.shutdown()


def _sampling(params: dict[str, Any] | SamplingParams) -> SamplingParams:
    if isinstance(params, SamplingParams):
        sampling = params
    else:
        try:
            sampling = native_sampling(params, False, 0)
        except KeyError as e:
            raise ValueError(f"unknown sampling parameter {e.args[0]!r}") from e
        except msgspec.ValidationError as e:
            raise ValueError(f"sampling_params: {e}") from e
    validate_sampling(sampling)
    return sampling


def _encode_pil(image_data: Any) -> Any:
    """image_data with every PIL image replaced by its PNG bytes (lossless), recursively."""
    if isinstance(image_data, list):
        return [_encode_pil(x) for x in image_data]
    if hasattr(image_data, "save") and hasattr(image_data, "mode"):  # a PIL image
        buf = io.BytesIO()
        image_data.save(buf, format="PNG")
        return buf.getvalue()
    return image_data
