"""Prometheus metrics (`--enable-metrics`), written by every process and served by the HTTP
process at /metrics.

Multi-process: the launcher points PROMETHEUS_MULTIPROC_DIR at a fresh directory before it
spawns the children, so each process writes its samples to its own mmap'd files and the HTTP
process merges them per scrape (prometheus_client's multiprocess mode). Names follow SGLang's
(`sglang:` → `fovea:`) where SGLang has one.

`get()` is None unless metrics are enabled, so call sites cost one attribute test when off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"

# Latency buckets (s): from a fast GPU decode step to a long CPU prefill.
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120)
# One model step (s): finer where decode steps fall.
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


@dataclass
class Metrics:
    prompt_tokens: Any
    generation_tokens: Any
    cached_tokens: Any
    images: Any
    images_encoded: Any
    num_running_reqs: Any
    num_queue_reqs: Any
    token_usage: Any
    cache_hit_rate: Any
    image_cache_hit_rate: Any
    image_cache_bytes: Any
    requests: Any
    time_to_first_token: Any
    inter_token_latency: Any
    e2e_request_latency: Any
    image_fetch: Any
    image_url_fetches: Any
    image_preprocess: Any
    step_forward: Any
    process_up: Any
    dp_route: Any
    dp_routed: Any


_metrics: Metrics | None = None


def enabled() -> bool:
    return bool(os.environ.get(ENV_DIR))


def get() -> Metrics | None:
    """The metrics of this process, created on first use; None when metrics are off."""
    global _metrics
    if _metrics is None and enabled():
        _metrics = _create()
    return _metrics


def _create() -> Metrics:
    from prometheus_client import Counter, Gauge, Histogram

    # The scheduler's figures are per replica: label dp_rank (--dp-size; "0" without).
    dp = ("dp_rank",)

    def gauge(name: str, doc: str) -> Any:
        # The newest value written by a live process (each replica's scheduler writes its own).
        return Gauge(name, doc, dp, multiprocess_mode="livemostrecent")

    return Metrics(
        prompt_tokens=Counter("fovea:prompt_tokens", "Prompt tokens admitted.", dp),
        generation_tokens=Counter("fovea:generation_tokens", "Tokens generated.", dp),
        cached_tokens=Counter(
            "fovea:cached_tokens", "Prompt tokens served by the prefix cache.", dp
        ),
        images=Counter("fovea:images", "Image inputs received.", dp),
        images_encoded=Counter("fovea:images_encoded", "Vision-encoder runs (cache misses).", dp),
        num_running_reqs=gauge("fovea:num_running_reqs", "Sequences running."),
        num_queue_reqs=gauge("fovea:num_queue_reqs", "Sequences waiting."),
        token_usage=gauge("fovea:token_usage", "Fraction of KV slots in use by requests."),
        cache_hit_rate=gauge("fovea:cache_hit_rate", "Prompt tokens served by the cache / all."),
        image_cache_hit_rate=gauge(
            "fovea:image_cache_hit_rate", "Images not encoded (prefix or encoder cache) / all."
        ),
        image_cache_bytes=gauge(
            "fovea:image_cache_bytes",
            "Bytes of vision-encoder outputs kept by image hash (rank 0; --mm-cache-mb bounds).",
        ),
        requests=Counter("fovea:requests", "Finished requests.", ["finish_reason"]),
        time_to_first_token=Histogram(
            "fovea:time_to_first_token_seconds", "Time to first token.", buckets=_LATENCY
        ),
        inter_token_latency=Histogram(
            "fovea:inter_token_latency_seconds", "Time between output tokens.", buckets=_LATENCY
        ),
        e2e_request_latency=Histogram(
            "fovea:e2e_request_latency_seconds", "Request latency.", buckets=_LATENCY
        ),
        image_fetch=Histogram(
            "fovea:image_fetch_seconds",
            "Fetching and decoding a request's images.",
            buckets=_LATENCY,
        ),
        image_url_fetches=Counter(
            "fovea:image_url_fetches",
            "http(s) image URLs loaded, by result: network (body downloaded), cache (no request: "
            "kept within --media-url-ttl, or joined a fetch in flight), revalidated (304).",
            ["result"],
        ),
        image_preprocess=Histogram(
            "fovea:image_preprocess_seconds", "Preprocessing one image.", buckets=_LATENCY
        ),
        step_forward=Histogram(
            "fovea:step_forward_seconds",
            "A step's forward and sampling in the worker (rank 0). kind: decode (one new token "
            "for each sequence, none new) or prefill (any other step). Against "
            "inter_token_latency, what a decode step costs outside the model.",
            ["kind", "dp_rank"],
            buckets=_STEP,
        ),
        process_up=Gauge(
            "fovea:process_up",
            "1 while the child process of a role is alive.",
            ["role"],
            multiprocess_mode="mostrecent",
        ),
        dp_route=Histogram(
            "fovea:dp_route_seconds",
            "--dp-size > 1: the router's decision for one request in the tokenizer service "
            "(its prefix matched against every replica's tree, and the loads compared).",
            buckets=(1e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.1),
        ),
        dp_routed=Counter(
            "fovea:dp_routed_requests",
            "--dp-size > 1: requests routed, by replica and reason: prefix (its longest cached "
            "prefix), load (the least loaded: no prefix above --dp-cache-threshold), imbalance "
            "(the least loaded: the loads spread past the balance thresholds), pinned (the "
            "request named its replica).",
            ["dp_rank", "reason"],
        ),
    )


def render() -> tuple[bytes, str]:
    """The merged samples of every process (for /metrics), and their content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST
