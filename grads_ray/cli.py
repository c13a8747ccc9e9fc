"""``grads-ray``: run the whole job, one stage, or the offline demo.

    grads-ray run CONFIG.yaml [key.sub=value ...]
    grads-ray demo [--output DIR] [key.sub=value ...]
    grads-ray compare CONFIG.yaml [key.sub=value ...]   (strategies x seeds -> report.md, comparison.json)
    grads-ray STAGE [--config CONFIG.yaml] [--model DIR] [--data PATH ...] [--output DIR] [key=value ...]
    grads-ray check-model --model DIR [--data PATH] [score.dtype=...] [--json]   (which score engine it gets)
STAGE is any stage of the job (listed below, in the job's order): it runs with every stage it needs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources
from pathlib import Path

from grads_ray import stopping, storage
from grads_ray.config import INPUT_PATH_LISTS, Config, ConfigError, load_config, path_settings
from grads_ray.data.readers import InputError
from grads_ray.gradients.rules import UnsupportedModel
from grads_ray.stages import STAGES
from grads_ray.stages.base import AccountingError
from grads_ray.stages.score_pass import ScorerFailed

STAGE_COMMANDS = tuple(s.name for s in STAGES)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. select.budget=10%%")
    p.add_argument("--model", help="Hugging Face causal-LM: a folder, an object-store URL or a Hub id "
                                   "org/name[@revision] (model.path)")
    p.add_argument("--data", action="append", help="corpus file or folder (data.paths); repeatable")
    p.add_argument("--output", help="run directory (output)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--limit", type=int, help="smoke test: only the first N rows of the corpus")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument("--allow-empty", action="store_true", help="a stage left with no row (nothing ingested, "
                   "scored or selected) ends the job with exit 0 instead of an error")
    p.add_argument("--on-long", choices=["truncate", "reject"], help="policy for rows over data.max_length")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's and the workers' logs too")
    p.add_argument("--dry-run", action="store_true", help="print the plan (inputs, shards, stages, workers, "
                   "budget) and exit: starts no Ray, writes no output (demo: builds its assets first)")


def build_parser() -> argparse.ArgumentParser:
    from grads_ray.selection.methods import help_text

    methods = "selection methods (select.method=NAME):\n" + help_text()
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="grads-ray", description=__doc__, epilog=methods, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="every stage, from a YAML config", epilog=methods, formatter_class=raw)
    run.add_argument("config")
    _common(run)
    compare = sub.add_parser("compare", help="several strategies and budgets, each fine-tuned and evaluated: a report",
                             epilog=methods, formatter_class=raw)
    compare.add_argument("config")
    _common(compare)
    demo = sub.add_parser("demo", help="build the offline demo corpus and model, then run every stage",
                          epilog=methods, formatter_class=raw)
    _common(demo)
    check = sub.add_parser("check-model", help="which score engine a model folder gets (the batched engine's "
                           "self-check, without scoring a corpus); exit 2 where score.engine=batched refuses it")
    check.add_argument("--config", help="YAML config (score.*, model.* keys)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(check)
    for stage in STAGES:
        p = sub.add_parser(stage.name, help=f"{stage.about} (and the stages it needs)", formatter_class=raw,
                           epilog=methods if stage.name == "select" else None)
        p.add_argument("--config", help="YAML config (defaults for any key not given)")
        _common(p)
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    extra = list(args.overrides or [])
    if args.model:
        extra.append(f"model.path={args.model}")
    if args.data:
        extra.append("data.paths=[" + ",".join(repr(d) for d in args.data) + "]")
    if args.output:
        extra.append(f"output={args.output}")
    if args.address:
        extra.append(f"ray.address={args.address}")
    if args.limit is not None:
        extra.append(f"data.limit={args.limit}")
    if args.strict:
        extra.append("data.strict=true")
    if args.allow_empty:
        extra.append("data.allow_empty=true")
    if args.on_long:
        extra.append(f"data.on_long={args.on_long}")
    return extra


DEMO_PRETRAIN_CHARS = 1_500_000  # general prose the demo's base model is pre-trained on
DEMO_PRETRAIN_TOKENS = 600_000  # about 1.5 passes over it: a minute or two on 2 cores


def demo_config(args: argparse.Namespace) -> Config:
    """Build (once) the demo assets under OUTPUT/assets and point the config at them: the corpus,
    general prose, and a small base model pre-trained on part of that prose (the rest is the
    forgetting test), so that the demo's before/after lines compare a model that knew something."""
    import json
    import shutil

    from grads_ray.demo.corpus import build_corpus, sft_rows
    from grads_ray.demo.model import build_demo_model

    output = Path(args.output or "runs/demo")
    assets = output / "assets"
    if not (assets / "model" / "demo_base.json").exists():  # (assets from before the pre-trained base: rebuilt)
        print(f"grads-ray demo: building the corpus and a small base model under {assets}, pre-trained on "
              f"{DEMO_PRETRAIN_TOKENS:,} tokens of general prose (once; a minute or two) ...", flush=True)
        paths = build_corpus(assets, pretrain_chars=DEMO_PRETRAIN_CHARS)
        texts = [r["prompt"] + "\n" + r["response"] for r in sft_rows()]
        tmp = assets / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        info = build_demo_model(tmp, texts, pretrain_text=Path(paths["pretrain"]).read_text(),
                                pretrain_tokens=DEMO_PRETRAIN_TOKENS)
        info["general_source"] = paths["general_source"]
        (tmp / "demo_base.json").write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(assets / "model", ignore_errors=True)
        tmp.rename(assets / "model")  # complete or absent: an interrupted build starts again
        pt = info["pretrain"]
        print(f"grads-ray demo: base model {info['params']:,} parameters, pre-trained {pt['steps']} steps on "
              f"{paths['general_source']}: loss {pt['first_loss']} -> {pt['last_loss']} ({pt['seconds']:.0f} s)",
              flush=True)
    base = {"output": str(output), "model": {"path": str(assets / "model")},
            "data": {"paths": [str(assets / "corpus")]},
            "eval": {"domain_paths": [str(assets / "heldout.jsonl")], "general_paths": [str(assets / "general.txt")]}}
    cfg_file = resources.files("grads_ray") / "configs" / "demo.yaml"
    with resources.as_file(cfg_file) as path:
        return load_config(path, _overrides(args), base=base)


def resolve(args: argparse.Namespace) -> Config:
    if args.command == "demo":
        return demo_config(args)
    path = args.config if args.command in ("run", "compare") else getattr(args, "config", None)
    cfg = load_config(path, _overrides(args))
    if not cfg.model.path:
        raise ConfigError("model.path is not set (use --model DIR or model.path=DIR)")
    model = storage.location(cfg.model.path)  # a folder or an object-store URL
    if not model.is_dir():
        raise ConfigError(f"model.path {cfg.model.path}: no such folder")
    if not (model / "config.json").is_file():
        raise ConfigError(f"model.path {cfg.model.path}: no config.json (a Hugging Face model folder is expected)")
    for key, folder in (("model.path", cfg.model.path), ("score.model", cfg.score.model)):
        if folder and not any(storage.location(folder).glob("*.safetensors")):
            raise ConfigError(f"{key} {folder}: no .safetensors weights (pickled .bin weights are never "
                              "loaded: convert them with save_pretrained(..., safe_serialization=True))")
    if not cfg.data.paths:
        raise ConfigError("data.paths is empty (use --data PATH or data.paths=[...])")
    for key, p in path_settings(cfg, INPUT_PATH_LISTS):  # (load_config refused every URL but file://)
        if not Path(p).exists():
            raise ConfigError(f"{key}: {p}: no such file or folder")
    return cfg


def main(argv: list[str] | None = None) -> int:
    from grads_ray.data.preflight import check_corpus_encodes
    from grads_ray.runner import Runner
    from grads_ray.stages import closure, job_end
    from grads_ray.stages.base import EmptyStage
    from grads_ray.summary import plan, summary

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # key=value overrides may also follow the options
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*(args.overrides or []), *extra]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("grads_ray").setLevel(logging.INFO)  # stage progress always; Ray's logs with -v
    runner, stop = None, None
    if args.command == "check-model":
        return _check_model(args)
    stopping.reset()
    stopping.install()
    try:
        cfg = resolve(args)
        end = args.command if args.command in STAGE_COMMANDS else None  # None: the whole job
        if args.dry_run:
            print(plan(cfg, end))
            return 0
        if {"warmup", "score"} & {s.name for s in closure(cfg, end or job_end(cfg))}:
            check_corpus_encodes(cfg)  # a model folder that would reject every row: before Ray starts
        if args.command == "compare":
            from grads_ray.compare import run_compare

            result = run_compare(cfg, verbose=args.verbose)
            print(f"grads-ray compare: {len(result['runs'])} runs; report in {Path(cfg.output) / 'report.md'}")
            return 0
        runner = Runner(cfg, verbose=args.verbose)
        runner.run(end)
    except KeyboardInterrupt as exc:  # a signal (grads_ray/stopping.py), or Ray's interrupt in its place
        # handled below: its traceback holds the frames of Ray Data's iterators; once they are gone,
        # the iterators close and their executor threads stop before Ray does
        stop = stopping.as_stopped(exc).with_traceback(None)
    except (ConfigError, InputError, UnsupportedModel, ScorerFailed, AccountingError) as exc:
        print(f"grads-ray: error: {exc}", file=sys.stderr)
        return 2
    except EmptyStage as exc:  # --allow-empty: what ran is summarised, nothing follows
        if runner is not None:
            print(summary(runner))
        print(f"grads-ray: {exc}; stopped there (--allow-empty)")
        return 0
    if stop is not None:
        return _stopped(stop, runner)
    print(summary(runner))
    return 0


def _stopped(stop: stopping.Stopped, runner) -> int:
    """After SIGTERM/SIGINT: what the stage left running closed, Ray shut down if this run started it,
    then one line on what is kept."""
    import gc

    from grads_ray.progress import Progress

    gc.collect()  # the stage's generators (Ray Data's iterators among them) closed: their threads end
    _end_data_executors()

    stage = runner.stopped_in if runner is not None else None
    if runner is not None and runner.started_ray:
        import ray

        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - stopping: what matters is the line below and the exit code
            pass
    where = f" during {stage}" if stage else ""
    progress = Progress.latest.get(stage) if stage else None
    if progress and progress.total and progress.unit == "steps":  # training keeps its checkpoints
        kept = f"at step {progress.done:,} of {progress.total:,}, checkpoints kept"
    elif progress and progress.total:
        kept = f"{progress.done:,} of {progress.total:,} {progress.unit} kept"
    else:
        kept = "finished work is kept"
    out = f" in {runner.cfg.output}" if runner is not None else ""
    print(f"grads-ray: stopped by {stop.name}{where}: {kept}{out}; rerun the same command to go on",
          file=sys.stderr, flush=True)
    return stop.exit_code


def _end_data_executors(timeout: float = 10.0) -> None:
    """Ray Data's executor threads still running (a pass stopped mid-way) shut down and joined: one
    that touches Ray after Ray is shut down makes Ray end the process with exit 1."""
    import threading

    try:
        from ray.data._internal.execution.streaming_executor import StreamingExecutor
    except ImportError:  # another Ray: nothing to end by name
        return
    for thread in threading.enumerate():
        if isinstance(thread, StreamingExecutor) and thread.is_alive():
            try:
                thread.shutdown(force=True)
            except Exception:  # noqa: BLE001 - stopping: best effort
                pass
            thread.join(timeout)


def _check_model(args: argparse.Namespace) -> int:
    from grads_ray.check_model import check_model, render, to_json

    try:
        cfg = load_config(args.config, _overrides(args))
        if not cfg.model.path or not (storage.location(cfg.model.path) / "config.json").is_file():
            raise ConfigError(f"check-model needs --model DIR, a Hugging Face model folder (got {cfg.model.path!r})")
        report, code = check_model(cfg, list(args.data or []))
    except (ConfigError, InputError, UnsupportedModel) as exc:
        print(f"grads-ray: error: {exc}", file=sys.stderr)
        return 2
    print(to_json(report) if args.json else render(report))
    if code:
        print(f"grads-ray: error: {report['refused']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
