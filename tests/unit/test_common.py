"""common/: config parsing, message codec, sampling validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fovea.common.codec import Decoder, Encoder
from fovea.common.config import ServerArgs, parse_args
from fovea.common.messages import (
    AbortRequest,
    StepPlan,
    TokenizedRequest,
    ToScheduler,
    ToWorker,
)
from fovea.common.model_config import ModelConfigError, read_model_info, tp_size_problem
from fovea.common.sampling import SamplingError, SamplingParams, validate_sampling


def test_cli_env_and_defaults() -> None:
    env = {"FOVEA_PORT": "8123", "FOVEA_DISABLE_RADIX_CACHE": "true", "FOVEA_TP_SIZE": "2"}
    args = parse_args(["--model-path", "m", "--tp-size", "4"], env=env)
    assert isinstance(args, ServerArgs)
    assert (args.model_path, args.port, args.tp_size, args.disable_radix_cache) == ("m", 8123, 4, True)
    assert args.page_size == 1 and args.dtype == "auto"
    assert args.model_name == "m"


def test_cli_bad_env_value_exits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(["--model-path", "m"], env={"FOVEA_PORT": "eighty"})
    assert e.value.code == 2
    assert "bad value in FOVEA_PORT" in capsys.readouterr().err


def test_codec_roundtrip_with_array_frames() -> None:
    enc, dec = Encoder(), Decoder(ToScheduler)
    msg = TokenizedRequest(rid="r1", index=2, input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=4))
    frames = enc.encode(msg)
    assert len(frames) == 1
    assert dec.decode(frames) == msg
    assert dec.decode(enc.encode(AbortRequest("r1", None, "client"))) == AbortRequest("r1", None, "client")

    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    frames = Encoder().encode({"pixels": arr})
    assert len(frames) == 2 and bytes(frames[1]) == arr.tobytes()
    out = Decoder(dict).decode([bytes(f) for f in frames])
    assert out["pixels"].dtype == np.float32 and out["pixels"].tolist() == arr.tolist()


def test_socket_union_rejects_foreign_message() -> None:
    import msgspec

    frames = Encoder().encode(AbortRequest("x"))
    with pytest.raises(msgspec.ValidationError):
        Decoder(ToWorker).decode(frames)
    plan = StepPlan(step=3, new=[], chunks=[], dropped=["a#0"])
    assert Decoder(ToWorker).decode(Encoder().encode(plan)) == plan


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"max_new_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"stop": [""]}, "stop"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_tokens"),
        ({"seed": -1}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("inf")}, "top_p"),
        ({"repetition_penalty": float("-inf")}, "repetition_penalty"),
        ({"max_new_tokens": 2**64}, "max_tokens"),
        ({"top_k": 2**63}, "top_k"),
        ({"stop": ["x" * 1025]}, "stop"),
        ({"stop_token_ids": [2**63]}, "stop_token_ids"),
        ({"stop_token_ids": [1] * 1025}, "stop_token_ids"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"logit_bias": dict.fromkeys(range(1025), 1.0)}, "logit_bias"),
    ],
)
def test_sampling_validation_names_the_param(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(SamplingError) as e:
        validate_sampling(SamplingParams(**kwargs))  # type: ignore[arg-type]
    assert e.value.param == param


def test_sampling_validation_against_the_model() -> None:
    ok = SamplingParams(max_new_tokens=64, logit_bias={0: -100.0, 511: 100.0}, stop=["x" * 1024])
    validate_sampling(ok, vocab_size=512, context_length=64)
    with pytest.raises(SamplingError, match=r"^logit_bias key 512 is not a token id: the "):
        validate_sampling(SamplingParams(logit_bias={512: 1.0}), vocab_size=512)
    with pytest.raises(SamplingError, match=r"^max_tokens is 65, more than this model's maximum "):
        validate_sampling(SamplingParams(max_new_tokens=65), context_length=64)
    with pytest.raises(SamplingError, match=r"^temperature must be a finite number, got nan$"):
        validate_sampling(SamplingParams(temperature=float("nan")))


def test_sampling_defaults_valid_and_greedy() -> None:
    validate_sampling(SamplingParams())
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy


def test_model_info(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                    "max_position_embeddings": 2048, "vocab_size": 100, "eos_token_id": 2})
    )  # fmt: skip
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    info = read_model_info(str(tmp_path))
    assert (info.context_length, info.eos_token_ids, info.vocab_size) == (2048, [2, 7], 100)
    assert read_model_info(str(tmp_path), 512).context_length == 512
    with pytest.raises(ModelConfigError, match="exceeds the model's 2048 positions"):
        read_model_info(str(tmp_path), 4096)
    with pytest.raises(ModelConfigError, match="is not a directory"):
        read_model_info(str(tmp_path / "nope"))


def test_tp_size_counts_a_tower_that_splits_its_heads() -> None:
    cfg = {
        "architectures": ["MllamaForConditionalGeneration"],
        "text_config": {"num_attention_heads": 8, "num_key_value_heads": 2,
                        "intermediate_size": 64},
        "vision_config": {"num_attention_heads": 6, "intermediate_size": 48},
    }  # fmt: skip
    assert tp_size_problem(cfg, 2) is None
    assert tp_size_problem(cfg, 4) == (
        "--tp-size 4 cannot split this model (8 attention heads, 2 KV heads, MLP width 64, "
        "vision heads 6, vision MLP width 48); valid sizes: 1, 2"
    )
    # Qwen2-VL's tower keeps its attention whole: its heads do not limit tp.
    qwen = cfg | {"architectures": ["Qwen2VLForConditionalGeneration"]}
    assert tp_size_problem(qwen, 4) is None


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_async_receiver_loses_nothing_around_its_waits(loop: str, tmp_path: Path) -> None:
    """Queued before the first recv, arriving while the consumer is busy (the FD fires with
    nobody waiting), and arriving while it waits: every message, in order, no hang."""
    import asyncio
    import threading

    import uvloop
    import zmq

    from fovea.common.ipc import AsyncReceiver, Sender

    addr = f"ipc://{tmp_path}/rx"
    ctx: zmq.Context[Any] = zmq.Context()
    rx: AsyncReceiver[ToScheduler] = AsyncReceiver(ctx, addr, ToScheduler, bind=True)
    tx = Sender(ctx, addr, bind=False)
    got: list[str] = []

    async def take(n: int) -> None:
        for _ in range(n):
            msg = await asyncio.wait_for(rx.recv(), 5)
            assert isinstance(msg, AbortRequest)
            got.append(msg.rid)

    async def main() -> None:
        tx.send(AbortRequest("a"))
        tx.send(AbortRequest("b"))
        await take(2)
        tx.send(AbortRequest("c"))
        await asyncio.sleep(0.05)  # busy elsewhere: the loop sees the FD with no waiter
        tx.send(AbortRequest("d"))
        await asyncio.sleep(0.05)
        await take(2)
        later = threading.Timer(0.05, lambda: [tx.send(AbortRequest(r)) for r in "ef"])
        later.start()
        await take(2)
        later.join()

    try:
        (uvloop.run if loop == "uvloop" else asyncio.run)(main())
    finally:
        rx.close()
        tx.close()
        ctx.term()
    assert got == ["a", "b", "c", "d", "e", "f"]
