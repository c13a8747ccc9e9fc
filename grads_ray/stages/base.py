"""What a stage is, and what the runner hands it.

A stage is a step of the job with a name, its output folders in the run directory and the stages
whose outputs it reads (``needs``, which may depend on the config). It says which of its settings
decide its result, how to compute it and what it hands on; the runner (grads_ray/runner.py) does the
rest the same way for every stage: fingerprint (the stage's name, its needs' fingerprints, its
settings), memo, prepare, finish, manifest (datatrove's executor/step split). A stage reaches
another's outputs only through ``ctx.need(name)``, and only for the names its ``needs`` lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grads_ray.rundir import StageDir

if TYPE_CHECKING:
    from grads_ray.config import Config
    from grads_ray.runner import Runner


class EmptyStage(Exception):
    """A stage ended with no row and ``data.allow_empty`` is set: the job stops there, exit 0."""


def no_rows(ctx: Runner, message: str) -> None:
    """A stage left with no row: an input error (exit 2: a scheduled job must not report success and
    hand on nothing) unless the user allowed it (``--allow-empty``), which stops the job cleanly."""
    if ctx.cfg.data.allow_empty:
        raise EmptyStage(message)
    from grads_ray.data.readers import InputError

    raise InputError(f"{message} (--allow-empty accepts a run that hands on nothing)")


@dataclass
class Outputs:
    """A stage's output folders (by name) and the fingerprint of the result they hold or will hold."""

    fingerprint: str
    dirs: dict[str, StageDir]

    def __getitem__(self, folder: str) -> StageDir:
        return self.dirs[folder]


@dataclass
class Done:
    """A finished stage as later stages see it: its outputs, what its ``.ledger/SUCCESS.json`` records
    (``info``) and what it hands on (``value``: a model folder, the evaluation, ...)."""

    name: str
    out: Outputs
    info: dict[str, Any]
    value: Any = None

    @property
    def fingerprint(self) -> str:
        return self.out.fingerprint

    def __getitem__(self, folder: str) -> StageDir:
        return self.out[folder]


class Stage:
    """One step of the job. Subclasses set the class attributes and write ``needs``, ``settings`` and ``run``.

    ``about``: one line for ``--help``; ``folders``: output folders in the run directory, the first
    holding ``.ledger/SUCCESS.json`` (the stage is done when it holds this run's fingerprint);
    ``private``: keys of that file kept out of the manifest (bulky: input hashes, the base model's
    metrics, which the evaluation shows); ``while_running``: needs the stage reads only once it runs
    (the runner finishes every other need first, so the stage's time is its own), for work it
    overlaps with its own (evaluate computes the baseline while the fine-tuned model is evaluated).
    """

    name: str = ""
    about: str = ""
    folders: tuple[str, ...] = ()
    private: tuple[str, ...] = ()
    while_running: tuple[str, ...] = ()

    def needs(self, cfg: Config) -> list[str]:
        """The stages whose outputs this one reads under ``cfg``, in the table's order."""
        return []

    def settings(self, cfg: Config) -> tuple:
        """What the result depends on besides the results of ``needs`` (JSON-able values: settings,
        file sizes and dates, a model folder's listing). The runner makes the stage's fingerprint of
        its name, its needs' fingerprints and these (:meth:`grads_ray.runner.Runner.fingerprint`)."""
        raise NotImplementedError

    def run(self, ctx: Runner, out: Outputs) -> dict[str, Any]:
        """Compute the result into ``out`` (folders prepared; finished shards of an interrupted run
        kept). -> what ``.ledger/SUCCESS.json`` records, besides the fingerprint."""
        raise NotImplementedError

    def value(self, ctx: Runner, out: Outputs, info: dict[str, Any]) -> Any:
        """What later stages receive besides the folders (default: nothing)."""
        return None

    def check(self, ctx: Runner, done: Done) -> None:
        """After every run or memo hit: what the run directory's top level and manifest gain from
        this stage, and the invariants it enforces (row accounting, ``--strict``)."""
