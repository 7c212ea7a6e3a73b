"""Hub ids as model paths (launcher/model_source.py). A stand-in hub served here over HTTP
(HF_ENDPOINT) answers the four requests snapshot_download makes, so huggingface_hub's own download
code lays out a real cache; a second resolution with HF_HUB_OFFLINE=1 must find it there without
a request. Bad paths through the real CLI: one line on stderr, exit code 2.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when imported, so resolutions that
depend on them run in subprocesses; in-process ones name the cache (download_dir) instead."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from stand_in_hub import StandInHub

from fovea.common.config import ServerArgs
from fovea.launcher.launch import prepare

MAIN = hashlib.sha1(b"main").hexdigest()
V1 = hashlib.sha1(b"v1").hexdigest()
TOKENIZER_ONLY = hashlib.sha1(b"tokenizer-only").hexdigest()
NO_CONFIG = hashlib.sha1(b"no-config").hexdigest()
# What serving reads of the tiny checkpoint; the stand-in repo also holds files it must not fetch.
SERVED_FILES = [
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]
NOT_FETCHED = ["README.md", "consolidated.safetensors", "original/params.json", "pytorch_model.bin"]


def _checkout(src: Path, dst: Path, extra: dict[str, str]) -> Path:
    shutil.copytree(src, dst)
    for name, text in extra.items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_text(text)
    return dst


@pytest.fixture(scope="module")
def hub(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandInHub]:
    repos_dir = tmp_path_factory.mktemp("repos")
    main = _checkout(tiny_llama, repos_dir / "main", dict.fromkeys(NOT_FETCHED, "not served"))
    v1 = _checkout(tiny_llama, repos_dir / "v1", {})
    cfg = json.loads((v1 / "config.json").read_text())
    (v1 / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 512}))
    tok = repos_dir / "tokenizer-only"
    tok.mkdir()
    no_config = repos_dir / "no-config"
    no_config.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, tok / name)
    for name in ("tokenizer.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, no_config / name)
    server = StandInHub(
        {
            "tiny-org/tiny-llama": {"main": (MAIN, main), "v1": (V1, v1)},
            "tiny-org/tokenizer-only": {"main": (TOKENIZER_ONLY, tok)},
            "tiny-org/no-config": {"main": (NO_CONFIG, no_config)},
        }
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _env(hf_home: Path, endpoint: str | None = None, offline: bool = False) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith(("HF_", "HUGGINGFACE_"))
    }
    env.pop("TRANSFORMERS_OFFLINE", None)
    env["HF_HOME"] = str(hf_home)
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


# Each (path, revision, kind) resolved in one subprocess: the snapshot directory or the error.
_RESOLVE = """
import json, sys
from fovea.launcher.builtin_models import resolve_model_path
from fovea.launcher.model_source import MODEL, TOKENIZER, ModelPathError
out = []
for path, revision, kind in json.loads(sys.argv[1]):
    try:
        out.append(resolve_model_path(path, revision, None, TOKENIZER if kind else MODEL))
    except ModelPathError as e:
        out.append(f"error: {e}")
print(json.dumps(out))
"""
CASES = [
    ("tiny-org/tiny-llama", None, False),
    ("tiny-org/tiny-llama", "v1", False),
    ("tiny-org/tokenizer-only", None, True),
    ("tiny-org/no-config", None, False),
    ("tiny-org/absent", None, False),
    ("tiny-org/tiny-llama", "nope", False),
]


def resolve_in_subprocess(env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", _RESOLVE, json.dumps(CASES)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result: list[str] = json.loads(out.stdout.splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def hf_home(hub: StandInHub, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-home").resolve()


@pytest.fixture(scope="module")
def downloaded(hub: StandInHub, hf_home: Path) -> list[str]:
    """CASES resolved with the stand-in hub reachable: the cache is empty, so each downloads."""
    return resolve_in_subprocess(_env(hf_home, hub.url))


def snapshot(hf_home: Path, repo: str, commit: str) -> str:
    return str(hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit)


def files_in(directory: str) -> list[str]:
    root = Path(directory)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_download_fetches_what_serving_reads(
    downloaded: list[str], hub: StandInHub, hf_home: Path
) -> None:
    assert downloaded == [
        snapshot(hf_home, "tiny-org/tiny-llama", MAIN),
        snapshot(hf_home, "tiny-org/tiny-llama", V1),
        snapshot(hf_home, "tiny-org/tokenizer-only", TOKENIZER_ONLY),
        "error: model path 'tiny-org/no-config': revision main on "
        f"{hub.url} has no config.json, so it is not a Hugging Face model",
        f"error: model path 'tiny-org/absent' is not a directory, and {hub.url} has no "
        "repository of that name that this machine may read (a private one needs "
        "`hf auth login`, or HF_TOKEN)",
        f"error: model path 'tiny-org/tiny-llama': {hub.url} has no revision 'nope'",
    ]
    assert files_in(downloaded[0]) == SERVED_FILES
    assert files_in(downloaded[1]) == SERVED_FILES
    assert (
        json.loads(Path(downloaded[1], "config.json").read_text())["max_position_embeddings"] == 512
    )
    assert files_in(downloaded[2]) == ["tokenizer.json", "tokenizer_config.json"]
    # Files are asked for (HEAD) by commit; only those serving reads. (v1's other files are
    # not fetched again: their blobs, by ETag, are in the cache already.)
    asked = {r.partition("/resolve/")[2] for r in hub.requests if r.startswith("HEAD /tiny-org/")}
    assert asked == {f"{c}/{f}" for c in (MAIN, V1) for f in SERVED_FILES} | {
        f"{TOKENIZER_ONLY}/tokenizer.json",
        f"{TOKENIZER_ONLY}/tokenizer_config.json",
        f"{NO_CONFIG}/tokenizer.json",
        f"{NO_CONFIG}/model.safetensors",
    }


@pytest.mark.slow
def test_offline_resolves_from_the_cache_without_a_request(
    downloaded: list[str], hub: StandInHub, hf_home: Path
) -> None:
    before = len(hub.requests)
    offline = resolve_in_subprocess(_env(hf_home, hub.url, offline=True))
    assert len(hub.requests) == before
    cache = hf_home / "hub"
    assert offline == [
        *downloaded[:3],
        "error: model path 'tiny-org/no-config' is not a directory, and as a hub id (revision "
        f"main) it lacks config.json in the Hugging Face cache {cache}; HF_HUB_OFFLINE is set, "
        "so nothing was downloaded",
        "error: model path 'tiny-org/absent' is not a directory, and as a hub id (revision "
        f"main) it is not in the Hugging Face cache {cache}; HF_HUB_OFFLINE is set, so nothing "
        "was downloaded",
        "error: model path 'tiny-org/tiny-llama' is not a directory, and as a hub id (revision "
        f"nope) it is not in the Hugging Face cache {cache}; HF_HUB_OFFLINE is set, so nothing "
        "was downloaded",
    ]


@pytest.mark.slow
def test_prepare_reads_the_cached_checkpoint(
    downloaded: list[str], hf_home: Path, tiny_llama: Path
) -> None:
    from fovea.tokenizer_service.tokenizer import load_hf_tokenizer

    args, model = prepare(
        ServerArgs(
            model_path="tiny-org/tiny-llama",
            tokenizer_path="tiny-org/tokenizer-only",
            download_dir=str(hf_home / "hub"),
        )
    )
    assert (args.model_path, args.tokenizer_path, args.served_model_name) == (
        downloaded[0],
        downloaded[2],
        "tiny-org/tiny-llama",
    )
    assert (model.path, model.architecture, model.context_length) == (
        downloaded[0],
        "LlamaForCausalLM",
        1024,
    )
    # The tokenizer snapshot holds symlinks into the cache's blobs; transformers reads them.
    assert (
        load_hf_tokenizer(downloaded[2])("Paris")["input_ids"]
        == load_hf_tokenizer(str(tiny_llama))("Paris")["input_ids"]
    )
    args, model = prepare(
        ServerArgs(
            model_path="tiny-org/tiny-llama",
            tokenizer_path="tiny-org/tiny-llama",
            revision="v1",
            download_dir=str(hf_home / "hub"),
        )
    )
    assert (args.model_path, args.tokenizer_path, model.context_length) == (
        downloaded[1],
        downloaded[1],
        512,
    )


@pytest.mark.slow
def test_engine_serves_a_hub_id(downloaded: list[str], hf_home: Path, tiny_llama: Path) -> None:
    """The children read the resolved snapshots (weights and tokenizer through the cache's
    symlinks): greedy tokens equal transformers' on the original directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fovea import Engine

    ids = AutoTokenizer.from_pretrained(tiny_llama)("The quick brown fox")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)  # eval mode
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    expected = [int(t) for t in out[0, len(ids) :]]
    with Engine(
        model_path="tiny-org/tiny-llama",
        revision="v1",
        tokenizer_path="tiny-org/tokenizer-only",
        download_dir=str(hf_home / "hub"),
        max_total_tokens=2000,
        dtype="float32",
    ) as llm:
        assert (llm.args.model_path, llm.model.context_length) == (downloaded[1], 512)
        assert llm.args.tokenizer_path == downloaded[2]
        greedy = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
        assert llm.generate("The quick brown fox", greedy)["output_ids"] == expected


# --- bad paths through the CLI ---------------------------------------------------------------


def _cli_cases(tmp: Path, cache: Path) -> dict[str, tuple[list[str], str]]:
    offline = "HF_HUB_OFFLINE is set, so nothing was downloaded"
    return {
        "missing directory": (
            ["--model-path", str(tmp / "nope")],
            f"model path '{tmp / 'nope'}' is neither a directory, a built-in alias "
            "(SmolLM2-135M-Instruct, fovea-demo-vlm) nor a hub id (org/name)",
        ),
        "hub id not cached": (
            ["--model-path", "tiny-org/absent"],
            "model path 'tiny-org/absent' is not a directory, and as a hub id (revision main) "
            f"it is not in the Hugging Face cache {cache}; {offline}",
        ),
        "file": (
            ["--model-path", str(tmp / "config.json")],
            f"model path '{tmp / 'config.json'}' is a file, not a directory",
        ),
        "cached without config.json": (
            ["--model-path", "tiny-org/no-config"],
            "model path 'tiny-org/no-config' is not a directory, and as a hub id (revision main) "
            f"it lacks config.json in the Hugging Face cache {cache}; {offline}",
        ),
        "tokenizer hub id not cached": (
            ["--model-path", str(tmp), "--tokenizer-path", "tiny-org/absent", "--revision", "v1"],
            "tokenizer path 'tiny-org/absent' is not a directory, and as a hub id (revision "
            f"main) it is not in the Hugging Face cache {cache}; {offline}",
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["missing directory", "hub id not cached", "file", "cached without config.json",
     "tokenizer hub id not cached"],
)  # fmt: skip
def test_bad_model_path_is_one_line_and_exit_2(
    case: str, downloaded: list[str], hf_home: Path, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text("{}")
    argv, message = _cli_cases(tmp_path, hf_home / "hub")[case]
    out = subprocess.run(
        [sys.executable, "-m", "fovea.launch_server", *argv],
        capture_output=True, text=True, timeout=120, env=_env(hf_home, offline=True),
    )  # fmt: skip
    assert (out.returncode, out.stderr.splitlines()) == (2, [f"launch_server: error: {message}"])


@pytest.mark.slow
def test_unreachable_hub_names_the_failure(tmp_path: Path) -> None:
    endpoint = "http://127.0.0.1:1"  # nothing listens on port 1
    out = subprocess.run(
        [sys.executable, "-m", "fovea.launch_server", "--model-path", "tiny-org/absent"],
        capture_output=True, text=True, timeout=120, env=_env(tmp_path, endpoint),
    )  # fmt: skip
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == (
        "launch_server: error: model path 'tiny-org/absent' is not in the Hugging Face cache "
        f"{tmp_path.resolve() / 'hub'}, and downloading revision main from {endpoint} failed: "
        "ConnectError: [Errno 111] Connection refused"
    )
