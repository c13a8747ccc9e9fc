"""What a stage is, and what the runner hands it.

A stage is a step of the job with a name, its output folders in the run directory and the stages
whose outputs it reads (``needs``, which may depend on the config). It says which of its settings
decide its result, how to compute it and what it hands on; the runner (grads_ray/runner.py) does the
rest the same way for every stage: fingerprint (the stage's name, its needs' fingerprints, its
settings), memo, prepare, finish, manifest (datatrove's executor/step split).

What a stage sees of the run is its :class:`StageContext` (``ctx``): the config, the outputs of the
stages its ``needs`` lists (``ctx.need``), Ray, the run folder's entries it declares (``files``:
its outputs beside its folders; ``scratch``: what it keeps across runs) or a stage it reads
declares (``ctx.path``), and the manifest so far, to read. It writes into its own folders and
declared entries only, and hands the manifest its entries by returning them (:meth:`Stage.report`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grads_ray.rundir import StageDir

if TYPE_CHECKING:
    from grads_ray.config import Config
    from grads_ray.resources import Resources
    from grads_ray.runner import Runner
    from grads_ray.storage import Location


class EmptyStage(Exception):
    """A stage ended with no row and ``data.allow_empty`` is set: the job stops there, exit 0."""


class AccountingError(RuntimeError):
    """Rows lost or counted twice between stages: a defect of grads-ray, never of the input. The job
    stops with one line (exit 2) that says the counts and how to recompute, not with a traceback."""


def no_rows(ctx: StageContext, message: str) -> None:
    """A stage left with no row: an input error (exit 2: a scheduled job must not report success and
    hand on nothing) unless the user allowed it (``--allow-empty``), which stops the job cleanly."""
    if ctx.cfg.data.allow_empty:
        raise EmptyStage(message)
    from grads_ray.data.readers import InputError

    raise InputError(f"{message} (--allow-empty accepts a run that hands on nothing)")


def first_reject(stage: StageDir) -> dict[str, Any]:
    """The first rejected row among a stage's rejects ({} when none)."""
    for part in stage.reject_parts():
        with part.open() as fh:
            line = fh.readline()
        if line.strip():
            return json.loads(line)
    return {}


def strict_error(stage: StageDir) -> Exception:
    """``--strict``: the first bad row as ``file:line: reason (detail)``."""
    from grads_ray.data.readers import InputError

    first = first_reject(stage)
    detail = f" ({first['detail']})" if first.get("detail") else ""
    return InputError(f"{first['source']}:{first['line']}: {first['reason']}{detail} (--strict)")


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
    outputs: Outputs
    info: dict[str, Any]
    value: Any = None

    @property
    def fingerprint(self) -> str:
        return self.outputs.fingerprint

    def __getitem__(self, folder: str) -> StageDir:
        return self.outputs[folder]


class Stage:
    """One step of the job. Subclasses set the class attributes and write ``needs``, ``settings`` and ``run``.

    ``about``: one line for ``--help``; ``folders``: output folders in the run directory, the first
    holding ``.ledger/SUCCESS.json`` (the stage is done when it holds this run's fingerprint);
    ``files``: the run folder's top-level entries it writes besides its folders, for the user (the
    runner clears them before the stage computes, and a finished stage missing one is finished
    again, its finished shards kept); ``optional_files``: entries it writes only when there is
    something to show (cleared, not required); ``scratch``: entries it keeps across runs and
    resumes from (never cleared; ``score_cache``); ``private``: keys of that file kept out of the
    manifest (bulky: input hashes, the base model's metrics, which the evaluation shows); ``while_running``: needs the stage reads only once it runs
    (the runner finishes every other need first, so the stage's time is its own), for work it
    overlaps with its own (evaluate computes the baseline while the fine-tuned model is evaluated).
    """

    name: str = ""
    about: str = ""
    folders: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    optional_files: tuple[str, ...] = ()
    scratch: tuple[str, ...] = ()
    private: tuple[str, ...] = ()
    while_running: tuple[str, ...] = ()

    def missing_files(self, run_dir: Location) -> list[str]:
        """Its ``files`` not in ``run_dir`` (a finished stage missing one is finished again)."""
        return [f for f in self.files if not (run_dir / f).exists()]

    def needs(self, cfg: Config) -> list[str]:
        """The stages whose outputs this one reads under ``cfg``, in the table's order."""
        return []

    def settings(self, cfg: Config) -> tuple:
        """What the result depends on besides the results of ``needs`` (JSON-able values: settings,
        file sizes and dates, a model folder's listing). The runner makes the stage's fingerprint of
        its name, its needs' fingerprints and these (:meth:`grads_ray.runner.Runner.fingerprint`)."""
        raise NotImplementedError

    def run(self, ctx: StageContext, out: Outputs) -> dict[str, Any]:
        """Compute the result into ``out`` (folders prepared; finished shards of an interrupted run
        kept). -> what ``.ledger/SUCCESS.json`` records, besides the fingerprint."""
        raise NotImplementedError

    def value(self, ctx: StageContext, out: Outputs, info: dict[str, Any]) -> Any:
        """What later stages receive besides the folders (default: nothing)."""
        return None

    def report(self, ctx: StageContext, done: Done) -> dict[str, Any]:
        """After every run or memo hit: the manifest's top-level entries from this stage (the
        runner records them before :meth:`check`, so a failed check still leaves them)."""
        return {}

    def check(self, ctx: StageContext, done: Done) -> None:
        """After :meth:`report`: the invariants the stage enforces (row accounting, ``--strict``);
        raises when one does not hold."""


class StageContext:
    """What one stage sees of the run: ``cfg`` (the resolved config), :meth:`need` (the outputs of
    a stage its ``needs`` lists), :meth:`ray`/``resources`` (Ray, started on first use),
    :meth:`path` (a declared entry of the run folder) and ``manifest`` (a copy of it so far)."""

    def __init__(self, runner: Runner, stage: Stage):
        self._runner, self._stage = runner, stage
        self.cfg: Config = runner.cfg
        self._needs = stage.needs(runner.cfg)

    def need(self, name: str) -> Done:
        """The finished stage ``name`` (computed now if it is not): one of this stage's ``needs``."""
        if name not in self._needs:
            raise RuntimeError(f"stage {self._stage.name} reads {name}, which its needs() does not "
                               "list: declare it, or plan and run will differ")
        return self._runner.need(name)

    def ray(self) -> Resources:
        """Ray started (once) and what the cluster offers."""
        return self._runner.ray()

    @property
    def resources(self) -> Resources:
        """What the cluster offers (Ray is started when a figure is first read)."""
        return self._runner.resources

    def path(self, name: str) -> Location:
        """The run folder's entry ``name``: one this stage declares (``files``, ``optional_files``,
        ``scratch``) or one a stage it needs declares (to read, or to name in a message)."""
        for stage in (self._stage, *(self._runner.stage(n) for n in self._needs)):
            if name in (*stage.files, *stage.optional_files, *stage.scratch):
                return self._runner.run_dir / name
        raise RuntimeError(f"stage {self._stage.name} uses {name} in the run folder, which neither it nor a "
                           "stage it needs declares (Stage.files, Stage.scratch)")

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest so far (a stage hands in its entries through :meth:`Stage.report`)."""
        import copy

        return copy.deepcopy(self._runner.manifest)
