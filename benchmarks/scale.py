"""The whole job at corpus scale: each stage of ``grads-ray`` in its own process on N rows of real text,
and the score stage against the same scorer in one process without Ray.

The corpus is made here, offline and deterministically: the installed Python's standard library
(its pure-Python modules, read with ``ast``, nothing imported) as instruction -> code pairs, one per
function, class and method ("Write the Python function `json.dumps`." -> its source, cut at a line
end to keep a row within about 256 tokens); past the number of distinct sources the same code comes
back under the other prompt templates (then numbered), so every id and every prompt is unique. The
model is the demo's (``runs/demo/assets``, built by ``grads-ray demo``'s own code when missing); the
config is the demo's (``data.max_length`` 256, 2 CPUs, scorer batch 32, budget 25%, fine-tune 3
epochs) with the warm-up off (the base model scored as it is) and the job's default shards
(10,000 rows).

Each stage runs as ``python -m grads_ray STAGE`` into one output folder (a later command finds the
earlier stages done and only runs its own), on a local Ray cluster the command starts itself, as a
user's would. For each stage:
- seconds: the process's wall time, and the stage's own ``seconds`` from ``manifest.json`` (without
  Ray's start-up); rows/s from the latter (fine-tune: selected rows x epochs); and the CPU seconds of
  the command's whole process tree (driver, Ray's processes, workers; each sampled every 0.5 s, so
  a process's last half second is missed), which a busy machine disturbs less than wall time;
- driver peak: the high-water mark of the command's resident memory (``VmHWM``, read every 0.1 s;
  it starts afresh at exec), and beside it in the JSON the job's own figure, the manifest's
  ``driver_peak_mb`` (the same ``VmHWM``, read by the driver at the end of each stage);
- workers: the largest ``VmHWM`` of any Ray worker (``ray::`` processes under the command: idle
  workers, tasks, actors; not Ray's agents), and the largest sum of their resident memory at one
  sample (RSS counts the object store's shared pages a worker has touched, so sums overcount);
- object store: the largest plasma use and the bytes spilled, from the raylet's store statistics
  (what ``ray memory --stats-only`` prints; Ray-private API, sampled every 0.5 s: a peak shorter than
  that can be missed; null where the command starts no Ray, as select does, or its raylet could not
  be asked: the JSON then says why).

Ray's share: the first ``--sample`` rows (1,000; 500 with ``--quick``) tokenized as the job does and
scored by ``grads_ray.gradients.scorer.Scorer`` in this process, with the torch threads one scorer actor gets
and in the units the job cuts (8 batches); ``score_ray_share`` = the job's score rows/s / this rows/s
(model loading excluded, tokenizing included on both sides; the job's side also writes what it
scores, this side keeps it in memory), and ``score_ray_share_cpu`` = this side's CPU time per row /
the score command's (model loading included on both sides; the command's also has its start-up,
Ray's processes and every worker's imports: what running under Ray costs).

Without the score stage (``--stages ingest,similarity,select``) its output is written here instead:
synthetic statistics and features of the real shape (schemas copied from a real run on the corpus's
first 256 rows, which also gives the distributions: each synthetic row is a real row's values with
seeded log-normal scale and noise, 2% planted near-copies), under the fingerprint the runner
computes, so the stages after it find it done.

    python benchmarks/scale.py --quick                                          # 10^4 rows, end to end
    python benchmarks/scale.py                                                  # 10^5 rows, end to end
    python benchmarks/scale.py --rows 1000000 --stages ingest,similarity,select  # no model needed

The corpus is kept under ``--out`` (default runs/scale) for the next run of the same N; the run
folder is removed at the end unless ``--keep``. The last line printed is one JSON object with the
headline figures.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from importlib import resources
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from timing import timed  # benchmarks/timing.py: scripts run as python benchmarks/NAME.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grads_ray.config import DataConfig, load_config  # noqa: E402
from grads_ray.rundir import StageDir, read_json, read_parts, write_jsonl, write_parquet  # noqa: E402

STAGE_ORDER = ("ingest", "score", "similarity", "select", "finetune", "evaluate")
DEFAULT_STAGES = "ingest,score,similarity,select,finetune"
GENERATOR = 1  # bump when the corpus recipe changes: a kept corpus of another version is rebuilt
SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
             "dist-packages", "__pycache__"}
TEMPLATES = (
    "Write the Python {kind} `{name}`.",
    "Implement `{name}` as the standard library does.",
    "Show the source of `{name}`.",
    "Give the code of the {kind} `{name}` from Python's standard library.",
    "How is `{name}` written in CPython's standard library? Show the code.",
    "Reproduce the {kind} `{name}` from the module `{module}`.",
    "What is the implementation of `{name}`?",
    "Write `{name}` ({kind} of `{module}`).",
)
MAX_RESPONSE_CHARS = 720  # the demo tokenizer reads code at ~3.3 chars a token: ~220 tokens + the prompt
MIN_RESPONSE_CHARS = 40
SAMPLE_EVERY_S = 0.5  # the process tree and the object store
DRIVER_EVERY_S = 0.1  # the command's own VmHWM: one small file
SCHEMA_ROWS = 256  # rows of the real run whose schemas and values the synthetic scores copy
PLANTED_DUPLICATES = 0.02
TAIL_LINES = 40


# ---------------------------------------------------------------------------------------- corpus
def _defs(body: list[ast.stmt], prefix: str, in_class: bool):
    """(qualified name, kind, node) of every function and class in ``body``, and of the methods and
    nested classes of those classes (functions inside functions are left out)."""
    for node in body:
        if isinstance(node, ast.ClassDef):
            yield f"{prefix}.{node.name}", "class", node
            yield from _defs(node.body, f"{prefix}.{node.name}", True)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            kind = "method" if in_class else "function"
            yield f"{prefix}.{node.name}", ("async " + kind) if isinstance(node, ast.AsyncFunctionDef) else kind, node


def _cut(lines: list[str], node: ast.AST) -> str:
    """A definition's source lines (its ``def``/``class`` line to its end; whole lines, so that a
    method dedents), cut at the last line end within MAX_RESPONSE_CHARS."""
    head, size = [], 0
    for line in lines[node.lineno - 1:node.end_lineno]:
        if size > 2 * MAX_RESPONSE_CHARS:  # enough: the rest is cut anyway
            break
        head.append(line)
        size += len(line)
    text = textwrap.dedent("".join(head)).strip()
    if len(text) <= MAX_RESPONSE_CHARS:
        return text
    cut = text.rfind("\n", 0, MAX_RESPONSE_CHARS)
    return text[:cut if cut > MIN_RESPONSE_CHARS else MAX_RESPONSE_CHARS].rstrip()


def stdlib_sources() -> list[dict]:
    """Every function, class and method of the installed standard library's pure-Python modules
    (files in sorted order, parsed, not imported; unreadable files skipped), one per qualified name,
    ordered by a hash of the name so that any first N rows span the whole library."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    out: dict[str, dict] = {}
    for path in files:
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = text.splitlines(keepends=True)
        for name, kind, node in _defs(tree.body, module, False):
            code = _cut(lines, node)
            if len(code) >= MIN_RESPONSE_CHARS and name not in out:
                out[name] = {"name": name, "kind": kind, "module": module, "code": code}
    return sorted(out.values(), key=lambda s: hashlib.sha256(s["name"].encode()).digest())


def corpus_row(i: int, sources: list[dict]) -> dict:
    """Row ``i``: source ``i mod S`` under the template its pass picks (a hash of the name plus the
    pass), numbered once every template has been used, so (id, prompt) never repeats."""
    n_pass, k = divmod(i, len(sources))
    src = sources[k]
    turn, template = divmod(n_pass, len(TEMPLATES))
    start = int.from_bytes(hashlib.sha256(src["name"].encode()).digest()[:4], "big")
    prompt = TEMPLATES[(start + template) % len(TEMPLATES)].format(**src)
    if turn:
        prompt += f" (variant {turn + 1})"
    return {"id": f"{src['name']}@{n_pass}", "prompt": prompt, "response": src["code"]}


def write_corpus(folder: Path, n: int) -> tuple[Path, dict]:
    """``folder/corpus-N.jsonl`` (prompt/response rows with ids), made once for a given N, Python and
    recipe, and kept. -> (path, what it holds)."""
    path, meta_path = folder / f"corpus-{n}.jsonl", folder / f"corpus-{n}.json"
    want = {"rows": n, "python": platform.python_version(), "generator": GENERATOR}
    if path.exists() and meta_path.exists() and {k: v for k, v in read_json(meta_path).items() if k in want} == want:
        return path, read_json(meta_path)
    t0 = time.perf_counter()
    sources = stdlib_sources()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps(corpus_row(i, sources), ensure_ascii=False) + "\n")
    tmp.rename(path)
    meta = {**want, "distinct_sources": len(sources), "bytes": path.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 1)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return path, meta


def demo_assets(folder: Path) -> Path:
    """The demo's assets folder (model, tokenizer, held-out rows, general text), built by the demo's
    own code (``grads_ray.cli.demo_config``) when missing. Nothing is downloaded."""
    from grads_ray.cli import build_parser, demo_config

    if not (folder / "assets" / "model" / "demo_base.json").exists():
        demo_config(build_parser().parse_args(["demo", "--output", str(folder)]))
    return folder / "assets"


# ------------------------------------------------------------------------------- process sampling
def _hwm_mb(proc: psutil.Process) -> float:
    """A process's peak resident memory so far (Linux ``VmHWM``; elsewhere its RSS now)."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return proc.memory_info().rss / 2**20


def _is_worker(cmd: list[str]) -> bool:
    """A Ray worker process (idle worker, task, actor), not one of Ray's agents."""
    return bool(cmd) and cmd[0].startswith("ray::") and not cmd[0].endswith("Agent")


class StoreStats:
    """The object store of the local cluster whose GCS is at ``gcs``: plasma bytes in use and bytes
    spilled, asked of its raylet (the call behind ``ray memory --stats-only``: Ray-private)."""

    def __init__(self, gcs: str):
        from ray._private.internal_api import get_state_from_address

        state = get_state_from_address(gcs)
        try:
            node = next(n for n in state.node_table() if n["Alive"])
        finally:
            state.disconnect()
        self.address, self.port = node["NodeManagerAddress"], node["NodeManagerPort"]

    def read(self) -> tuple[int, int]:
        """-> (bytes in the object store now, bytes spilled so far)."""
        from ray._private.internal_api import node_stats

        s = node_stats(self.address, self.port, include_memory_info=False).store_stats
        return s.object_store_bytes_used + s.object_store_bytes_fallback, s.spilled_bytes_total


class TreeSampler(threading.Thread):
    """The process ``pid``'s peak memory every DRIVER_EVERY_S seconds, and every SAMPLE_EVERY_S
    everything under it: its Ray workers' peak memory (largest one, largest sum) and ``gcs``, its
    cluster's GCS address, once one of its processes names it."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop_event = pid, threading.Event()
        self.driver_mb = self.worker_mb = self.workers_total_mb = 0.0
        self.gcs: str | None = None
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds (user + system) at its last sample

    @property
    def cpu_s(self) -> float:
        """CPU seconds of the whole tree (the last < SAMPLE_EVERY_S of each process missed)."""
        return sum(self.cpu.values())

    def run(self) -> None:
        every, tick = round(SAMPLE_EVERY_S / DRIVER_EVERY_S), 0
        while not self.stop_event.is_set():
            try:
                root = psutil.Process(self.pid)
                self.driver_mb = max(self.driver_mb, _hwm_mb(root))
                if tick % every == 0:
                    self.sample_tree(root)
            except psutil.NoSuchProcess:  # the command has ended
                return
            tick += 1
            self.stop_event.wait(DRIVER_EVERY_S)

    def sample_tree(self, root: psutil.Process) -> None:
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                self.cpu[p.pid] = t.user + t.system
                cmd = p.cmdline()
                if _is_worker(cmd):
                    total += p.memory_info().rss
                    self.worker_mb = max(self.worker_mb, _hwm_mb(p))
                self.gcs = self.gcs or next((a.split("=", 1)[1] for a in cmd if a.startswith("--gcs-address=")), None)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.workers_total_mb = max(self.workers_total_mb, total / 2**20)


class StoreSampler(threading.Thread):
    """Every SAMPLE_EVERY_S seconds, once ``tree`` has found the cluster, its object store's use and
    spilled bytes (a thread of its own: a slow answer never delays the memory samples)."""

    def __init__(self, tree: TreeSampler):
        super().__init__(daemon=True)
        self.tree, self.stop_event = tree, threading.Event()
        self.peak: int | None = None
        self.spilled: int | None = None
        self.error = ""

    def run(self) -> None:
        store = None
        while not self.stop_event.wait(SAMPLE_EVERY_S):
            if not self.tree.gcs:
                continue
            try:
                store = store or StoreStats(self.tree.gcs)
                used, spilled = store.read()
            except Exception as exc:  # noqa: BLE001 - a cluster starting or stopping: the figures stay as they were
                self.error = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            self.peak, self.spilled = max(self.peak or 0, used), max(self.spilled or 0, spilled)


def ray_client_env() -> None:
    """Let this process talk to the clusters the commands start: they turn on token authentication
    by default (Ray >= 2.59) with the token in ~/.ray/auth_token; and keep gRPC's notices of a
    cluster going away out of the output. The commands get the environment as it was."""
    if "RAY_AUTH_MODE" not in os.environ and (Path.home() / ".ray" / "auth_token").exists():
        os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def clear_stale_cluster_file() -> None:
    """A ``/tmp/ray/ray_current_cluster`` left by a killed ``ray start`` stalls Ray Train's clean-up
    (docs/benchmarks.md): removed when no GCS runs on this machine."""
    stale = Path("/tmp/ray/ray_current_cluster")
    if not stale.exists():
        return
    if any(p.info["name"] == "gcs_server" for p in psutil.process_iter(["name"])):
        print(f"# warning: {stale} exists and a Ray cluster runs here: Ray Train may stall on it", flush=True)
        return
    stale.unlink()
    print(f"# removed a stale {stale} (no Ray runs on this machine)", flush=True)


# ---------------------------------------------------------------------------------------- stages
def run_command(stage: str, overrides: list[str], logs: Path, env: dict[str, str], extra: list[str] = ()) -> dict:
    """``python -m grads_ray STAGE`` with the overrides, sampled while it runs. A non-zero exit stops
    the benchmark with the command's stderr tail. -> wall seconds and the sampled peaks."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{stage}.out", logs / f"{stage}.err"
    cmd = [sys.executable, "-m", "grads_ray", stage, *extra, *overrides]
    t0 = time.perf_counter()
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT)
        tree = TreeSampler(proc.pid)
        store = StoreSampler(tree)
        tree.start()
        store.start()
        code = proc.wait()
        for t in (tree, store):
            t.stop_event.set()
        tree.join()
        store.join(timeout=5)  # a call to a raylet that has gone: left to time out on its own
    wall = time.perf_counter() - t0
    if code != 0:
        tail = "\n".join(err_path.read_text(errors="replace").splitlines()[-TAIL_LINES:])
        raise SystemExit(f"benchmarks/scale.py: `grads-ray {stage}` failed (exit {code}) after {wall:.1f} s; "
                         f"stderr ({err_path}) ends:\n{tail}")
    mb = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
    return {"exit": code, "wall_s": round(wall, 2), "cpu_s": round(tree.cpu_s, 1),
            "driver_peak_mb": round(tree.driver_mb, 1),
            "worker_peak_mb": round(tree.worker_mb, 1), "workers_total_peak_mb": round(tree.workers_total_mb, 1),
            "object_store_peak_mb": mb(store.peak), "spilled_mb": mb(store.spilled),
            "store_error": store.error if store.peak is None and tree.gcs else ""}


def stage_rows(stage: str, info: dict, cfg) -> int | None:
    """The rows a stage handled: ingested, scored, or (fine-tune) selected x epochs."""
    if stage == "ingest":
        return info.get("rows")
    if stage in ("score", "select"):
        return info.get("scored")
    if stage == "similarity":
        return info.get("vectors")
    if stage == "finetune":
        return info.get("rows", 0) * cfg.finetune.epochs
    if stage == "evaluate":
        return info.get("heldout_examples")
    return None


def record(stage: str, measured: dict, out: Path, cfg) -> dict:
    """A stage's figures: the command's (``measured``) with the manifest's seconds and rows."""
    manifest = read_json(out / "manifest.json")
    info = manifest["stages"].get(stage, {})
    rows, seconds = stage_rows(stage, info, cfg), info.get("seconds")
    return {"stage": stage, **measured, "stage_s": seconds, "rows": rows,
            "ray_start_s": manifest.get("ray_start_seconds"), "manifest_driver_peak_mb": info.get("driver_peak_mb"),
            "rows_per_s": round(rows / seconds, 1) if rows is not None and seconds else None}


# ------------------------------------------------------------------------------- Ray's share
def job_threads(cfg) -> int:
    """The torch threads one CPU scorer actor gets (grads_ray/stages/score_pass.py, ``_stream_receipts``): the
    cluster's CPUs shared among the actors, one left for tokenizing."""
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    return max(1, int(cpus // max(cfg.score.num_actors, 1)) - 1)


def tokenize_rows(lines: list[str], cfg) -> list[tuple[list[int], list[int]]]:
    """JSON lines -> (input_ids, labels), as the job's tokenizing step does (rejects left out)."""
    from grads_ray.data.formats import RowError, normalize
    from grads_ray.data.tokenize import encode, load_tokenizer

    tok = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)  # cached: loaded before the clock starts
    out = []
    for line in lines:
        try:
            out.append(encode(normalize(json.loads(line)), tok, cfg.data.max_length, cfg.data.on_long))
        except RowError:
            continue
    return out


def score_units(model_path: str, examples: list[tuple[list[int], list[int]]], cfg, threads: int) -> float:
    """Score ``examples`` with the job's scorer in this process, one call per unit of 8 batches (as
    the job's blocks; batches cut inside a unit by length, as there). -> seconds of the calls
    (model loading excluded). The one place that knows the Scorer's call: adapt here if it changes."""
    from grads_ray.gradients.batch_size import fixed_batch_size
    from grads_ray.gradients.scorer import ROWS_PER_BLOCK_BATCHES, Scorer, engine_settings

    batch = fixed_batch_size(cfg.score.batch_size)  # (a CPU benchmark: auto is 16 there)
    scorer = Scorer(model_path, threads=threads, settings=engine_settings(cfg.score, cfg.seed, cfg.deterministic),
                    batch_size=batch, trust_remote_code=cfg.model.trust_remote_code)
    unit = ROWS_PER_BLOCK_BATCHES * batch
    t0 = time.perf_counter()
    for start in range(0, len(examples), unit):
        part = examples[start:start + unit]
        m = len(part)
        scorer({"id": np.array([str(start + i) for i in range(m)], dtype=object), "shard": np.zeros(m, np.int64),
                "source": np.array(["sample"] * m, dtype=object), "line": np.arange(start, start + m),
                "pos": np.arange(start, start + m), "input_ids": [np.asarray(x, np.int64) for x, _ in part],
                "labels": [np.asarray(y, np.int64) for _, y in part], "reason": np.array([""] * m, dtype=object),
                "detail": np.array([""] * m, dtype=object), "truncated": np.zeros(m, dtype=bool)})
    return time.perf_counter() - t0


def in_process_rate(corpus: Path, n: int, cfg) -> dict:
    """The corpus's first ``n`` rows tokenized and scored in this process. -> rows/s and its parts."""
    import torch
    from transformers.utils import logging as hf_logging

    from grads_ray.data.tokenize import load_tokenizer

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the benchmark's output
    with corpus.open(encoding="utf-8") as fh:
        lines = [fh.readline() for _ in range(n)]
    threads = job_threads(cfg)
    torch.set_num_threads(threads)
    load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    cpu0 = time.process_time()
    examples, tok_s = timed(tokenize_rows, [line for line in lines if line.strip()], cfg)
    score_s, cpu_s = score_units(cfg.model.path, examples, cfg, threads), time.process_time() - cpu0
    return {"rows": len(examples), "threads": threads, "tokenize_s": round(tok_s, 2), "score_s": round(score_s, 2),
            "rows_per_s": round(len(examples) / (tok_s + score_s), 1),
            "cpu_ms_per_row": round(1000 * cpu_s / max(len(examples), 1), 2),  # model loading included
            "process_peak_mb": round(_hwm_mb(psutil.Process()), 1)}  # this whole process's, scorer included


# --------------------------------------------------------------------------- synthetic scores
def _jitter(values: np.ndarray, pick: np.ndarray, scale: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Real rows' values (``pick``), times a per-row scale (magnitudes) and 10% log-normal noise."""
    x = values[pick] * rng.lognormal(0.0, 0.1, len(pick))
    return x * scale if scale is not None else x


def synthetic_stats(ids: pa.Array, real: pa.Table, schema: pa.Schema, pick: np.ndarray, scale: np.ndarray,
                    rng: np.random.Generator) -> pa.Table:
    """A shard's stats table in the real schema: each row a real row's values with noise."""
    cols = []
    for f in schema:
        if f.name == "id":
            cols.append(ids)
        elif pa.types.is_floating(f.type):
            values = real[f.name].to_numpy(zero_copy_only=False).astype(np.float64)
            cols.append(pa.array(_jitter(values, pick, scale if "grad_" in f.name else None, rng), f.type))
        else:  # token counts and flags: the real row's
            cols.append(real[f.name].take(pa.array(pick)).cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def synthetic_features(ids: pa.Array, real: pa.Table, schema: pa.Schema, pick: np.ndarray, scale: np.ndarray,
                       rng: np.random.Generator) -> pa.Table:
    """A shard's features table in the real schema (field metadata, shapes): real vectors scaled,
    with noise of half each dimension's spread, and PLANTED_DUPLICATES of the rows near-copies of
    others."""
    from grads_ray.columns import matrix

    n = len(pick)
    copies = rng.choice(n, int(PLANTED_DUPLICATES * n), replace=False) if n > 1 else np.zeros(0, np.int64)
    origin = rng.integers(0, n, len(copies))
    cols = []
    for f in schema:
        if f.name == "id":
            cols.append(ids)
            continue
        if not pa.types.is_list(f.type):
            values = real[f.name].to_numpy(zero_copy_only=False).astype(np.float64)
            cols.append(pa.array(_jitter(values, pick, scale**2, rng), f.type))
            continue
        m = matrix(real[f.name])  # (R, w)
        x = m[pick] * scale[:, None].astype(np.float32)  # (n, w)
        x += rng.normal(0.0, 0.5, x.shape).astype(np.float32) * m.std(0)
        x[copies] = x[origin] + rng.normal(0.0, 1e-3, (len(copies), x.shape[1])).astype(np.float32) * m.std(0)
        w = x.shape[1]
        col = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * w), pa.array(x.reshape(-1)))
        cols.append(col.cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def synthesize_scores(cfg, schema_out: Path, seed: int) -> dict:
    """The score stage's output for every ingested shard, made up from a real run's (``schema_out``),
    written through the runner as a stand-in score stage: same fingerprint, folders, ledgers and
    checks as the real one, so later commands find it done. -> the stage's SUCCESS info."""
    from grads_ray.runner import Runner
    from grads_ray.stages import STAGES
    from grads_ray.stages.score import Score

    real = {d: read_parts(StageDir(schema_out, d).parts()) for d in ("stats", "features")}
    schemas = {d: pq.read_schema(str(StageDir(schema_out, d).parts()[0])).remove_metadata() for d in real}

    class SyntheticScore(Score):
        def run(self, ctx, out):
            rng = np.random.default_rng(seed)
            shards = ctx.need("ingest").value.shards
            total = {"scored": 0, "truncated": 0, "nonfinite": 0}
            for sh in shards:
                ids = pq.read_table(str(ctx.need("ingest").value.rows.part(sh.index)), columns=["id"])["id"]
                ids = ids.combine_chunks().take(pc.sort_indices(ids))
                pick = rng.integers(0, real["stats"].num_rows, len(ids))
                scale = rng.lognormal(0.0, 0.25, len(ids))
                stats = synthetic_stats(ids, real["stats"], schemas["stats"], pick, scale, rng)
                feats = synthetic_features(ids, real["features"], schemas["features"], pick, scale, rng)
                write_parquet(out["stats"].part(sh.index), stats)
                write_parquet(out["features"].part(sh.index), feats)
                write_jsonl(out["stats"].rejects(sh.index), [])
                info = {"shard": sh.index, "scored": len(ids), "rejected": 0, "nodes": [], "synthetic": True,
                        "truncated": int(pc.sum(stats["truncated"]).as_py() or 0),
                        "nonfinite": len(ids) - int(pc.sum(stats["finite"]).as_py() or 0)}
                out["features"].mark_done(sh.index, info)
                out["stats"].mark_done(sh.index, info)
                for k in total:
                    total[k] += info[k]
            return {**total, "rejected": 0, "nodes": [], "model": ctx.cfg.model.path, "shards_this_run": len(shards),
                    "shards_reused": 0, "engine": "synthetic", "synthetic": True}

    stages = tuple(SyntheticScore() if s.name == "score" else s for s in STAGES)
    return Runner(cfg, stages=stages).need("score").info


# ---------------------------------------------------------------------------------------- report
def print_table(results: list[dict]) -> None:
    head = (f"{'stage':<11}{'rows':>9}{'wall s':>9}{'stage s':>9}{'cpu s':>8}{'rows/s':>9}{'driver MB':>11}"
            f"{'worker MB':>11}{'workers MB':>12}{'store MB':>10}{'spilled MB':>12}{'ray s':>7}{'exit':>6}")
    print(head)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in results:
        print(f"{r['stage']:<11}{fmt(r['rows'], ',d'):>9}{r['wall_s']:>9.1f}{fmt(r['stage_s'], '.1f'):>9}{r['cpu_s']:>8.1f}"
              f"{fmt(r['rows_per_s'], ',.1f'):>9}{r['driver_peak_mb']:>11.0f}{r['worker_peak_mb']:>11.0f}"
              f"{r['workers_total_peak_mb']:>12.0f}{fmt(r['object_store_peak_mb'], '.1f'):>10}"
              f"{fmt(r['spilled_mb'], '.1f'):>12}{fmt(r['ray_start_s'], '.1f'):>7}{r['exit']:>6}")


def parse_stages(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGE_ORDER]
    if unknown or not names:
        raise SystemExit(f"--stages: unknown {unknown or text!r} (known: {', '.join(STAGE_ORDER)})")
    if "score" not in names and "ingest" not in names:
        names.append("ingest")  # synthetic scores are written for the shards a real ingest made
    return [s for s in STAGE_ORDER if s in names]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10^4 rows (default 10^5)")
    ap.add_argument("--rows", type=int, help="rows of the corpus")
    ap.add_argument("--stages", default=DEFAULT_STAGES, help=f"in job order; without score, synthetic scores "
                    f"(of {', '.join(STAGE_ORDER)}; default {DEFAULT_STAGES})")
    ap.add_argument("--out", default="runs/scale", help="work folder: corpora (kept), runs, logs")
    ap.add_argument("--demo", default="runs/demo", help="the demo's output folder, whose assets/ are used")
    ap.add_argument("--sample", type=int, help="rows scored in one process for Ray's share (1000; --quick 500)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    ap.add_argument("--seed", type=int, default=0, help="synthetic scores' seed")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (default: removed at the end)")
    a = ap.parse_args()
    a.rows = a.rows or (10**4 if a.quick else 10**5)
    a.sample = min(a.sample or (500 if a.quick else 1000), a.rows)
    a.stages = parse_stages(a.stages)
    a.synthetic = "score" not in a.stages and len(a.stages) > 1
    return a


def job_overrides(assets: Path, corpus: Path, extra: list[str]) -> list[str]:
    """The config every command gets on top of the demo's: this corpus and the demo's model, no
    warm-up, the job's default shards (the demo's are small), the demo's held-out files."""
    return [f"model.path={assets / 'model'}", f"data.paths=['{corpus}']", "warmup.enabled=false",
            f"data.shard_bytes={DataConfig().shard_bytes}", f"eval.domain_paths=['{assets / 'heldout.jsonl'}']",
            f"eval.general_paths=['{assets / 'general.txt'}']", *extra]


def run_stages(a: argparse.Namespace, base: list[str], out: Path, corpus: Path, logs: Path,
               env: dict[str, str]) -> tuple[list[dict], dict | None, dict | None]:
    """Each stage's command in turn; Ray's share right after score; synthetic scores right after
    ingest when score is not run. -> (each stage's figures, the in-process score, the synthesis)."""
    demo_yaml = ["--config", str(resources.files("grads_ray") / "configs" / "demo.yaml")]
    overrides = [*base, f"output={out}"]
    cfg = load_config(demo_yaml[1], overrides)
    results, share, synth = [], None, None
    for stage in a.stages:
        results.append(record(stage, run_command(stage, overrides, logs, env, demo_yaml), out, cfg))
        print(f"#   {stage}: {results[-1]['wall_s']:.1f} s", flush=True)
        if stage == "score":
            share = in_process_rate(corpus, a.sample, cfg)
            print(f"#   one process, first {a.sample} rows: {share['rows_per_s']} rows/s", flush=True)
        if stage == "ingest" and a.synthetic:
            schema_out = out.parent / "schema"
            run_command("score", [*base, f"output={schema_out}", f"data.limit={SCHEMA_ROWS}"], logs / "schema",
                        env, demo_yaml)
            synth, seconds = timed(synthesize_scores, cfg, schema_out, a.seed)
            synth["seconds"] = round(seconds, 1)
            print(f"#   synthetic scores: {synth['scored']:,} rows in {synth['seconds']} s", flush=True)
    return results, share, synth


def headline(a: argparse.Namespace, meta: dict, results: list[dict], share: dict | None, synth: dict | None,
             cfg) -> dict:
    """The last line's figures."""
    by = {r["stage"]: r for r in results}
    job_rate = by.get("score", {}).get("rows_per_s")
    score = by.get("score", {})
    job_cpu = round(1000 * score["cpu_s"] / score["rows"], 2) if score.get("rows") else None
    per_stage = lambda key: {s: r[key] for s, r in by.items()}  # noqa: E731
    summary = {
        "rows": a.rows, "stages": a.stages, "synthetic_scores": a.synthetic,
        "distinct_sources": meta["distinct_sources"],
        "score_ray_share": round(job_rate / share["rows_per_s"], 3) if share and job_rate else None,
        "score_job_rows_per_s": job_rate, "score_in_process": share,
        "score_ray_share_cpu": round(share["cpu_ms_per_row"] / job_cpu, 3) if share and job_cpu else None,
        "score_job_cpu_ms_per_row": job_cpu,
        "cpu_s_by_stage": per_stage("cpu_s"),
        "driver_peak_mb_by_rows": {str(a.rows): per_stage("driver_peak_mb")},
        # the job's own figure (VmHWM read by the driver when each stage ends)
        "manifest_driver_peak_mb": per_stage("manifest_driver_peak_mb"),
        "rows_per_s_by_stage": per_stage("rows_per_s"),
        "seconds_by_stage": {s: {"wall": r["wall_s"], "stage": r["stage_s"], "ray_start": r["ray_start_s"]}
                             for s, r in by.items()},
        "worker_peak_mb_by_stage": per_stage("worker_peak_mb"),
        "workers_total_peak_mb_by_stage": per_stage("workers_total_peak_mb"),
        "object_store_peak_mb_by_stage": per_stage("object_store_peak_mb"),
        "spilled_mb_by_stage": per_stage("spilled_mb"),
        "synthetic_score_seconds": synth["seconds"] if synth else None,
        "cpus": os.cpu_count(), "ray_num_cpus": cfg.ray.num_cpus, "python": platform.python_version(),
    }
    errors = {s: r["store_error"] for s, r in by.items() if r["store_error"]}
    if errors:
        summary["object_store_errors"] = errors
    return summary


def main() -> None:
    a = parse_args()
    work = Path(a.out) if Path(a.out).is_absolute() else (ROOT / a.out).resolve()
    env = dict(os.environ)  # the commands' environment, as this process got it
    ray_client_env()
    clear_stale_cluster_file()
    assets = demo_assets((ROOT / a.demo).resolve())
    corpus, meta = write_corpus(work, a.rows)
    base = job_overrides(assets, corpus, a.set)
    out = work / f"run-{a.rows}{'-synthetic' if a.synthetic else ''}"
    shutil.rmtree(out, ignore_errors=True)  # a run left here would make every stage a memo hit
    cfg = load_config(str(resources.files("grads_ray") / "configs" / "demo.yaml"), [*base, f"output={out}"])
    print(f"# scale benchmark: {a.rows:,} rows ({meta['distinct_sources']:,} distinct standard-library sources, "
          f"{meta['bytes'] / 2**20:.0f} MB), stages {','.join(a.stages)}"
          f"{' (synthetic scores)' if a.synthetic else ''}; {platform.machine()}, {os.cpu_count()} cpus, "
          f"Python {platform.python_version()}, ray.num_cpus {cfg.ray.num_cpus}", flush=True)
    results, share, synth = run_stages(a, base, out, corpus, work / f"logs-{a.rows}", env)
    print_table(results)
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(headline(a, meta, results, share, synth, cfg)))


if __name__ == "__main__":
    main()
