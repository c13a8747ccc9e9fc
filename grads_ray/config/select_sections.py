"""The select section of the config tree and its sub-sections, each with its checks beside it.

Apart from the other sections (sections.py) for size: the method's own settings (GrADS, FisherSFT,
the baselines, LESS) are most of the tree. ``SelectConfig.check`` reads the method registry
(``grads_ray.selection.methods``) when it runs, not when this module loads: the selection package
imports the config package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from grads_ray.config.errors import ConfigError, _number_or, _one_of

if TYPE_CHECKING:
    from grads_ray.config.sections import Config


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

    def check(self) -> None:
        _one_of("select.grads.normalize", self.normalize, ("zscore", "robust", "rank"))
        _one_of("select.grads.region", self.region, ("dense", "sparse", "hdr", "match"))
        for key, d in [("select.grads.direction", self.direction)] + [(f"select.grads.directions.{k}", v)
                                                                       for k, v in self.directions.items()]:
            _one_of(key, d, ("both", "upper", "lower", "none"))
        _number_or("select.grads.k", self.k, "auto", positive=True)
        if self.bandwidth not in ("scott", "silverman"):
            _number_or("select.grads.bandwidth", self.bandwidth, "scott", positive=True)
        if not 0 < self.region_mass <= 1 or self.strata < 1:
            raise ConfigError("select.grads.region_mass must be in (0, 1] and select.grads.strata >= 1")
        if not self.stats or not self.groups:
            raise ConfigError("select.grads.stats and select.grads.groups must not be empty")


@dataclass
class FisherConfig:
    """FisherSFT (docs/grads.md): greedy log det(λI + Σ F_iᵀF_i) on the score stage's factors."""

    lam: str = "auto"  # λ, or auto: one average example's information per dimension, mean tr(FᵀF)/d'
    # 0: exact lazy greedy; ε > 0: stochastic greedy (best of a sample of N/K·ln(1/ε) per pick);
    # auto: exact up to 50,000 examples, else 0.01
    epsilon: str = "auto"
    batch: int = 1  # picks per round of gain evaluations: 1 exact; b > 1 faster, approximate
    use_gpu: str = "auto"

    def check(self) -> None:
        """Everything but ``use_gpu``, which ``validate`` checks with the other sections' (loading.py)."""
        _number_or("select.fisher.lam", self.lam, "auto", positive=True)
        _number_or("select.fisher.epsilon", self.epsilon, "auto")
        if self.epsilon != "auto" and float(self.epsilon) >= 1:
            raise ConfigError("select.fisher.epsilon must be in [0, 1)")
        if self.batch < 1:
            raise ConfigError("select.fisher.batch must be >= 1")


@dataclass
class BaselineConfig:
    loss_order: str = "highest"  # loss baseline: highest | lowest first
    grad_norm_column: str = "grad_norm"  # or a group's, e.g. head.grad_norm
    grad_norm_order: str = "highest"
    ifd_max: float = 1.0  # IFD: examples at or above this (the prompt does not help) go last; 0: no cut

    def check(self) -> None:
        _one_of("select.baseline.loss_order", self.loss_order, ("highest", "lowest"))
        _one_of("select.baseline.grad_norm_order", self.grad_norm_order, ("highest", "lowest"))


@dataclass
class LessConfig:
    """LESS-style: cosine of projected gradients to a user's target set, scored with the same model."""

    target_paths: list[str] = field(default_factory=list)  # SFT rows, the corpus's formats
    reduce: str = "mean"  # mean: cosine to the mean target gradient | max: best cosine to any target

    def check(self) -> None:
        _one_of("select.less.reduce", self.reduce, ("mean", "max"))


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

    def check(self, cfg: Config) -> None:
        """The section and its sub-sections, then what the method asks of the rest of ``cfg`` (the
        whole tree). The memory budget and the budget are checked later (``validate``)."""
        from grads_ray.selection.methods import METHODS

        _one_of("select.method", self.method, tuple(METHODS))
        _one_of("select.dedup", self.dedup, ("auto", "true", "false"))
        self.grads.check()
        if not 0.0 <= self.max_similarity <= 1.0:
            raise ConfigError("select.max_similarity is a cosine in [0, 1] (0: off)")
        if self.max_per_dup_group < 1:
            raise ConfigError("select.max_per_dup_group must be >= 1")
        if any(v < 0 for v in self.quotas.values()) or sum(self.quotas.values()) <= 0 and self.quotas:
            raise ConfigError("select.quotas: shares must be >= 0 and not all 0")
        self.fisher.check()
        self.baseline.check()
        self.less.check()
        problem = METHODS[self.method].check(cfg)  # what the method asks of the rest of the config
        if problem:
            raise ConfigError(problem)

    def check_memory(self) -> None:
        if self.memory_mb < 0:
            raise ConfigError("select.memory_mb must be >= 0 (0: every feature matrix memory-mapped)")

    def check_budget(self) -> None:
        from grads_ray.selection.budget import parse_budget

        try:
            parse_budget(self.budget)
        except ValueError as exc:
            raise ConfigError(f"select.budget: {exc}") from None
