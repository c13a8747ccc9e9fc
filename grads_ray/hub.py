"""Models named the way the Hugging Face Hub names them: ``org/name`` or ``org/name@revision``.

Wherever a model folder is expected (``model.path``, ``score.model``, ``similarity.encoder_path``) a
Hub id may stand instead. When the config is loaded (on the driver) the id is pinned: its revision
(``main`` unless given; a branch, a tag or a commit) is resolved to the commit it names now, and the
setting becomes ``hf://org/name@<commit>``. That string is what the manifest records and what every
fingerprint reads, so a moved ``main`` rescores and a pinned commit never does. Each node then
fetches that commit into its own Hugging Face cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``) the first time it loads the model, with ``HF_TOKEN`` from the
environment; with ``HF_HUB_OFFLINE=1`` nothing is downloaded and the cache must hold it.

Only what a model folder needs is fetched: configs, safetensors weights, tokenizer files (never
pickled ``.bin`` weights). Ids are told from folders by their shape, ``org/name`` with one slash, and
only when no such local folder exists (``./org/name`` is always a folder).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

PREFIX = "hf://"
# the settings that name a model (or the encoder's) folder, and may name a Hub model instead
MODEL_KEYS = ("model.path", "score.model", "similarity.encoder_path")
ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "tokenizer*"]
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ID = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(ValueError):
    """A Hub id that cannot be resolved or fetched (not in the cache offline, no such repository)."""


def is_hub_id(value: str) -> bool:
    """``hf://org/name[@rev]``, or ``org/name[@rev]`` where no such local path exists."""
    if not value:
        return False
    if value.startswith(PREFIX):
        return _ID.match(value[len(PREFIX):]) is not None
    if "://" in value or value.startswith((".", "/", "~")) or Path(value).exists():
        return False
    return _ID.match(value) is not None


def parse(value: str) -> tuple[str, str | None]:
    """``[hf://]org/name[@rev]`` -> (``org/name``, rev or None)."""
    m = _ID.match(value[len(PREFIX):] if value.startswith(PREFIX) else value)
    if m is None:
        raise HubError(f"{value}: not a Hub model id (org/name or org/name@revision)")
    return m["repo"], m["rev"]


def offline() -> bool:
    """Whether the user asked for no downloads: ``HF_HUB_OFFLINE`` as they set it (the job keeps
    their setting in ``GRADS_RAY_HF_HUB_OFFLINE`` where it sets its own for Ray's workers)."""
    value = os.environ.get("GRADS_RAY_HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
    return value.strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> str:
    """The Hugging Face hub cache of this node, read from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return str(Path(home) / "hub")


def snapshot(value: str) -> tuple[Path, str]:
    """The local folder of a Hub model on this node, fetched if needed (unless offline), and its
    commit. -> (folder, 40-hex commit)."""
    repo, rev = parse(value)
    return _snapshot(repo, rev or "main", cache_dir(), offline())


@lru_cache(maxsize=64)
def _snapshot(repo: str, rev: str, cache: str, no_download: bool) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=no_download,
                                        allow_patterns=ALLOW, token=os.environ.get("HF_TOKEN") or None))
    except Exception as exc:  # noqa: BLE001 - every failure of the hub client becomes one readable line
        where = f"the Hugging Face cache {cache}" + (" (HF_HUB_OFFLINE is set: nothing is downloaded)"
                                                     if no_download else " or the Hub")
        raise HubError(f"{repo}@{rev}: not found in {where}: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
    commit = folder.name
    if not _COMMIT.match(commit):
        raise HubError(f"{repo}@{rev}: the cache holds it at {folder}, not under a commit")
    return folder, commit


def pin(value: str) -> str:
    """``[hf://]org/name[@rev]`` -> ``hf://org/name@<commit>``, resolving the revision now (a commit
    stays as it is, without a lookup)."""
    repo, rev = parse(value)
    if rev and _COMMIT.match(rev):
        return f"{PREFIX}{repo}@{rev}"
    return f"{PREFIX}{repo}@{snapshot(value)[1]}"


def worker_env() -> dict[str, str]:
    """Environment for Ray's workers: the user's Hub settings, passed on as set on the driver."""
    out = {k: os.environ[k] for k in ("HF_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT") if os.environ.get(k)}
    out["GRADS_RAY_HF_HUB_OFFLINE"] = "1" if offline() else "0"
    return out
