"""The config tree's sections, each with its checks beside it, and the root :class:`Config`.

The dataclasses are the config reference: every setting, its default and what it means, as the YAML
and ``key=value`` overrides spell it (``finetune.lr``). A section's ``check`` holds the checks that
need more than a type (enumerations, ranges, what it asks of another section: a check is written
with the section whose key its message names first); ``validate`` (loading.py) runs them in a fixed
order, so a section whose checks are apart in that order has one method per part. The select section
and its sub-sections are in select_sections.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grads_ray.config.errors import ConfigError, _one_of
from grads_ray.config.select_sections import SelectConfig


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

    def check(self) -> None:
        if self.on_long not in ("truncate", "reject"):
            raise ConfigError(f"data.on_long must be truncate or reject, got {self.on_long!r}")
        if self.max_length < 8:
            raise ConfigError("data.max_length must be at least 8")


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

    def check(self, name: str) -> None:
        """``name``: the section's key (warmup or finetune), for the messages."""
        _one_of(f"{name}.schedule", self.schedule, ("cosine", "linear", "constant"))
        _one_of(f"{name}.parallel", self.parallel, ("ddp", "fsdp"))
        if self.grad_accum < 1 or self.checkpoint_every < 0 or self.lora.r < 0 or self.cpus_per_worker < 0:
            raise ConfigError(f"{name}: grad_accum >= 1, checkpoint_every >= 0, lora.r >= 0 and cpus_per_worker >= 0")
        if self.parallel == "fsdp" and self.lora.r:
            raise ConfigError(f"{name}: parallel=fsdp with LoRA is not supported yet")

    def check_fraction(self, name: str) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"{name}.fraction must be in (0, 1], got {self.fraction}")


RESOURCE_FIELDS = ("cpus_per_worker", "preload_mb")  # TrainConfig fields that change where it runs, not what it learns


def recipe(t: TrainConfig) -> dict[str, Any]:
    """The fields of a training config that define its result (its stage fingerprint's part)."""
    return {k: v for k, v in dataclasses.asdict(t).items() if k not in RESOURCE_FIELDS}


@dataclass
class ScoreConfig:
    """Per-example loss, gradient statistics and features (docs/design.md, "score")."""

    # rows per engine batch, or auto: on a GPU the largest power of two up to 128 whose widest batch
    # (data.max_length tokens a row) peaks under 80% of its memory, measured once a run with the scoring
    # model; 16 on a CPU (grads_ray/gradients/batch_size.py). A rerun keeps the size its units were cut in.
    # Measured on one GPU: a cluster of mixed GPU types wants an integer that fits the smallest.
    batch_size: int | str = "auto"
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
    # largest block of per-example gradient entries formed at once; auto: 2^28 on a GPU of 40 GiB or more,
    # else 2^26 (grads_ray/gradients/memory.py, measured). Changes no number beyond rounding (not fingerprinted)
    chunk_elements: int | str = "auto"
    # the stacked weights' max/min/sum of squares from one Triton kernel that never writes a per-example
    # gradient (gradients/fused.py: bf16/fp16/fp32 on a GPU; elsewhere the formed path). Off until measured
    # on a GPU (benchmarks/grad_stats.py fused section). Changes no number beyond rounding (not fingerprinted)
    fused_moments: bool = False
    # the engine's pass replayed from a CUDA graph per batch shape (gradients/graphs.py; batch lengths padded
    # to a multiple of 64; each graph trusted once it gave an eager pass's bits; GPU only). Off until measured
    # on a GPU. Changes no number beyond rounding (not fingerprinted); batch_size=auto budgets half the memory
    cuda_graphs: bool = False
    fisher_dim: int = 64  # FisherSFT summary: last hidden state projected to this size (0: off)
    fisher_rank: int = 4  # ... and kept as a rank-r factor per example
    # loss of the response without its prompt (IFD's denominator): one more forward pass, off by
    # default (+25% score-stage time on the demo); select.method=ifd needs it
    response_only_loss: bool = False

    def check(self) -> None:
        if self.engine not in ("auto", "batched", "loop"):
            raise ConfigError(f"score.engine must be auto, batched or loop, got {self.engine!r}")
        if self.check_tolerance is not None and not self.check_tolerance > 0:
            raise ConfigError(f"score.check_tolerance must be > 0 or null, got {self.check_tolerance}")
        if self.check_rows < 2:
            raise ConfigError(f"score.check_rows must be >= 2 (the self-check needs rows of different lengths), "
                              f"got {self.check_rows}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float64"):
            raise ConfigError(f"score.dtype must be auto, float32, bfloat16 or float64, got {self.dtype!r}")
        for key in ("proj_dim", "fisher_dim", "fisher_rank"):
            if getattr(self, key) < 0:
                raise ConfigError(f"score.{key} must be >= 0 (0 turns it off)")
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ConfigError(f"score.batch_size must be auto or an integer >= 1, got {self.batch_size!r}")
        if self.proj_rank < 1:
            raise ConfigError("score.proj_rank must be >= 1")
        if self.chunk_elements != "auto" and not (isinstance(self.chunk_elements, int) and self.chunk_elements >= 1):
            raise ConfigError(f"score.chunk_elements must be auto or an integer >= 1, got {self.chunk_elements!r}")
        if self.model and "://" not in self.model and not (Path(self.model) / "config.json").is_file():
            raise ConfigError(f"score.model: {self.model}: no Hugging Face model folder (config.json) there")
        if self.max_restarts < 0 or self.num_actors < 1:
            raise ConfigError("score.max_restarts must be >= 0 and score.num_actors >= 1")


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

    def check_choices(self) -> None:
        """The feature and centring, checked before the rest of the section (see ``validate``)."""
        _one_of("similarity.feature", self.feature, ("hidden_mean", "grad_proj", "encoder"))
        _one_of("similarity.center", self.center, ("auto", "true", "false"))

    def check(self, cfg: Config) -> None:
        """The rest of the section; ``cfg``: the whole tree (grad_proj needs the score stage's projection)."""
        if self.memory_mb < 1 or self.workers < 0:
            raise ConfigError("similarity.memory_mb must be >= 1 and similarity.workers >= 0 (0: auto)")
        if self.encoder_path and not Path(self.encoder_path).is_dir():
            raise ConfigError(f"similarity.encoder_path: no folder {self.encoder_path!r} "
                              "(a sentence-transformers model saved on disk)")
        if self.feature == "grad_proj" and not cfg.score.proj_dim:
            raise ConfigError("similarity.feature=grad_proj needs score.proj_dim > 0")
        if self.dup_threshold is not None and not -1.0 <= self.dup_threshold <= 1.0:
            raise ConfigError("similarity.dup_threshold is a cosine similarity in [-1, 1]")
        if self.eps > 2.0:
            raise ConfigError("similarity.eps is 1 - a cosine similarity: in [0, 2] (negative: unset)")
        _one_of("similarity.index", self.index, ("auto", "flat", "ivf_flat", "ivf_pq"))
        if min(self.nprobe, self.pq_m, self.train_size, self.k) < 1:
            raise ConfigError("similarity.k, nprobe, pq_m and train_size must be >= 1")


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

    def check(self) -> None:
        if self.wordnet not in ("auto", "none") and not (Path(self.wordnet) / "index.noun").is_file():
            raise ConfigError(f"eval.wordnet: {self.wordnet}: no WordNet dictionary files there (index.noun); "
                              "auto finds Debian's wordnet-base, none turns METEOR off")


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
    # same seed, same bits: torch's deterministic kernels in the scorer's and the training loops' passes
    # (grads_ray/determinism.py; on a GPU their cost and effect are still to be measured). false: a GPU's
    # atomic adds (attention backward, index_add) make the scores of two runs differ at rounding
    deterministic: bool = True
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
