"""The job's stages, in order: the one table that the runner, ``--dry-run``'s plan, ``grads-ray
compare`` and the CLI's stage commands read.

Each stage module reads top to bottom: what it reads (``needs``), which of its settings decide its
result (``settings``: the runner makes the fingerprint of them and its needs' fingerprints), how it
computes it (``run``). The order of the job is this table's order; which stages a run takes is the
closure of what its last stage needs under the config.
"""

from __future__ import annotations

from grads_ray.config import Config
from grads_ray.stages.base import Done, Outputs, Stage
from grads_ray.stages.evaluate import Baseline, Evaluate
from grads_ray.stages.ingest import Ingest
from grads_ray.stages.score import Score, Target
from grads_ray.stages.select import Select
from grads_ray.stages.similarity import Embed, Similarity
from grads_ray.stages.train import Finetune, Warmup

STAGES: tuple[Stage, ...] = (Ingest(), Warmup(), Score(), Target(), Embed(), Similarity(), Select(), Finetune(),
                             Baseline(), Evaluate())

__all__ = ["STAGES", "Done", "Outputs", "Stage", "closure", "job_end", "per_strategy"]


def job_end(cfg: Config) -> str:
    """The last stage of the whole job: evaluate, or select when the fine-tune is off."""
    return "evaluate" if cfg.finetune.enabled else "select"


def closure(cfg: Config, end: str, stages: tuple[Stage, ...] = STAGES) -> list[Stage]:
    """``end`` and every stage it needs under ``cfg``, directly or not, in the table's order."""
    by_name = {s.name: s for s in stages}
    if end not in by_name:
        raise KeyError(f"no stage {end!r} (stages: {', '.join(by_name)})")
    wanted, todo = set(), [end]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += by_name[name].needs(cfg)
    return [s for s in stages if s.name in wanted]


def per_strategy(cfg: Config, stages: tuple[Stage, ...] = STAGES) -> set[str]:
    """The stages whose result depends on the selection (select and what follows it): ``compare``
    runs these once per strategy and the others once per seed."""
    return {s.name for s in stages if "select" in {t.name for t in closure(cfg, s.name, stages)}}
