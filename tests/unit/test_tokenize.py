"""The tokenizer service's request side (tokenizer_service/tokenizer.py, chat_templates.py):
chat rendering, prompt checks with their exact OpenAI-style errors, max_new_tokens resolution,
and the process wired to real sockets."""

from __future__ import annotations

import multiprocessing as mp
import shutil
from pathlib import Path
from typing import Any

import pytest
from tiny_models import make_tokenizer

from fovea.common.config import ServerArgs
from fovea.common.messages import (
    AbortRequest,
    ChatMessage,
    DeltaBatch,
    GenerateRequest,
    ProcessReady,
    RequestError,
    SeqOutput,
    TextDelta,
    TokenBatch,
    TokenizedRequest,
)
from fovea.common.model_config import ModelInfo
from fovea.common.sampling import SamplingParams
from fovea.tokenizer_service.builtin_templates import BUILTIN_TEMPLATES, CHATML
from fovea.tokenizer_service.chat_templates import (
    ChatRenderer,
    ChatTemplateError,
    load_chat_template,
)
from fovea.tokenizer_service.tokenizer import Outbox, Tokenizer

CONVERSATION = [
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "What is the capital of France?"),
    ChatMessage("assistant", "Paris."),
    ChatMessage("user", "日本語で?"),
]
ALTERNATING = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def hf(tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def model_info(path: str = "m", context_length: int = 64) -> ModelInfo:
    return ModelInfo(
        path=path,
        architecture="LlamaForCausalLM",
        model_type="llama",
        context_length=context_length,
        vocab_size=512,
        eos_token_ids=[2],
    )


def service(hf: Any, context_length: int = 64, template: str | None = None) -> Tokenizer:
    return Tokenizer(hf, model_info(context_length=context_length), ChatRenderer(hf, template))


def request(rid: str = "r", **kw: Any) -> GenerateRequest:
    sampling = kw.pop("sampling", SamplingParams())
    return GenerateRequest(rid=rid, sampling=sampling, **kw)


def error_of(box: Outbox) -> tuple[int, str, str | None]:
    assert box.to_scheduler == []
    (err,) = box.to_server
    assert isinstance(err, RequestError)
    return err.status, err.message, err.param


def test_two_turn_chat_matches_the_tokenizers_own_template(hf: Any) -> None:
    svc = service(hf, context_length=256)
    box = svc.handle_generate(request(messages=CONVERSATION))
    (treq,) = box.to_scheduler
    assert isinstance(treq, TokenizedRequest)
    dicts = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    expected = hf.apply_chat_template(dicts, tokenize=True, add_generation_prompt=True)
    assert treq.input_ids == expected["input_ids"]
    text = hf.decode(treq.input_ids, skip_special_tokens=False)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\n日本語で?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (treq.rid, treq.index, treq.sampling.max_new_tokens) == (
        "r",
        0,
        256 - len(expected["input_ids"]),
    )
    assert box.to_server == []


def test_chat_without_generation_prompt_and_text_parts(hf: Any) -> None:
    svc = service(hf)
    parts = [ChatMessage("user", [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])]
    (treq,) = svc.tokenize(request(messages=parts, add_generation_prompt=False))
    # Text parts join with a newline into one string, as vLLM does for text models.
    assert treq.input_ids == hf.encode(
        "<|im_start|>user\na\nb<|im_end|>\n", add_special_tokens=False
    )


def test_builtin_chatml_renders_like_the_models_template(hf: Any) -> None:
    renderer = ChatRenderer(hf, "chatml")
    assert renderer.template == CHATML == BUILTIN_TEMPLATES["chatml"].source
    assert renderer.render(CONVERSATION[1:2]) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_kwargs_reach_the_template(hf: Any, tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0]['content'] }}{% if enable_thinking %}<think>{% endif %}")
    renderer = ChatRenderer(hf, str(path))
    assert renderer.render(CONVERSATION[:1], True, {"enable_thinking": True}) == (
        "You are terse.<think>"
    )
    assert renderer.render(CONVERSATION[:1], True, {}) == "You are terse."


def test_load_chat_template(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("{{ 1 }}")
    assert load_chat_template(None) is None
    assert load_chat_template("chatml") == CHATML
    assert load_chat_template(str(path)) == "{{ 1 }}"
    with pytest.raises(ChatTemplateError) as e:
        load_chat_template("missing.jinja")
    assert str(e.value) == "--chat-template file 'missing.jinja' does not exist"
    with pytest.raises(ChatTemplateError) as e:
        load_chat_template("vicuna")
    assert str(e.value) == (
        "--chat-template 'vicuna' is neither a file nor a built-in template "
        f"(built-in: {', '.join(sorted(BUILTIN_TEMPLATES))})"
    )


def test_template_exception_is_a_400(hf: Any, tmp_path: Path) -> None:
    path = tmp_path / "alt.jinja"
    path.write_text(ALTERNATING)
    svc = service(hf, template=str(path))
    bad = [ChatMessage("user", "a"), ChatMessage("user", "b")]
    assert error_of(svc.handle_generate(request(messages=bad))) == (
        400,
        "chat template error: Conversation roles must alternate user/assistant",
        "messages",
    )
    assert "r" not in svc.detokenizer
    (treq,) = svc.tokenize(request(messages=[ChatMessage("user", "a")]))
    assert treq.input_ids == hf.encode("user: a\n", add_special_tokens=False)


def test_model_without_template_refuses_chat_but_serves_prompts(hf: Any, tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(tok_dir))
    bare.chat_template = None
    svc = service(bare)
    assert error_of(svc.handle_generate(request(messages=CONVERSATION))) == (
        400,
        "this model has no chat template; start the server with --chat-template "
        f"(a .jinja file or a built-in name: {', '.join(sorted(BUILTIN_TEMPLATES))}) or use "
        "/v1/completions",
        "messages",
    )
    (treq,) = svc.tokenize(request(text="Paris"))
    assert treq.input_ids == [299, 273]


def test_content_part_errors(hf: Any) -> None:
    svc = service(hf)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    msgs = [ChatMessage("user", [{"type": "text", "text": "what?"}, image])]
    assert error_of(svc.handle_generate(request(messages=msgs))) == (
        400,
        "this model does not accept image inputs",
        "messages",
    )
    msgs = [ChatMessage("user", [{"type": "audio"}])]
    assert error_of(svc.handle_generate(request(messages=msgs))) == (
        400,
        "unsupported content part type 'audio'",
        "messages",
    )
    req = request(messages=CONVERSATION, chat_template_kwargs={"tokenize": True})
    assert error_of(svc.handle_generate(req)) == (
        400,
        "chat_template_kwargs may not set tokenize",
        "chat_template_kwargs",
    )


@pytest.mark.parametrize("image_url", [{"url": ""}, {}, "", None])
def test_image_part_without_a_url_is_refused_not_fatal(hf: Any, image_url: Any) -> None:
    # The service loop calls goes_async outside any request's error handling: raising there
    # once killed the tokenizer process, and so the server, on one bad chat request.
    import asyncio

    chat = ChatRenderer(hf, "qwen2-vl", model_takes_images=True)
    svc = Tokenizer(hf, model_info(), chat)
    req = request(messages=[ChatMessage("user", [{"type": "image_url", "image_url": image_url}])])
    assert svc.goes_async(req)
    assert error_of(asyncio.run(svc.handle_generate_async(req))) == (
        400,
        "an image_url content part must carry image_url.url",
        "messages",
    )


def test_text_and_token_prompts(hf: Any) -> None:
    svc = service(hf)
    (treq,) = svc.tokenize(request(text="Paris is"))
    assert treq.input_ids == [299, 273, 358]
    (treq,) = svc.tokenize(request(input_ids=[5, 511, 0]))
    assert treq.input_ids == [5, 511, 0]


@pytest.mark.parametrize("bad_id", [512, -1])
def test_token_id_out_of_vocabulary(hf: Any, bad_id: int) -> None:
    svc = service(hf)
    assert error_of(svc.handle_generate(request(input_ids=[5, bad_id]))) == (
        400,
        f"token id {bad_id} is out of range: the vocabulary has 512 tokens",
        "prompt",
    )


@pytest.mark.parametrize("kw", [{"text": ""}, {"input_ids": []}])
def test_empty_prompt(hf: Any, kw: dict[str, Any]) -> None:
    svc = service(hf)
    assert error_of(svc.handle_generate(request(**kw))) == (
        400,
        "empty prompt: the prompt produced no tokens",
        "prompt",
    )


def test_not_exactly_one_prompt_field(hf: Any) -> None:
    svc = service(hf)
    assert error_of(svc.handle_generate(request(text="a", input_ids=[1]))) == (
        400,
        "exactly one of prompt, prompt token ids or messages is needed",
        "prompt",
    )


@pytest.mark.parametrize(("n", "param"), [(8, "prompt"), (9, "prompt")])
def test_prompt_filling_the_context_is_refused(hf: Any, n: int, param: str) -> None:
    svc = service(hf, context_length=8)
    assert error_of(svc.handle_generate(request(input_ids=[5] * n))) == (
        400,
        f"This model's maximum context length is 8 tokens. However, your prompt is {n} tokens, "
        "which leaves no room for a completion. Please reduce the length of the prompt.",
        param,
    )


def test_long_chat_names_messages(hf: Any) -> None:
    svc = service(hf, context_length=8)
    dicts = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    n = len(hf.apply_chat_template(dicts, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert n == 73
    assert error_of(svc.handle_generate(request(messages=CONVERSATION))) == (
        400,
        "This model's maximum context length is 8 tokens. However, your prompt is 73 tokens, "
        "which leaves no room for a completion. Please reduce the length of the messages.",
        "messages",
    )


def test_prompt_plus_max_tokens_over_the_context(hf: Any) -> None:
    svc = service(hf, context_length=8)
    req = request(input_ids=[5] * 3, sampling=SamplingParams(max_new_tokens=6))
    assert error_of(svc.handle_generate(req)) == (
        400,
        "This model's maximum context length is 8 tokens. However, you requested 9 tokens "
        "(3 in the prompt, 6 in the completion). Please reduce the length of the prompt or "
        "completion.",
        "max_tokens",
    )
    req = request(input_ids=[5] * 3, sampling=SamplingParams(min_new_tokens=6))
    assert error_of(svc.handle_generate(req)) == (
        400,
        "min_tokens (6) exceeds the 5 tokens left in the context after the prompt",
        "min_tokens",
    )


@pytest.mark.parametrize(("given", "resolved"), [(None, 5), (5, 5), (2, 2)])
def test_max_new_tokens_resolution(hf: Any, given: int | None, resolved: int) -> None:
    svc = service(hf, context_length=8)
    req = request(input_ids=[5] * 3, sampling=SamplingParams(max_new_tokens=given, temperature=0.5))
    (treq,) = svc.tokenize(req)
    assert treq.sampling == SamplingParams(max_new_tokens=resolved, temperature=0.5)


def test_n_sequences_share_the_prompt_and_are_registered(hf: Any) -> None:
    svc = service(hf)
    req = request(text="Paris", sampling=SamplingParams(n=2, max_new_tokens=4), arrival_time=1.5)
    box = svc.handle_generate(req)
    sampling = SamplingParams(n=2, max_new_tokens=4)
    assert box.to_scheduler == [
        TokenizedRequest(
            rid="r", index=i, input_ids=[299, 273], sampling=sampling, arrival_time=1.5
        )
        for i in range(2)
    ]
    assert "r" in svc.detokenizer


def test_unexpected_failure_is_a_500_for_that_request(
    hf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = service(hf)

    def boom(*args: Any, **kwargs: Any) -> list[int]:
        raise RuntimeError("boom")

    monkeypatch.setattr(hf, "encode", boom)
    assert error_of(svc.handle_generate(request(text="x"))) == (
        500,
        "tokenization failed: boom",
        None,
    )
    assert "r" not in svc.detokenizer


def test_stop_string_round_trip_through_the_manager(hf: Any) -> None:
    svc = service(hf)
    svc.handle_generate(request(text="Paris", sampling=SamplingParams(stop=[" the"])))
    ids = hf.encode(" is the capital")
    box = svc.handle_tokens(TokenBatch([SeqOutput("r", 0, ids, None, None, None, 2, 0, len(ids))]))
    assert box.to_scheduler == [AbortRequest("r", 0, "stop")]
    assert box.to_server == [
        DeltaBatch([TextDelta("r", 0, " is", ids[:2], None, "stop", " the", 2, 0, 2)])
    ]


def test_process_over_sockets(tok_dir: Path) -> None:
    """The service as a process (main.py): ready report, tokenize, detokenize, stop-string abort."""
    import zmq

    from fovea.common.ipc import Addresses, Receiver, Sender
    from fovea.common.messages import ToLauncher, ToScheduler, ToServer
    from fovea.tokenizer_service.main import run_tokenizer_service

    addrs = Addresses.local()
    ctx: zmq.Context[Any] = zmq.Context()
    launcher: Receiver[Any] = Receiver(ctx, addrs.launcher_in, ToLauncher, bind=True)
    server: Receiver[Any] = Receiver(ctx, addrs.server_in, ToServer, bind=True)
    scheduler: Receiver[Any] = Receiver(ctx, addrs.scheduler_in, ToScheduler, bind=True)
    args = ServerArgs(model_path=str(tok_dir), log_level="warning")
    proc = mp.get_context("spawn").Process(
        target=run_tokenizer_service, args=(args, addrs, model_info(str(tok_dir))), daemon=True
    )
    proc.start()
    try:
        ready = launcher.recv(timeout_ms=30_000)
        assert isinstance(ready, ProcessReady) and (ready.role, ready.pid) == (
            "tokenizer",
            proc.pid,
        )
        to_tok = Sender(ctx, addrs.tokenizer_in, bind=False)
        to_tok.send(request(text="Paris", sampling=SamplingParams(stop=[" the"], max_new_tokens=8)))
        treq = scheduler.recv(timeout_ms=10_000)
        assert treq == TokenizedRequest(
            rid="r",
            index=0,
            input_ids=[299, 273],
            sampling=SamplingParams(stop=[" the"], max_new_tokens=8),
        )
        to_tok.send(request(rid="bad", input_ids=[]))
        assert server.recv(timeout_ms=10_000) == RequestError(
            rid="bad", message="empty prompt: the prompt produced no tokens", param="prompt"
        )
        to_tok.send(TokenBatch([SeqOutput("r", 0, [273, 358, 286], None, None, None, 2, 0, 3)]))
        assert scheduler.recv(timeout_ms=10_000) == AbortRequest("r", 0, "stop")
        batch = server.recv(timeout_ms=10_000)
        assert batch == DeltaBatch(
            [TextDelta("r", 0, "is is", [273, 358, 286], None, "stop", " the", 2, 0, 3)]
        )
        assert proc.is_alive()
        to_tok.close()
    finally:
        proc.kill()
        proc.join(10)
        for r in (launcher, server, scheduler):
            r.close()
        ctx.term()
        shutil.rmtree(addrs.ipc_dir or "", ignore_errors=True)
