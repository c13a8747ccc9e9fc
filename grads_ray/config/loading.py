"""Resolving a config: defaults, YAML, ``key=value`` overrides and settings made in code, built into
the tree (sections.py) with errors that name the key, paths made absolute (paths.py), then validated,
all before Ray starts.

The checks themselves are beside their sections; ``validate`` here is the order they run in, which
decides the one reported when a config has several faults (some sections' checks come in parts for
that reason).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from grads_ray.config.errors import ConfigError, _switch
from grads_ray.config.paths import absolute_paths
from grads_ray.config.sections import Config

# --------------------------------------------------------------------------------------------------
# Building a tree from plain dicts, with errors that name the key.


def _coerce(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    """``value`` (from YAML or an override) checked and converted to type ``tp``; a mapping for a
    dataclass fills in from ``default`` (the enclosing config's value for that key)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp_ in inner[:-1]:  # the first type that takes it (``int | str``: 16 stays an integer)
            try:
                return _coerce(value, tp_, key, default)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key, default)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key, default)
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML reads `use_gpu: false` as a boolean; keep YAML's spelling
            return "true" if value else "false"
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "", default: Any = None) -> Any:
    """``cls`` from a mapping; keys it lacks keep ``default``'s values (``cls()`` when None), so that
    ``finetune.lr=...`` keeps the finetune section's own defaults (epochs 2), not TrainConfig's."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    default = cls() if default is None else default
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], key, getattr(default, name))
        else:
            kwargs[name] = getattr(default, name)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"select.budget=10%"`` -> ``{"select": {"budget": "10%"}}``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Resolve a Config: defaults < ``base`` < YAML file < ``key=value`` overrides."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = _merge(tree, loaded)
    for item in overrides or []:
        tree = _merge(tree, parse_override(item))
    cfg = absolute_paths(_build(Config, tree))
    validate(cfg)
    return cfg


def with_settings(cfg: Config, settings: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted-key settings (``{"select.grads.k": "5"}``) applied in order, each
    typed and checked as an override would be; paths made absolute; then validated. A mapping given
    for a config section (``select.grads={k: 5}``) sets those keys and keeps the section's others, as
    an override does; one given for a mapping setting (``select.grads.directions={}``) replaces it."""
    tree = cfg.to_dict()
    for key, value in settings.items():
        node, obj = tree, cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key {key}")
            node, obj = node[part], getattr(obj, part, None)
        value = copy.deepcopy(value)
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(obj, parts[-1], None)):
            value = _merge(node[parts[-1]], value)
        node[parts[-1]] = value
    out = absolute_paths(_build(Config, tree))
    validate(out)
    return out


# Settings that are auto, true or false, in the order ``validate`` checks them.
USE_GPU_KEYS = ("select.fisher.use_gpu", "warmup.use_gpu", "finetune.use_gpu", "score.use_gpu", "similarity.use_gpu")


def validate(cfg: Config) -> None:
    """Checks that need more than a type: enumerations and ranges. Each is written beside its section
    (sections.py, select_sections.py); they run in this order, and the first that fails is raised."""
    for name in ("warmup", "finetune"):
        getattr(cfg, name).check(name)
    cfg.data.check()
    cfg.eval.check()
    cfg.select.check(cfg)
    for key in USE_GPU_KEYS:
        _switch(key, operator.attrgetter(key)(cfg))
    for name in ("warmup", "finetune"):
        getattr(cfg, name).check_fraction(name)
    cfg.score.check()
    cfg.similarity.check_choices()
    cfg.select.check_memory()
    cfg.similarity.check(cfg)
    cfg.select.check_budget()
