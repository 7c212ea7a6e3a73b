"""Hub ids as model paths: `--model-path org/name` served from the Hugging Face cache.

A hub id resolves to a snapshot directory of the Hugging Face cache (`--download-dir`, else
`$HF_HUB_CACHE`, else `$HF_HOME/hub`), always through huggingface_hub itself; nothing here reads
the cache's layout:

1. the cache first, without network (`snapshot_download(local_files_only=True)`): a snapshot
   that holds what serving needs (`PathKind.needs`) is used as it is, so a cached model starts
   without asking the hub whether its branch moved;
2. else, unless huggingface_hub is offline (`HF_HUB_OFFLINE`), `snapshot_download` fetches the
   files serving reads (`PathKind.allow`: config, safetensors weights, tokenizer and processor
   files; nothing in subfolders, no .bin or consolidated weights), with its progress bars.

Every failure is a ModelPathError with a one-line message (the launcher prints it and exits 2).
huggingface_hub is imported on the first hub id only (about 0.5 s of launcher start-up).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fovea.launcher")


class ModelPathError(ValueError):
    pass


@dataclass(frozen=True)
class PathKind:
    """What a path must lead to: `label` names the flag in messages, `allow` are the
    snapshot_download patterns fetched for it, and each group of `needs` must have a file in
    the snapshot for it to be used."""

    label: str
    noun: str
    allow: tuple[str, ...]
    needs: tuple[tuple[str, ...], ...]


_TOKENIZER_FILES = (
    "config.json",  # AutoTokenizer reads model_type here when tokenizer_config names no class
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",  # sentencepiece
    "*.tiktoken",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
MODEL = PathKind(
    label="model path",
    noun="Hugging Face model",
    allow=(
        *_TOKENIZER_FILES,
        "generation_config.json",
        "*.safetensors",
        "model.safetensors.index.json",
    ),
    needs=(("config.json",), ("model.safetensors", "model.safetensors.index.json")),
)
TOKENIZER = PathKind(
    label="tokenizer path",
    noun="Hugging Face tokenizer",
    allow=_TOKENIZER_FILES,
    needs=(("tokenizer.json", "tokenizer_config.json"),),
)
# fnmatch's `*` crosses `/`, so `*.safetensors` alone would also fetch e.g. `original/`; the
# loader reads the top level only, and Mistral-format `consolidated.safetensors` never.
_IGNORE = ("*/*", "consolidated*")


def is_hub_id(path: str) -> bool:
    """`org/name` as the hub spells repository ids (huggingface_hub's own validation)."""
    if path.count("/") != 1:
        return False
    # Its documented home; huggingface_hub.utils builds __all__ lazily, which mypy cannot see.
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    try:
        validate_repo_id(path)
    except ValueError:  # HFValidationError
        return False
    return True


def resolve_hub_id(
    repo_id: str, revision: str | None, cache_dir: str | None, kind: PathKind = MODEL
) -> str:
    """The snapshot directory of `repo_id` at `revision` (default: the default branch) in the
    Hugging Face cache at `cache_dir` (default: huggingface_hub's), downloaded into it when
    missing and huggingface_hub is not offline. Raises ModelPathError."""
    from huggingface_hub import constants, errors, snapshot_download

    rev = revision or constants.DEFAULT_REVISION
    # snapshot_download resolves the directory the same way; messages show what it searched.
    cache = str(Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve())
    allow, ignore = list(kind.allow), list(_IGNORE)
    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # newer huggingface_hub only
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=True,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except errors.LocalEntryNotFoundError as e:
        # A partial snapshot (an interrupted download) says so when its tree listing is cached.
        state = "is only partly in" if isinstance(e, incomplete) else "is not in"
    else:
        missing = _missing(snapshot, kind)
        if missing is None:
            return snapshot
        state = f"lacks {missing} in"
    if constants.HF_HUB_OFFLINE:
        raise ModelPathError(
            f"{kind.label} {repo_id!r} is not a directory, and as a hub id (revision {rev}) it "
            f"{state} the Hugging Face cache {cache}; HF_HUB_OFFLINE is set, so nothing was "
            "downloaded"
        )
    endpoint = constants.ENDPOINT
    log.info("downloading %s (revision %s) from %s into %s", repo_id, rev, endpoint, cache)
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            allow_patterns=allow,
            ignore_patterns=ignore,
        )
    except errors.GatedRepoError:
        raise ModelPathError(
            f"{kind.label} {repo_id!r} is gated on {endpoint}: accept its terms there, then "
            "log in (`hf auth login`, or HF_TOKEN)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ModelPathError(
            f"{kind.label} {repo_id!r} is not a directory, and {endpoint} has no repository "
            "of that name that this machine may read (a private one needs `hf auth login`, "
            "or HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise ModelPathError(
            f"{kind.label} {repo_id!r}: {endpoint} has no revision {rev!r}"
        ) from None
    except Exception as e:  # network and disk failures, in whatever type the client raises
        raise ModelPathError(
            f"{kind.label} {repo_id!r} {state} the Hugging Face cache {cache}, and downloading "
            f"revision {rev} from {endpoint} failed: {_first_line(e)}"
        ) from e
    missing = _missing(snapshot, kind)
    if missing is not None:
        raise ModelPathError(
            f"{kind.label} {repo_id!r}: revision {rev} on {endpoint} has no {missing}, so it is "
            f"not a {kind.noun}"
        )
    return snapshot


def _missing(snapshot: str, kind: PathKind) -> str | None:
    """The first group of `kind.needs` with no file in `snapshot`, as `a or b`; None if none."""
    for group in kind.needs:
        if not any(os.path.isfile(os.path.join(snapshot, name)) for name in group):
            return " or ".join(group)
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    cause = e.__cause__
    # snapshot_download wraps a connection failure; its cause says what failed.
    if cause is not None and str(cause).strip():
        text = f"{type(cause).__name__}: {str(cause).strip()}"
    return (text.splitlines() or [type(e).__name__])[0]
