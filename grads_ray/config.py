"""One configuration tree for the whole job.

YAML in, ``key.sub=value`` overrides from the command line, validated before Ray starts: unknown keys
and wrong types are errors that name the key, never something found later inside a Ray worker.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run: the message names the key."""


@dataclass
class DataConfig:
    """Where the SFT corpus is and how rows become training examples."""

    paths: list[str] = field(default_factory=list)  # files, folders, or saved `datasets` folders
    max_length: int = 512  # tokens per example, prompt + response
    on_long: str = "truncate"  # truncate (keep the start, response tokens last) | reject
    shard_bytes: int = 32 * 1024 * 1024  # JSONL files are cut into shards of about this size
    shard_rows: int = 50_000  # Parquet / saved datasets: rows per shard
    strict: bool = False  # stop at the first bad row instead of rejecting it
    limit: int | None = None  # smoke test: only the first N rows of the corpus


@dataclass
class ModelConfig:
    path: str = ""  # a local Hugging Face causal-LM directory
    trust_remote_code: bool = False


@dataclass
class RayConfig:
    address: str | None = None  # an existing cluster; else RAY_ADDRESS; else a local one is started
    num_cpus: int | None = None  # local cluster only
    include_dashboard: bool = False
    dashboard_host: str = "127.0.0.1"


@dataclass
class TrainConfig:
    """One fine-tuning recipe, shared by the warm-up and the final fine-tune."""

    enabled: bool = True
    fraction: float = 1.0  # fraction of the (eligible) rows to train on, drawn with the seed
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8  # per worker
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    num_workers: int = 1
    use_gpu: str = "auto"  # auto | true | false
    grad_clip: float = 1.0


@dataclass
class ScoreConfig:
    """Per-example loss, gradient statistics and features (docs/design.md, "score")."""

    batch_size: int = 16
    num_actors: int = 1  # max actors in the scorer pool (one GPU each when GPUs are used)
    use_gpu: str = "auto"
    tokenize_batch_size: int = 256  # rows per tokenizing task for the training stages (scoring tokenizes whole units)
    engine: str = "batched"  # batched (one pass per batch) | loop (one example at a time: any model)
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float64
    extrema: bool = True  # grad_max / grad_min (exact; without them the ghost norm is used where cheaper)
    proj_dim: int = 512  # projected-gradient feature size (0: off)
    proj_rank: int = 8  # per-layer Kronecker sketch: rank x rank numbers per weight matrix
    chunk_elements: int = 1 << 26  # largest block of per-example gradient entries formed at once
    fisher_dim: int = 64  # FisherSFT summary: last hidden state projected to this size (0: off)
    fisher_rank: int = 4  # ... and kept as a rank-r factor per example


@dataclass
class SimilarityConfig:
    k: int = 10
    feature: str = "hidden_mean"  # hidden_mean (content) | grad_proj (projected gradient)
    # cosine at or above which two examples are near-duplicates (SemDeDup's eps = 1 - threshold, default 0.01)
    dup_threshold: float = 0.99
    query_batch: int = 4096
    use_gpu: str = "auto"


@dataclass
class GradsConfig:
    """First GrADS score (docs/grads.md): gradient signal, its KDE, band criterion, diversity."""

    stats: list[str] = field(default_factory=lambda: ["grad_norm", "grad_std", "grad_max", "grad_min"])
    groups: list[str] = field(default_factory=lambda: ["embedding", "head"])
    tail_k: float = 3.0  # examples whose signal z-score lies beyond ±k are excluded as noisy
    bandwidth: str = "scott"  # scott | silverman | a number
    w_density: float = 1.0
    w_diversity: float = 0.5
    w_loss: float = 0.0


@dataclass
class SelectConfig:
    method: str = "grads"  # grads | random
    budget: str = "25%"  # "5%", "0.05", "500" (examples) or "20000 tokens"
    max_per_dup_group: int = 1
    grads: GradsConfig = field(default_factory=GradsConfig)


@dataclass
class EvalConfig:
    domain_paths: list[str] = field(default_factory=list)  # held-out SFT rows, same formats as data
    general_paths: list[str] = field(default_factory=list)  # plain text files for forgetting
    batch_size: int = 16
    block_size: int = 256  # tokens per general-text block
    max_general_blocks: int = 256


@dataclass
class Config:
    output: str = "runs/latest"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    warmup: TrainConfig = field(default_factory=lambda: TrainConfig(fraction=0.2, epochs=1))
    score: ScoreConfig = field(default_factory=ScoreConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Building a tree from plain dicts, with errors that name the key.


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
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
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    default = cls()
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _coerce(values[name], hints[name], key)
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
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = _merge(tree, loaded)
    for item in overrides or []:
        tree = _merge(tree, parse_override(item))
    cfg = _build(Config, tree)
    validate(cfg)
    return absolute_paths(cfg)


def _absolute(path: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's working directory);
    URLs (``s3://``, ``file://``, ...) and empty strings are left as they are."""
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def absolute_paths(cfg: Config) -> Config:
    """Every local path in the config made absolute, in place. -> the same config."""
    cfg.output = _absolute(cfg.output)
    cfg.model.path = _absolute(cfg.model.path)
    cfg.data.paths = [_absolute(p) for p in cfg.data.paths]
    cfg.eval.domain_paths = [_absolute(p) for p in cfg.eval.domain_paths]
    cfg.eval.general_paths = [_absolute(p) for p in cfg.eval.general_paths]
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need more than a type: enumerations and ranges."""
    if cfg.data.on_long not in ("truncate", "reject"):
        raise ConfigError(f"data.on_long must be truncate or reject, got {cfg.data.on_long!r}")
    if cfg.data.max_length < 8:
        raise ConfigError("data.max_length must be at least 8")
    if cfg.select.method not in ("grads", "random"):
        raise ConfigError(f"select.method must be grads or random, got {cfg.select.method!r}")
    for key, val in (("warmup.use_gpu", cfg.warmup.use_gpu), ("finetune.use_gpu", cfg.finetune.use_gpu),
                     ("score.use_gpu", cfg.score.use_gpu), ("similarity.use_gpu", cfg.similarity.use_gpu)):
        if val not in ("auto", "true", "false"):
            raise ConfigError(f"{key} must be auto, true or false, got {val!r}")
    for key, frac in (("warmup.fraction", cfg.warmup.fraction), ("finetune.fraction", cfg.finetune.fraction)):
        if not 0 < frac <= 1:
            raise ConfigError(f"{key} must be in (0, 1], got {frac}")
    sc = cfg.score
    if sc.engine not in ("batched", "loop"):
        raise ConfigError(f"score.engine must be batched or loop, got {sc.engine!r}")
    if sc.dtype not in ("auto", "float32", "bfloat16", "float64"):
        raise ConfigError(f"score.dtype must be auto, float32, bfloat16 or float64, got {sc.dtype!r}")
    for key in ("proj_dim", "fisher_dim", "fisher_rank"):
        if getattr(sc, key) < 0:
            raise ConfigError(f"score.{key} must be >= 0 (0 turns it off)")
    if sc.proj_rank < 1 or sc.chunk_elements < 1 or sc.batch_size < 1:
        raise ConfigError("score.proj_rank, score.chunk_elements and score.batch_size must be >= 1")
    if cfg.similarity.feature not in ("hidden_mean", "grad_proj"):
        raise ConfigError(f"similarity.feature must be hidden_mean or grad_proj, got {cfg.similarity.feature!r}")
    if cfg.similarity.feature == "grad_proj" and not sc.proj_dim:
        raise ConfigError("similarity.feature=grad_proj needs score.proj_dim > 0")
    if not -1.0 <= cfg.similarity.dup_threshold <= 1.0:
        raise ConfigError("similarity.dup_threshold is a cosine similarity in [-1, 1]")
    from grads_ray.selection.budget import parse_budget

    try:
        parse_budget(cfg.select.budget)
    except ValueError as exc:
        raise ConfigError(f"select.budget: {exc}") from None
