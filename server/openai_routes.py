"""OpenAI routes: /v1/chat/completions, /v1/completions, /v1/models[/{id}]."""

from __future__ import annotations

import msgspec
from fastapi import APIRouter, Request
from fastapi.responses import Response

from fovea.common.messages import GenerateRequest
from fovea.server import responses
from fovea.server.context import Ctx
from fovea.server.openai_protocol import (
    IGNORED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    new_id,
    unsupported_field,
)
from fovea.server.request_build import APIError, check_token_ids, prompt_request, split_prompts
from fovea.server.tool_calls.plan import constrain, plan_tools

router = APIRouter()


def _refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    field = unsupported_field(body)
    if field is not None:
        ignored = ", ".join(IGNORED_FIELDS)
        raise APIError(
            400,
            f"unsupported parameter: {field} (Fovea does not implement it; fields accepted "
            f"and ignored: {ignored})",
            field,
        )


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request, ctx: Ctx) -> Response:
    ctx.check_model(body.model)
    _refuse_unsupported(body)
    add_generation_prompt = body.add_generation_prompt
    if body.continue_final_message:
        if body.messages[-1].role != "assistant":
            raise APIError(
                400,
                "continue_final_message needs the last message to be the assistant's",
                "continue_final_message",
            )
        if "add_generation_prompt" in body.model_fields_set and add_generation_prompt:
            raise APIError(
                400,
                "continue_final_message and add_generation_prompt cannot both be true",
                "continue_final_message",
            )
        add_generation_prompt = False
    tools = plan_tools(
        body.tools, body.tool_choice, body.parallel_tool_calls, ctx.args.tool_call_parser
    )
    skip_given = "skip_special_tokens" in body.model_fields_set
    sampling = ctx.checked(constrain(body.sampling(), tools, skip_given))
    req = GenerateRequest(
        rid=new_id("chatcmpl"),
        sampling=sampling,
        messages=[m.to_message(i, body.video_defaults()) for i, m in enumerate(body.messages)],
        add_generation_prompt=add_generation_prompt,
        continue_final_message=body.continue_final_message,
        chat_template_kwargs=body.chat_template_kwargs or {},
        tools=tools.tools,
    )
    render = responses.ChatRenderer(
        req.rid,
        ctx.args.model_name,
        sampling,
        body.include_usage,
        continuous_usage=body.continuous_usage,
        tools=tools,
    )
    return await ctx.run(request, [req], body.stream, render)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, ctx: Ctx) -> Response:
    ctx.check_model(body.model)
    _refuse_unsupported(body)
    prompts = split_prompts(body.prompt)
    check_token_ids(prompts)
    sampling = ctx.checked(body.sampling())
    rid = new_id("cmpl")
    if body.echo and not all(isinstance(p, str) for p in prompts):
        # A prompt given as token ids is echoed as its tokens' texts, which come back with
        # the prompt logprobs.
        sampling = msgspec.structs.replace(sampling, prompt_logprobs=True)
    reqs = [
        prompt_request(rid if len(prompts) == 1 else f"{rid}-{p}", prompt, sampling)
        for p, prompt in enumerate(prompts)
    ]
    echo = None
    if body.echo:
        echo = [prompt if isinstance(prompt, str) else None for prompt in prompts]
    render = responses.CompletionRenderer(
        rid,
        ctx.args.model_name,
        sampling,
        body.include_usage,
        n_prompts=len(prompts),
        continuous_usage=body.continuous_usage,
        echo=echo,
    )
    return await ctx.run(request, reqs, body.stream, render)


@router.get("/v1/models")
async def models(ctx: Ctx) -> Response:
    return responses.json(responses.model_list(ctx.args, ctx.model))


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, ctx: Ctx) -> Response:
    # /v1/models//abs/path: the route's path parameter loses the absolute path's first "/".
    if "/" + model_id == ctx.args.model_path:
        model_id = ctx.args.model_path
    ctx.check_model(model_id)
    return responses.json(responses.model_card(ctx.args, ctx.model))
