"""Which settings are paths, and each local one made absolute before Ray starts.

Ray workers do not share the driver's working directory, so every local path is made absolute and
every Hub model id pinned to its commit when a config resolves; an object-store URL is allowed only
where the run reads or writes through fsspec (``URL_KEYS``). Apart from loading because the CLI and
the runner use it on its own: ``path_settings`` lists every path a run touches, ``absolute_paths``
resolves a config built in code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from grads_ray.config.errors import ConfigError

if TYPE_CHECKING:
    from grads_ray.config.sections import Config


def _absolute(path: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working directory);
    URLs (``s3://``, ``file://``, ...) and empty strings are left as they are."""
    if path.startswith("file://"):  # a local file URL is a local path (pyarrow.fs reads it so)
        from pyarrow.fs import FileSystem

        path = FileSystem.from_uri(path)[1]
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


PATH_KEYS = ("output", "model.path", "score.model", "score.cache_dir", "similarity.encoder_path")
# Settings that may be object-store URLs (s3://, gs://, ...): the run directory, the score cache and
# model folders (fetched into a node-local cache before loading; grads_ray/storage.py).
URL_KEYS = ("output", "score.cache_dir", "score.model", "model.path")
INPUT_PATH_LISTS = ("data.paths", "eval.domain_paths", "eval.general_paths", "select.less.target_paths")


def _owner(cfg: Config, key: str) -> tuple[Any, str]:
    """``a.b.c`` -> (the object holding ``c``, ``"c"``)."""
    *parents, name = key.split(".")
    obj: Any = cfg
    for part in parents:
        obj = getattr(obj, part)
    return obj, name


def path_settings(cfg: Config, keys: tuple[str, ...] = PATH_KEYS + INPUT_PATH_LISTS) -> list[tuple[str, str]]:
    """Every (key, path) among ``keys``, one entry per item of a list-valued key."""
    out = []
    for key in keys:
        value = getattr(*_owner(cfg, key))
        out += [(key, p) for p in (value if isinstance(value, list) else [value])]
    return out


def absolute_paths(cfg: Config) -> Config:
    """Every local path in the config made absolute, in place, and every Hub model id pinned to its
    commit (``grads_ray.hub``); an object-store URL where only local files are read (the inputs), or
    one whose protocol has no fsspec package installed, is an error before Ray starts. -> the same config."""
    from grads_ray import hub

    for key in hub.MODEL_KEYS:  # a Hub id (org/name[@rev]) pinned to the commit it names now
        obj, name = _owner(cfg, key)
        value = getattr(obj, name)
        if isinstance(value, str) and hub.is_hub_id(value):
            try:
                setattr(obj, name, hub.pin(value))
            except hub.HubError as exc:
                raise ConfigError(f"{key}: {exc}") from None
    for key in PATH_KEYS + INPUT_PATH_LISTS:
        obj, name = _owner(cfg, key)
        value = getattr(obj, name)
        setattr(obj, name, [_absolute(p) for p in value] if isinstance(value, list) else _absolute(value))
    if cfg.eval.wordnet not in ("auto", "none"):  # a folder: read by Ray workers, anywhere
        cfg.eval.wordnet = _absolute(cfg.eval.wordnet)
    for key, p in path_settings(cfg):
        if "://" not in p or (p.startswith(hub.PREFIX) and key in hub.MODEL_KEYS):
            continue
        if key not in URL_KEYS:
            raise ConfigError(f"{key}: {p}: input files are read from local paths (or file:// URLs); mount "
                              "object storage as a file system on every node (docs/cluster.md)")
        from grads_ray.storage import check_url

        try:
            check_url(p)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    return cfg
