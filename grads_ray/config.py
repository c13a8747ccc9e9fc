"""One configuration tree for the whole job.

YAML in, ``key.sub=value`` overrides from the command line, validated before Ray starts: unknown keys
and wrong types are errors that name the key, never something found later inside a Ray worker.
"""

from __future__ import annotations

import copy
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
    shard_bytes: int = 32 * 1024 * 1024  # a JSONL shard ends at the first line end past this many bytes
    shard_rows: int = 10_000  # rows per shard at most, for every format (JSONL: lines)
    strict: bool = False  # stop at the first bad row instead of rejecting it
    limit: int | None = None  # smoke test: only the first N rows of the corpus
    allow_empty: bool = False  # a stage left with no row ends the job with exit 0 instead of an error


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
class LoraConfig:
    """LoRA adapters through peft (r 0: off, a full fine-tune). The saved model has them merged."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # peft's names or "all-linear"


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
    # CPU training: CPUs each worker reserves, and so its torch threads (0: auto, a node's CPUs shared
    # among the workers it holds, one left for Ray Data). A resource, not part of the recipe: it is
    # kept out of the stage fingerprints. GPU workers reserve Ray Train's default.
    cpus_per_worker: int = 0
    use_gpu: str = "auto"  # auto | true | false
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size x workers x grad_accum)
    schedule: str = "cosine"  # cosine | linear | constant, after the linear warm-up
    checkpoint_every: int = 500  # optimizer steps between Ray Train checkpoints (resume point); 0: at the end only
    parallel: str = "ddp"  # ddp | fsdp (ray.train.torch.prepare_model's parallel_strategy)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Training files of at most this many MB (their columns uncompressed, on local disk; the warm-up's are
    # the whole corpus) are read by the driver and tokenized once, before training starts; larger ones, or
    # files in an object store, stream from Parquet every epoch. Ray Data's read of even a few small files
    # costs seconds, paid while the workers wait. 0: always stream. A resource, like cpus_per_worker: the
    # rows and their order are the same either way; the local shuffle's batches follow Ray Data's block
    # sizes, as they may follow the cluster's CPUs, so the stage fingerprints leave it out.
    preload_mb: float = 64.0


@dataclass
class ScoreConfig:
    """Per-example loss, gradient statistics and features (docs/design.md, "score")."""

    batch_size: int = 16
    num_actors: int = 1  # max actors in the scorer pool (one GPU each when GPUs are used)
    max_restarts: int = 3  # a dead scorer: its unfinished shards scored again in a fresh pass this often, then the run fails
    # Scheduled curation: score with this model folder (an earlier run's OUT/warmup/model) instead
    # of warming up again, so a new corpus version's unchanged shards keep their scores ("" = warm-up's).
    model: str = ""
    cache_dir: str = ""  # scored shards by content hash, reused across corpus versions ("" = OUTPUT/score_cache)
    use_gpu: str = "auto"
    tokenize_batch_size: int = 256  # rows per tokenizing task for the training stages (scoring tokenizes whole units)
    # auto: the batched engine (one pass per batch) once its self-check on this model passes, else one
    # example at a time | batched: the same, but a model it is not exact on stops the run (exit 2) |
    # loop: one example at a time, no check (any model)
    engine: str = "auto"
    check_rows: int = 4  # corpus rows each scorer's self-check scores both ways before any other row
    # largest relative error the self-check lets through in the model's own dtype; null: by dtype
    # (docs/score_engine.md). A half-precision model's float32 pass keeps float32's.
    check_tolerance: float | None = None
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float64
    extrema: bool = True  # grad_max / grad_min (exact; without them the ghost norm is used where cheaper)
    proj_dim: int = 512  # projected-gradient feature size (0: off)
    proj_rank: int = 8  # per-layer Kronecker sketch: rank x rank numbers per weight matrix
    chunk_elements: int = 1 << 26  # largest block of per-example gradient entries formed at once
    fisher_dim: int = 64  # FisherSFT summary: last hidden state projected to this size (0: off)
    fisher_rank: int = 4  # ... and kept as a rank-r factor per example
    # loss of the response without its prompt (IFD's denominator): one more forward pass, off by
    # default (+25% score-stage time on the demo); select.method=ifd needs it
    response_only_loss: bool = False


@dataclass
class SimilarityConfig:
    k: int = 10
    feature: str = "hidden_mean"  # hidden_mean (model's mean last hidden state) | grad_proj | encoder (sentence encoder)
    # cosine at or above which two examples are near-duplicates; null: 0.99 for model features (SemDeDup's
    # eps 0.01), 0.95 for the sentence encoder (its near-copies spread wider: docs/benchmarks.md)
    dup_threshold: float | None = None
    eps: float = -1.0  # SemDeDup's knob: when >= 0, dup_threshold = 1 - eps
    index: str = "auto"  # auto (flat up to exact_max, else ivf_flat) | flat | ivf_flat | ivf_pq
    exact_max: int = 200_000
    nlist: int = 0  # IVF cells; 0: about 4·sqrt(N)
    nprobe: int = 32  # IVF cells searched per query
    pq_m: int = 32  # IVF-PQ: bytes per vector
    train_size: int = 100_000  # IVF: vectors sampled (seeded) to train the quantiser
    recall_sample: int = 1000  # approximate index: queries checked against an exact search
    clusters: int = -1  # k-means clusters for GrADS's diversity quotas: -1 auto (about sqrt N), 0 off
    center: str = "auto"  # subtract the corpus mean first: auto = yes for model features, no for encoder
    memory_mb: float = 512.0  # driver's budget for vectors in flight (rows per chunk follow from it)
    workers: int = 0  # index workers (Ray actors, one GPU each on GPU); 0: one per GPU, else one
    encoder_path: str = ""  # feature=encoder: a sentence-transformers folder; "" = the bundled all-MiniLM-L6-v2
    encoder_batch_size: int = 64
    encoder_max_length: int = 256  # tokens of "prompt\n\nresponse" the encoder reads
    use_gpu: str = "auto"

    def threshold(self) -> float:
        """The near-duplicate cosine in force: 1 - eps when eps is set, else dup_threshold, else the
        feature's default."""
        if self.eps >= 0:
            return 1.0 - self.eps
        if self.dup_threshold is not None:
            return self.dup_threshold
        return 0.95 if self.feature == "encoder" else 0.99

    def centred(self) -> bool:
        """Whether vectors are centred on the corpus mean before cosine: model features share a large
        common direction; a sentence encoder's are trained for raw cosine."""
        return self.center == "true" or (self.center == "auto" and self.feature != "encoder")


@dataclass
class GradsConfig:
    """GrADS (docs/grads.md): gradient signal, criteria, KDE region, diversity, similarity reduction."""

    groups: list[str] = field(default_factory=lambda: ["embedding", "head"])  # layer groups read
    stats: list[str] = field(default_factory=lambda: ["grad_norm", "grad_mean", "grad_std", "grad_max", "grad_min"])
    stat_weights: dict[str, float] = field(default_factory=dict)  # by stat or column; default 1 each
    normalize: str = "zscore"  # zscore | robust (median/MAD) | rank (normal scores)
    k: str = "3"  # band half-width in normalised units, or "auto" (Chauvenet's criterion for N)
    direction: str = "both"  # both | upper | lower | none: which tails each criterion cuts
    directions: dict[str, str] = field(default_factory=dict)  # per stat, column or "signal"
    bandwidth: str = "scott"  # scott | silverman | a number
    region: str = "dense"  # dense | sparse | hdr | match
    region_mass: float = 0.9  # hdr: share of the corpus in the highest-density region
    strata: int = 20  # match: equal-count signal strata taken in proportion
    w_region: float = 1.0
    # off by default since 2026-11-26: the ablation (docs/evidence.md) found the k-NN diversity term and
    # the cluster quotas make GrADS level with random (more planted noise, higher held-out loss at 50%)
    w_diversity: float = 0.0
    w_loss: float = 0.0
    w_redundancy: float = 0.5
    cluster_alpha: float = -1.0  # cluster quotas ∝ size^alpha (0 equal, 1 proportional, 0.5 before); < 0: off


@dataclass
class FisherConfig:
    """FisherSFT (docs/grads.md): greedy log det(λI + Σ F_iᵀF_i) on the score stage's factors."""

    lam: str = "auto"  # λ, or auto: one average example's information per dimension, mean tr(FᵀF)/d'
    # 0: exact lazy greedy; ε > 0: stochastic greedy (best of a sample of N/K·ln(1/ε) per pick);
    # auto: exact up to 50,000 examples, else 0.01
    epsilon: str = "auto"
    batch: int = 1  # picks per round of gain evaluations: 1 exact; b > 1 faster, approximate
    use_gpu: str = "auto"


@dataclass
class BaselineConfig:
    loss_order: str = "highest"  # loss baseline: highest | lowest first
    grad_norm_column: str = "grad_norm"  # or a group's, e.g. head.grad_norm
    grad_norm_order: str = "highest"
    ifd_max: float = 1.0  # IFD: examples at or above this (the prompt does not help) go last; 0: no cut


@dataclass
class LessConfig:
    """LESS-style: cosine of projected gradients to a user's target set, scored with the same model."""

    target_paths: list[str] = field(default_factory=list)  # SFT rows, the corpus's formats
    reduce: str = "mean"  # mean: cosine to the mean target gradient | max: best cosine to any target


@dataclass
class SelectConfig:
    method: str = "grads"  # a name in grads_ray/selection/methods.py's METHODS (grads-ray --help lists them)
    budget: str = "25%"  # "5%", "0.05", "500" (examples) or "20000 tokens"
    dedup: str = "auto"  # cap near-duplicate groups: auto (grads only) | true | false
    max_per_dup_group: int = 1
    max_similarity: float = 0.0  # > 0: skip a candidate with cosine above this to one ranked above it
    fill: bool = True  # GrADS: fill the budget from outside the band when the band holds too few
    quotas: dict[str, float] = field(default_factory=dict)  # share of the budget per source; "*": the rest
    # feature matrices (FisherSFT's factors, LESS's projected gradients) larger than this are read
    # into a memory-mapped file beside the run (select/.ledger/spill) instead of the driver's memory
    memory_mb: float = 4096.0
    grads: GradsConfig = field(default_factory=GradsConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    less: LessConfig = field(default_factory=LessConfig)


@dataclass
class EvalConfig:
    domain_paths: list[str] = field(default_factory=list)  # held-out SFT rows, same formats as data
    general_paths: list[str] = field(default_factory=list)  # plain text files for forgetting
    batch_size: int = 16
    block_size: int = 256  # tokens per general-text block
    max_general_blocks: int = 256
    generate: int = 64  # held-out prompts continued greedily and scored (BLEU, chrF, ROUGE-L, METEOR); 0: off
    max_new_tokens: int = 64
    # METEOR's WordNet 3.0 (grads_ray/evaluation/meteor.py): auto (/usr/share/wordnet, Debian's
    # wordnet-base, then NLTK's data path), a folder of its dictionary files, or none (no METEOR)
    wordnet: str = "auto"


@dataclass
class CompareConfig:
    """``grads-ray compare``: strategies (METHOD:BUDGET, METHOD:VARIANT:BUDGET or full) and seeds
    (empty: the config's seed). A VARIANT is an expression of named switches (grads:core:5%,
    grads:core+dedup:5%; grads_ray/selection/variants.py) and of the user's own ``variants``: a name
    -> select.* overrides, e.g. ``{k5: ["select.grads.k=5"]}``."""

    strategies: list[str] = field(default_factory=lambda: ["full", "random:5%", "grads:5%", "grads:50%", "fisher:5%"])
    seeds: list[int] = field(default_factory=list)
    variants: dict[str, list[str]] = field(default_factory=dict)


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
    compare: CompareConfig = field(default_factory=CompareConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        return _coerce(value, inner[0], key, default)
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


RESOURCE_FIELDS = ("cpus_per_worker", "preload_mb")  # TrainConfig fields that change where it runs, not what it learns


def recipe(t: TrainConfig) -> dict[str, Any]:
    """The fields of a training config that define its result (its stage fingerprint's part)."""
    return {k: v for k, v in dataclasses.asdict(t).items() if k not in RESOURCE_FIELDS}


def validate(cfg: Config) -> None:
    """Checks that need more than a type: enumerations and ranges."""
    for name, t in (("warmup", cfg.warmup), ("finetune", cfg.finetune)):
        _one_of(f"{name}.schedule", t.schedule, ("cosine", "linear", "constant"))
        _one_of(f"{name}.parallel", t.parallel, ("ddp", "fsdp"))
        if t.grad_accum < 1 or t.checkpoint_every < 0 or t.lora.r < 0 or t.cpus_per_worker < 0:
            raise ConfigError(f"{name}: grad_accum >= 1, checkpoint_every >= 0, lora.r >= 0 and cpus_per_worker >= 0")
        if t.parallel == "fsdp" and t.lora.r:
            raise ConfigError(f"{name}: parallel=fsdp with LoRA is not supported yet")
    if cfg.data.on_long not in ("truncate", "reject"):
        raise ConfigError(f"data.on_long must be truncate or reject, got {cfg.data.on_long!r}")
    if cfg.data.max_length < 8:
        raise ConfigError("data.max_length must be at least 8")
    if cfg.eval.wordnet not in ("auto", "none") and not (Path(cfg.eval.wordnet) / "index.noun").is_file():
        raise ConfigError(f"eval.wordnet: {cfg.eval.wordnet}: no WordNet dictionary files there (index.noun); "
                          "auto finds Debian's wordnet-base, none turns METEOR off")
    _validate_select(cfg)
    for key, val in (("select.fisher.use_gpu", cfg.select.fisher.use_gpu), ("warmup.use_gpu", cfg.warmup.use_gpu), ("finetune.use_gpu", cfg.finetune.use_gpu),
                     ("score.use_gpu", cfg.score.use_gpu), ("similarity.use_gpu", cfg.similarity.use_gpu)):
        if val not in ("auto", "true", "false"):
            raise ConfigError(f"{key} must be auto, true or false, got {val!r}")
    for key, frac in (("warmup.fraction", cfg.warmup.fraction), ("finetune.fraction", cfg.finetune.fraction)):
        if not 0 < frac <= 1:
            raise ConfigError(f"{key} must be in (0, 1], got {frac}")
    sc = cfg.score
    if sc.engine not in ("auto", "batched", "loop"):
        raise ConfigError(f"score.engine must be auto, batched or loop, got {sc.engine!r}")
    if sc.check_tolerance is not None and not sc.check_tolerance > 0:
        raise ConfigError(f"score.check_tolerance must be > 0 or null, got {sc.check_tolerance}")
    if sc.check_rows < 2:
        raise ConfigError(f"score.check_rows must be >= 2 (the self-check needs rows of different lengths), "
                          f"got {sc.check_rows}")
    if sc.dtype not in ("auto", "float32", "bfloat16", "float64"):
        raise ConfigError(f"score.dtype must be auto, float32, bfloat16 or float64, got {sc.dtype!r}")
    for key in ("proj_dim", "fisher_dim", "fisher_rank"):
        if getattr(sc, key) < 0:
            raise ConfigError(f"score.{key} must be >= 0 (0 turns it off)")
    if sc.proj_rank < 1 or sc.chunk_elements < 1 or sc.batch_size < 1:
        raise ConfigError("score.proj_rank, score.chunk_elements and score.batch_size must be >= 1")
    if sc.model and "://" not in sc.model and not (Path(sc.model) / "config.json").is_file():
        raise ConfigError(f"score.model: {sc.model}: no Hugging Face model folder (config.json) there")
    if sc.max_restarts < 0 or sc.num_actors < 1:
        raise ConfigError("score.max_restarts must be >= 0 and score.num_actors >= 1")
    _one_of("similarity.feature", cfg.similarity.feature, ("hidden_mean", "grad_proj", "encoder"))
    _one_of("similarity.center", cfg.similarity.center, ("auto", "true", "false"))
    if cfg.select.memory_mb < 0:
        raise ConfigError("select.memory_mb must be >= 0 (0: every feature matrix memory-mapped)")
    if cfg.similarity.memory_mb < 1 or cfg.similarity.workers < 0:
        raise ConfigError("similarity.memory_mb must be >= 1 and similarity.workers >= 0 (0: auto)")
    if cfg.similarity.encoder_path and not Path(cfg.similarity.encoder_path).is_dir():
        raise ConfigError(f"similarity.encoder_path: no folder {cfg.similarity.encoder_path!r} "
                          "(a sentence-transformers model saved on disk)")
    if cfg.similarity.feature == "grad_proj" and not sc.proj_dim:
        raise ConfigError("similarity.feature=grad_proj needs score.proj_dim > 0")
    if cfg.similarity.dup_threshold is not None and not -1.0 <= cfg.similarity.dup_threshold <= 1.0:
        raise ConfigError("similarity.dup_threshold is a cosine similarity in [-1, 1]")
    if cfg.similarity.eps > 2.0:
        raise ConfigError("similarity.eps is 1 - a cosine similarity: in [0, 2] (negative: unset)")
    _one_of("similarity.index", cfg.similarity.index, ("auto", "flat", "ivf_flat", "ivf_pq"))
    if min(cfg.similarity.nprobe, cfg.similarity.pq_m, cfg.similarity.train_size, cfg.similarity.k) < 1:
        raise ConfigError("similarity.k, nprobe, pq_m and train_size must be >= 1")
    from grads_ray.selection.budget import parse_budget

    try:
        parse_budget(cfg.select.budget)
    except ValueError as exc:
        raise ConfigError(f"select.budget: {exc}") from None


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def _number_or(key: str, value: str, word: str, positive: bool = False) -> None:
    if value == word:
        return
    try:
        x = float(value)
    except ValueError:
        raise ConfigError(f"{key} must be a number or {word}, got {value!r}") from None
    if x < 0 or (positive and x == 0):
        raise ConfigError(f"{key} must be {'> 0' if positive else '>= 0'}, got {value!r}")


def _validate_select(cfg: Config) -> None:
    sc, g = cfg.select, cfg.select.grads
    from grads_ray.selection.methods import METHODS

    _one_of("select.method", sc.method, tuple(METHODS))
    _one_of("select.dedup", sc.dedup, ("auto", "true", "false"))
    _one_of("select.grads.normalize", g.normalize, ("zscore", "robust", "rank"))
    _one_of("select.grads.region", g.region, ("dense", "sparse", "hdr", "match"))
    for key, d in [("select.grads.direction", g.direction)] + [(f"select.grads.directions.{k}", v)
                                                                for k, v in g.directions.items()]:
        _one_of(key, d, ("both", "upper", "lower", "none"))
    _number_or("select.grads.k", g.k, "auto", positive=True)
    if g.bandwidth not in ("scott", "silverman"):
        _number_or("select.grads.bandwidth", g.bandwidth, "scott", positive=True)
    if not 0 < g.region_mass <= 1 or g.strata < 1:
        raise ConfigError("select.grads.region_mass must be in (0, 1] and select.grads.strata >= 1")
    if not g.stats or not g.groups:
        raise ConfigError("select.grads.stats and select.grads.groups must not be empty")
    if not 0.0 <= sc.max_similarity <= 1.0:
        raise ConfigError("select.max_similarity is a cosine in [0, 1] (0: off)")
    if sc.max_per_dup_group < 1:
        raise ConfigError("select.max_per_dup_group must be >= 1")
    if any(v < 0 for v in sc.quotas.values()) or sum(sc.quotas.values()) <= 0 and sc.quotas:
        raise ConfigError("select.quotas: shares must be >= 0 and not all 0")
    _number_or("select.fisher.lam", sc.fisher.lam, "auto", positive=True)
    _number_or("select.fisher.epsilon", sc.fisher.epsilon, "auto")
    if sc.fisher.epsilon != "auto" and float(sc.fisher.epsilon) >= 1:
        raise ConfigError("select.fisher.epsilon must be in [0, 1)")
    if sc.fisher.batch < 1:
        raise ConfigError("select.fisher.batch must be >= 1")
    b = sc.baseline
    _one_of("select.baseline.loss_order", b.loss_order, ("highest", "lowest"))
    _one_of("select.baseline.grad_norm_order", b.grad_norm_order, ("highest", "lowest"))
    _one_of("select.less.reduce", sc.less.reduce, ("mean", "max"))
    problem = METHODS[sc.method].check(cfg)  # what the method asks of the rest of the config
    if problem:
        raise ConfigError(problem)
