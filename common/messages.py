"""Every message that crosses a process boundary, grouped by the edge it crosses.

Data only: msgspec Structs, msgpack on the wire, no pickle. Each receiving socket decodes a
Union of the tagged structs it may get (the `To*` aliases at the bottom), so a socket rejects
a message that was never meant for it.

A request's identity: the server names it `rid`; a request with n > 1 becomes n sequences
`(rid, index)` at the tokenizer. The scheduler and workers key sequences by `seq_key(rid, index)`.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from fovea.common.sampling import SamplingParams


def seq_key(rid: str, index: int) -> str:
    return f"{rid}#{index}"


# ---------------------------------------------------------------- server -> tokenizer


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    # A string, or OpenAI content parts ({"type": "text", "text": ...}); None for an
    # assistant turn that only carried tool calls.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    # An assistant turn's calls as OpenAI shapes them, but with each function's arguments
    # decoded from their JSON string (templates write `arguments | tojson`).
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None  # a tool turn: the call it answers


class ImageRef(msgspec.Struct, array_like=True, frozen=True):
    """An image as a client gave it, unfetched: exactly one of `url` (http(s) URL, data URI,
    local path or file:// URL) and `data` (the file's bytes) is set."""

    url: str | None = None
    data: bytes | None = None


class VideoRef(msgspec.Struct, array_like=True, frozen=True):
    """A video as a client gave it, unfetched: exactly one of `url` and `data` (as ImageRef)
    or `frames` (image URLs, one per frame, all taken: SGLang's image parts with "modalities":
    "video"), and the sampling the client asked for (None: the server's default). `fps`: frames
    sampled per second of video; `max_frames`: most frames sampled; `min_pixels`/`max_pixels`:
    the per-frame pixel range where the family resizes by pixel count (Qwen2-VL)."""

    url: str | None = None
    data: bytes | None = None
    fps: float | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    frames: list[str] | None = None


class GenerateRequest(msgspec.Struct, tag=True, kw_only=True):
    """Exactly one of `text`, `input_ids` and `messages` is set (the server checks).
    Images of a chat request are parts of its messages; `images` carries those of a raw
    prompt (the offline Engine), one per image placeholder in the prompt."""

    rid: str
    sampling: SamplingParams
    text: str | None = None
    input_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    # The last (assistant) message stays open: the model continues its text.
    continue_final_message: bool = False
    # Extra variables for the chat template (e.g. enable_thinking).
    chat_template_kwargs: dict[str, Any] = {}
    # Function tools the chat template renders (OpenAI's shape, as the client sent them).
    tools: list[dict[str, Any]] = []
    images: list[ImageRef] = []
    videos: list[VideoRef] = []  # a raw prompt's videos, one per video placeholder
    arrival_time: float = 0.0
    # --dp-size > 1: the replica to run on (SGLang's data_parallel_rank); None: routed.
    dp_rank: int | None = None


# ---------------------------------------------------------------- tokenizer -> scheduler


class ImageInput(msgspec.Struct, array_like=True, gc=False):
    """One image of a tokenized prompt, ready for the vision encoder. Its placeholder tokens are
    `input_ids[offset : offset + num_tokens]`; the encoder yields one embedding per placeholder.
    `pixel_values` travels as its own zero-copy frame."""

    hash: bytes  # 32-byte blake2b digest of the image file's bytes
    offset: int
    num_tokens: int
    # float32, normalized, in the family's layout (Qwen2-VL: [patches, C*T*P*P]); or, where
    # pixel_scale is set, a still image's raw uint8 values (Qwen2-VL: [patches, C*P*P], one
    # frame) whose normalized value is raw * pixel_scale[c] + pixel_shift[c].
    pixel_values: np.ndarray
    grid: list[int]  # the family's geometry (Qwen2-VL: [t, h, w] in patches)
    # A video's seconds per temporal grid step (Qwen2.5-VL's M-RoPE spaces its frames by
    # tokens_per_second * this); 0.0 for a still image.
    second_per_grid_t: float = 0.0
    pixel_scale: list[float] = []  # per channel; empty: pixel_values is normalized float32
    pixel_shift: list[float] = []


class TokenizedRequest(msgspec.Struct, tag=True, kw_only=True):
    """One sequence to generate. `sampling.max_new_tokens` is resolved (never None)."""

    rid: str
    index: int
    input_ids: list[int]
    sampling: SamplingParams
    images: list[ImageInput] = []  # in prompt order, spans disjoint
    arrival_time: float = 0.0


# ---------------------------------------------------------------- server/detokenizer -> scheduler


class AbortRequest(msgspec.Struct, tag=True):
    """Stop a request's sequences and free their KV slots. index None: every sequence."""

    rid: str
    index: int | None = None
    # "client" (disconnect), "stop" (detokenizer matched a stop string), "shutdown".
    reason: str = "client"


class StatsRequest(msgspec.Struct, tag=True):
    query_id: str
    # Also empty the prefix cache first, if no request runs or waits (/flush_cache).
    flush_cache: bool = False


# ---------------------------------------------------------------- scheduler -> server


class SchedulerStats(msgspec.Struct, tag=True, kw_only=True):
    """A snapshot of the scheduler. Invariant with nothing running:
    free_slots + tree_slots == total_slots."""

    query_id: str
    total_slots: int
    free_slots: int
    tree_slots: int
    evictable_slots: int
    running: int
    waiting: int
    waiting_tokens: int = 0  # tokens of the waiting sequences (prompts, and outputs if retracted)
    steps: int
    cache_hit_tokens: int
    prompt_tokens: int
    generated_tokens: int
    images_encoded: int = 0  # vision-encoder runs on rank 0 since start
    # Bytes rank 0's vision-encoder output cache holds (bounded by --mm-cache-mb): it grows
    # with every new image until full, so a soak's worker memory grows by up to that much.
    image_cache_bytes: int = 0
    retractions: int = 0  # sequences sent back to the queue for lack of KV memory
    # Cross-attention image state (Mllama): slots in the workers' pool, free ones, references
    # to slots in use by running sequences (more than the slots in use when images are
    # shared), slots with two or more references, and images whose K/V rank 0 computed since
    # start (a shared or still-held image's K/V are not computed again).
    # Invariant with nothing running: free_image_slots == image_slots, image_slot_users == 0.
    image_slots: int = 0
    free_image_slots: int = 0
    image_slot_users: int = 0
    shared_image_slots: int = 0
    cross_kv_computed: int = 0
    # What the workers' pools hold per token (worker/kv_pool.py KVLayout): kind "kv" (K and V
    # rows) or "mla_latent" (one latent row), the same in both pools; bytes a token takes in
    # the global pool and in the local one, on each rank, all the pool's layers.
    kv_kind: str = "kv"
    kv_bytes_per_token: int = 0
    local_kv_bytes_per_token: int = 0
    # The sliding-window layers' pool (0 when the model keeps one pool); invariant with
    # nothing running: local_free_slots + local_tree_slots == local_slots.
    local_slots: int = 0
    local_free_slots: int = 0
    local_tree_slots: int = 0
    local_freed_early: int = 0  # local slots running sequences gave back (left the window)
    sliding_window: int = 0
    flushed: bool = False  # the StatsRequest asked to flush the cache, and it was emptied
    dp_rank: int = 0  # the replica (--dp-size)


class RequestError(msgspec.Struct, tag=True, kw_only=True):
    """A request failed before producing output (sent by tokenizer or scheduler)."""

    rid: str
    message: str
    status: int = 400
    param: str | None = None


# ---------------------------------------------------------------- scheduler -> worker (PUB)


class NewSequence(msgspec.Struct, array_like=True, gc=False):
    """Sent once per admission (again after a retraction). `input_ids` is every token known so
    far (prompt, plus output generated before a retraction); the first `len(prefix_slots)` of
    them already have KV in those slots (a radix-cache hit)."""

    key: str
    input_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingParams
    prefix_slots: list[int]
    images: list[ImageInput] = []  # every image of the prompt, cached prefix or not
    # Cross-attention images (Mllama): each image's slot in the workers' image pool, shared by
    # every sequence with that image (scheduler/cross_images.py); [] for other models.
    image_slots: list[int] = []
    # With a local (sliding-window) pool: the prefix's local slots, 0 where freed (no local
    # layer reads them: they lie outside every window).
    prefix_local_slots: list[int] = []


class ScheduledChunk(msgspec.Struct, array_like=True, gc=False):
    """Compute `len(new_slots)` more tokens of sequence `key`, writing their KV to `new_slots`.
    `sample`: the chunk reaches the end of the known tokens, so sample the next one."""

    key: str
    new_slots: list[int]
    sample: bool
    # With a local (sliding-window) pool: where the local layers' K/V of the same tokens go.
    new_local_slots: list[int] = []


class StepPlan(msgspec.Struct, tag=True, gc=False):
    """One forward pass: a diff against what the workers already hold."""

    step: int
    new: list[NewSequence]
    chunks: list[ScheduledChunk]
    # Sequences the workers forget before this step (finished, aborted, retracted).
    dropped: list[str]
    # Images of waiting prompts to encode ahead of their prefill, a slice per step (each hash
    # sent once; worker/encode_ahead.py).
    encode: list[ImageInput] = []


class SyncPing(msgspec.Struct, tag=True):
    """Repeated by the scheduler until every rank answers: PUB/SUB drops messages sent before a
    subscriber has joined, so no plan is sent until all ranks have answered."""

    nonce: int


class Shutdown(msgspec.Struct, tag=True):
    pass


class KeepAlive(msgspec.Struct, tag=True):
    """Sent by the scheduler between steps, at most once a second. Every rank answers with
    WorkerAlive; a worker on another node exits when these stop coming."""

    seq: int


# ---------------------------------------------------------------- worker -> scheduler


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False):
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class WorkerReady(msgspec.Struct, tag=True, kw_only=True):
    nonce: int
    rank: int
    num_slots: int  # KV slots in the pool (same on every rank)
    # Slots of the local (sliding-window) layers' pool, and their window; 0: one pool.
    num_local_slots: int = 0
    sliding_window: int = 0
    max_seqs: int  # rows in the worker's request table
    device: str  # torch device type the rank computes on: "cpu", "cuda"
    # Images whose cross-attention K/V the rank can hold at once (Mllama); 0: no such state.
    cross_image_slots: int = 0
    kv_kind: str = "kv"  # what the KV pools hold per token (worker/kv_pool.py KVLayout)
    kv_bytes_per_token: int = 0  # in the global pool, on this rank, all its layers
    local_kv_bytes_per_token: int = 0  # in the local pool (0: one pool)
    encode_ahead: bool = False  # takes StepPlan.encode (worker/encode_ahead.py)


class StepResult(msgspec.Struct, tag=True, gc=False):
    """For each chunk of the plan with sample=True, in plan order: the sampled token."""

    step: int
    keys: list[str]
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    forward_s: float
    images_encoded: int = 0  # vision-encoder runs this step (cache misses)
    # Per chunk of a sequence computing prompt logprobs, by key: the entries of the prompt
    # positions after those it computed: a chunk of tokens [start, end) gives the entries of
    # prompt tokens start+1 .. min(end, num_prompt - 1), in order (possibly none).
    prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
    cross_kv_computed: int = 0  # image slots whose cross-attention K/V were written this step
    # Hashes of images sent in `StepPlan.encode` whose encoder outputs are ready now.
    images_ready: list[bytes] = []
    image_cache_bytes: int = 0  # what the encoder output cache holds after this step


class WorkerAlive(msgspec.Struct, tag=True):
    """A rank's answer to KeepAlive `seq`."""

    rank: int
    seq: int


class WorkerFailed(msgspec.Struct, tag=True):
    """A step raised; the worker reports it and exits (the launcher then stops the server)."""

    rank: int
    message: str


# ---------------------------------------------------------------- scheduler -> tokenizer service (detokenize)


class SeqOutput(msgspec.Struct, array_like=True, gc=False):
    rid: str
    index: int
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    matched_stop: int | None  # the stop token id that finished it, if any
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    # SamplingParams.prompt_logprobs, on a sequence's first output only: entry i for prompt
    # token i (entry 0 None), length == prompt_tokens.
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class TokenBatch(msgspec.Struct, tag=True, gc=False):
    outputs: list[SeqOutput]


# ---------------------------------------------------------------- scheduler -> tokenizer service (routing)


class TreeEvent(msgspec.Struct, array_like=True, gc=False):
    """One change of a replica's prefix tree, keys as the tree holds them (image placeholders
    as hash values). removed == 0: `key` (page-aligned, from the root) was inserted; else the
    last `removed` tokens of the cached path `key` were evicted (a leaf, or its tail)."""

    key: list[int]
    removed: int = 0


class ReplicaState(msgspec.Struct, tag=True, gc=False):
    """A replica's changes for the router (--dp-size > 1), sent before the round's TokenBatch:
    its tree's events since the last ReplicaState, in order, and its load once it had taken in
    its first `seen` TokenizedRequests."""

    dp_rank: int
    events: list[TreeEvent]
    seen: int
    load_tokens: int  # tokens of its waiting and running sequences


# ---------------------------------------------------------------- tokenizer service -> server


class TopLogprob(msgspec.Struct, array_like=True, gc=False):
    token: str
    token_id: int
    logprob: float


class TextLogprob(msgspec.Struct, array_like=True, gc=False):
    token: str
    token_id: int
    logprob: float
    top: list[TopLogprob]


class TextDelta(msgspec.Struct, array_like=True, gc=False):
    rid: str
    index: int
    text: str  # new text since the last delta
    token_ids: list[int]  # new tokens since the last delta
    logprobs: list[TextLogprob] | None
    finish_reason: str | None
    matched_stop: int | str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    # SamplingParams.prompt_logprobs, on the first delta of each index (the same list for
    # every index): entry i for prompt token i, length == prompt_tokens. Entry 0 has its
    # token's text and id but no logprob (nan) and no alternatives: nothing precedes it.
    prompt_logprobs: list[TextLogprob] | None = None


class DeltaBatch(msgspec.Struct, tag=True, gc=False):
    deltas: list[TextDelta]


# ---------------------------------------------------------------- any child -> launcher


class ProcessReady(msgspec.Struct, tag=True, kw_only=True):
    role: str
    pid: int
    info: dict[str, str] = {}


class Heartbeat(msgspec.Struct, tag=True):
    """The scheduler's loop is alive (sent at most once a second). The launcher pings the
    systemd watchdog only while these keep coming."""

    role: str


# ---------------------------------------------------------------- what each socket accepts

# The tokenizer service tokenizes (GenerateRequest from the server) and detokenizes (TokenBatch
# from the scheduler) in one process, so a request's stop strings are known before its tokens.
ToTokenizer = GenerateRequest | TokenBatch | ReplicaState
ToScheduler = TokenizedRequest | AbortRequest | StatsRequest
ToWorker = StepPlan | SyncPing | KeepAlive | Shutdown
FromWorker = WorkerReady | StepResult | WorkerAlive | WorkerFailed
ToServer = DeltaBatch | RequestError | SchedulerStats
ToLauncher = ProcessReady | Heartbeat
