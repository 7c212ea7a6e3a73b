"""SGLang's native routes (/generate, /flush_cache, /get_model_info, /get_server_info,
/get_load, and the newer names /model_info and /server_info), the health probes and /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from fovea.common import metrics as fovea_metrics
from fovea.common.messages import GenerateRequest, SchedulerStats
from fovea.common.sampling import SamplingParams
from fovea.server import responses
from fovea.server.context import Ctx
from fovea.server.native_responses import NativeRenderer, kv_pools
from fovea.server.openai_protocol import (
    GenerateReqInput,
    native_sampling,
    new_id,
    unsupported_field,
)
from fovea.server.request_build import (
    APIError,
    check_token_ids,
    images_per_prompt,
    prompt_request,
    split_prompts,
)
from fovea.server.requests import RequestFailed

router = APIRouter()
metrics_router = APIRouter()

# SGLang's answer, word for word (clients match on it).
FLUSHED = (
    "Cache flushed.\nPlease check backend logs for more details. (When there are running or "
    "waiting requests, the operation will not be performed.)\n"
)


def _native_sampling(body: GenerateReqInput) -> SamplingParams:
    try:
        return native_sampling(
            body.sampling_params,
            body.return_logprob,
            body.top_logprobs_num,
            prompt_logprobs=body.return_logprob and body.logprob_start_len >= 0,
        )
    except KeyError as e:
        raise APIError(400, f"unknown sampling parameter {e.args[0]!r}", "sampling_params") from e
    except msgspec.ValidationError as e:
        raise APIError(400, f"sampling_params: {e}", "sampling_params") from e


@router.post("/generate")
async def generate(body: GenerateReqInput, request: Request, ctx: Ctx) -> Response:
    ctx.check_model(body.model)
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text and input_ids", "text")
    sampling = ctx.checked(_native_sampling(body))
    prompts = split_prompts(body.text if body.text is not None else body.input_ids)
    check_token_ids(prompts, "input_ids")
    try:
        images = images_per_prompt(body.image_data, len(prompts))
    except ValueError as e:
        raise APIError(400, str(e), "image_data") from e
    rid = body.rid or new_id("gen")
    rids = [rid] if len(prompts) == 1 else [f"{rid}-{p}" for p in range(len(prompts))]
    reqs = [
        prompt_request(r, p, sampling, imgs)
        for r, p, imgs in zip(rids, prompts, images, strict=True)
    ]
    field = unsupported_field(body)
    if field is not None:
        raise APIError(400, f"unsupported parameter: {field} (Fovea does not implement it)", field)
    render = NativeRenderer(
        rids,
        sampling,
        batch=body.is_batch,
        return_logprob=body.return_logprob,
        logprob_start_len=body.logprob_start_len,
        return_text_in_logprobs=body.return_text_in_logprobs,
    )
    return await ctx.run(request, reqs, body.stream, render)


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(ctx: Ctx) -> Response:
    """Empties the prefix cache, only while no request runs or waits (SGLang's rule)."""
    stats = await ctx.manager.stats(flush_cache=True)
    return PlainTextResponse(FLUSHED, status_code=200 if stats.flushed else 400)


# /health is 503 until one generation went through end to end (the launcher's warm-up does one
# before it reports ready), so a load balancer never routes to a cold server.
@router.get("/health")
async def health(ctx: Ctx) -> Response:
    if ctx.manager.failed:
        return responses.error(503, ctx.manager.failed or "unavailable")
    if not ctx.warm:
        return responses.error(503, "starting: no generation has completed yet")
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(ctx: Ctx) -> Response:
    sampling = SamplingParams(max_new_tokens=1, temperature=0.0)
    req = GenerateRequest(rid=new_id("health"), sampling=sampling, input_ids=[0])
    render = NativeRenderer([req.rid], sampling)
    try:
        await asyncio.wait_for(render.collect(ctx.manager.generate(req)), 60)
    except (RequestFailed, TimeoutError) as e:
        return responses.error(503, f"generation failed: {e}")
    ctx.warm = True
    return Response(status_code=200)


# SGLang serves both names; its router asks for /server_info and /model_info first and falls
# back to the /get_ names with a deprecation warning.
@router.get("/get_model_info")
@router.get("/model_info")
async def model_info(ctx: Ctx) -> Response:
    return responses.json(responses.model_info(ctx.args, ctx.model))


def sglang_load(stats: SchedulerStats, dp_rank: int = 0) -> dict[str, int]:
    """One scheduler's entry of /get_load. num_tokens (what SGLang's router balances by)
    counts the KV slots running sequences hold (not the evictable cache) and the tokens of the
    waiting ones; an idle scheduler reports 0."""
    held = stats.total_slots - stats.free_slots - stats.evictable_slots
    return {
        "dp_rank": dp_rank,
        "num_reqs": stats.running + stats.waiting,
        "num_waiting_reqs": stats.waiting,
        "num_tokens": held + stats.waiting_tokens,
    }


@router.get("/get_load")
async def load(ctx: Ctx) -> Response:
    """SGLang's shape: a list with one entry per data-parallel rank."""
    return responses.json([sglang_load(await ctx.manager.stats())])


@router.get("/get_server_info")
@router.get("/server_info")
async def server_info(ctx: Ctx) -> Response:
    """SGLang's shape: the server arguments at the top level, the scheduler's state in
    internal_states (one entry per scheduler) and as `scheduler`, the version."""
    stats: dict[str, Any] = msgspec.to_builtins(await ctx.manager.stats())
    stats.pop("query_id", None)
    stats.pop("flushed", None)
    stats["kv_pools"] = kv_pools(stats)
    args = responses.public_args(ctx.args)
    info: dict[str, Any] = {
        **args,
        "args": args,
        "status": "ready",
        "max_total_num_tokens": stats["total_slots"],
        "max_req_input_len": ctx.model.context_length - 1,
        "internal_states": [stats],
        "scheduler": stats,
        "inflight_requests": ctx.inflight,
        "version": responses.VERSION,
    }
    return responses.json(info)


@metrics_router.get("/metrics")
async def metrics() -> Response:
    body, content_type = await asyncio.to_thread(fovea_metrics.render)
    return Response(body, media_type=content_type)
