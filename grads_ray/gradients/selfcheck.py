"""The engine checks itself on the model it is given, before any corpus row is scored.

A few real rows of different lengths, padded as the job pads them, go through the batched engine;
the same rows go one at a time, unpadded, through plain autograd on the same device and dtype. Every
number the engine reports is compared: each example's loss, the overall and per-group statistics,
each trainable parameter's per-example moments (norm, entry sum, max, min), the projected gradient
and the mean hidden state. Errors are relative to the number's own size, floored where a value near
zero has no relative error of its own (:func:`scaled_error`). One number over the dtype's tolerance
and the batched engine is not used on this model: ``score.engine=auto`` scores one example at a time,
``score.engine=batched`` stops with the names of the parameters that disagree.

Pure torch: :func:`build_engine` is what a scorer calls; ``grads-ray check-model`` prints its verdict.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from grads_ray.data.batching import pad_batch
from grads_ray.data.formats import IGNORE_INDEX
from grads_ray.determinism import explain
from grads_ray.gradients.engine import BatchedGradStats
from grads_ray.gradients.features import mean_over
from grads_ray.gradients.groups import group_of
from grads_ray.gradients.memory import out_of_memory
from grads_ray.gradients.rules import UnsupportedModel
from grads_ray.gradients.stats import LoopGradStats, forward_hidden, response_loss

log = logging.getLogger("grads_ray")

# Largest relative error the check lets through, by the dtype it runs in: (the numbers written: loss,
# statistics, grad_proj, hidden_mean; each parameter's own moments). The rounding of two exact methods
# (measured on every family of docs/model_coverage.md, the figures in docs/score_engine.md) sits well
# below; a wrong rule is off by 17% to 1000%. A half-precision model is checked twice: in its own
# dtype (a rule that breaks or overflows there is found before the corpus, within bfloat16's rounding)
# and with its parameters cast to float32 in place and back (exact), where a wrong rule cannot hide in
# the rounding.
TOLERANCE = {torch.float64: (1e-5, 1e-5), torch.float32: (2e-4, 2e-3), torch.bfloat16: (0.25, 0.25),
             torch.float16: (0.15, 0.15)}
# A parameter's numbers are compared relative to their own size, floored at FLOOR x what its norm
# would be if its entries were the size of the model's average entry: a gradient that is zero in exact
# arithmetic (a key bias under softmax) is rounding noise on both sides, with no relative error.
# (Blenderbot's key bias: 1e-10 exact, 5e-10 batched, next to an average-entry norm of 0.012.)
FLOOR = {torch.float64: 1e-9, torch.float32: 3e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}
CHECK_ROWS = 4  # rows the check scores (score.check_rows)


class ModelRefused(UnsupportedModel):
    """``score.engine=batched`` on a model the batched engine is not exact on (or has no rule for)."""


@dataclass
class CheckResult:
    """What the self-check found, for the log and the manifest."""

    engine: str  # the engine the scorer uses: batched | loop
    passed: bool | None  # None: not run (score.engine=loop, or no rule to check)
    reason: str = ""  # why not batched
    max_rel_error: float | None = None
    worst: str = ""  # the number with the largest error
    failures: list[str] = field(default_factory=list)  # a line per parameter over the tolerance, worst first
    tolerance: dict[str, float] | None = None  # written numbers, parameters' own moments
    dtype: str = ""
    device: str = ""
    rows: int = 0
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    errors: dict[str, float] = field(default_factory=dict)  # the largest error of each kind of number
    float32: dict[str, Any] | None = None  # a half-precision model's second check, in float32
    oom: bool = False  # the check itself did not fit in memory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.passed:
            return (f"batched engine exact on this model: max relative error {self.max_rel_error:.1e} "
                    f"({self.dtype}, {self.rows} rows, {self.seconds:.1f} s)")
        return self.reason


def scaled_error(got: float, want: float, floor: float) -> float:
    """|got − want| relative to max(|want|, floor); NaN or inf where the reference is finite: inf."""
    if not math.isfinite(got) and math.isfinite(want):
        return math.inf
    if got == want or (math.isnan(got) and math.isnan(want)):
        return 0.0
    return abs(got - want) / max(abs(want), floor, 1e-300)


def synthetic_examples(vocab: int, n: int = CHECK_ROWS, seed: int = 0, lengths: tuple[int, ...] = (7, 12, 19, 26, 33, 40)
                       ) -> list[tuple[list[int], list[int]]]:
    """Rows of random tokens of different lengths, each with a masked prompt of 1 to 3 tokens fewer than
    half its length: for a model folder checked without a corpus."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        ids = rng.integers(0, vocab, size=length).tolist()
        prompt = int(rng.integers(1, max(2, length // 2)))
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def pick_rows(examples: list[tuple[list[int], list[int]]], n: int = CHECK_ROWS) -> list[tuple[list[int], list[int]]]:
    """Up to ``n`` rows of different lengths, from the shortest to the longest, each with at least one
    response token (a row with none has no gradient to compare)."""
    usable = sorted({len(x): (x, y) for x, y in examples if sum(t != IGNORE_INDEX for t in y[1:]) > 0}.items())
    if len(usable) <= n:
        return [row for _, row in usable]
    picks = np.unique(np.linspace(0, len(usable) - 1, n).round().astype(int))
    return [usable[i][1] for i in picks]


def _reference(model, params, ids: torch.Tensor, labels: torch.Tensor, projector) -> dict[str, Any]:
    """One unpadded example by plain autograd: loss, each parameter's moments, the projected gradient's
    inner coordinates, the mean hidden state over response tokens."""
    logits, hidden = forward_hidden(model, ids[None])
    loss = response_loss(logits[0], labels)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True, materialize_grads=True)
    row: dict[str, Any] = {"loss": loss.item(), "params": {}}
    inner = []
    for (name, _), g in zip(params, grads, strict=True):
        g64 = g.detach().to(torch.float64)
        row["params"][name] = {"s": g64.sum().item(), "ss": g64.square().sum().item(), "mx": g64.max().item(),
                               "mn": g64.min().item(), "l1": g64.abs().sum().item(), "n": g.numel()}
        if projector is not None:
            inner.append(projector.project_param(name, g64).cpu())
    if projector is not None:
        row["proj"] = projector.sketch(torch.cat(inner)[None])[0].numpy()
    h = hidden[0].detach().to(torch.float64)
    row["hidden"] = mean_over(h[None], (labels != IGNORE_INDEX)[None])[0].cpu().numpy()
    return row


def _stats(moments: list[dict[str, float]]) -> dict[str, float]:
    n = sum(m["n"] for m in moments)
    s, ss = sum(m["s"] for m in moments), sum(m["ss"] for m in moments)
    mean = s / n
    return {"grad_norm": math.sqrt(ss), "grad_mean": mean, "grad_std": math.sqrt(max(ss / n - mean * mean, 0.0)),
            "grad_max": max(m["mx"] for m in moments), "grad_min": min(m["mn"] for m in moments),
            "n": n, "l1": sum(m["l1"] for m in moments)}


def compare(engine: BatchedGradStats, model, examples: list[tuple[list[int], list[int]]], pad_id: int,
            tolerance: float) -> tuple[dict[str, tuple[float, str]], list[str]]:
    """The batched engine on the padded rows against plain autograd on each row alone.
    -> (the largest error of each kind of number and which number it was on: ``loss``, ``statistics``
    (the columns written), ``parameters`` (each parameter's moments), ``grad_proj``, ``hidden_mean``;
    a line per parameter over ``tolerance``, worst first)."""
    device = next(model.parameters()).device
    dtype = next(iter(engine.params.values())).dtype if engine.params else torch.float32
    ids, labels, mask = pad_batch([np.asarray(x) for x, _ in examples], [np.asarray(y) for _, y in examples], pad_id)
    keep = engine.keep_params
    engine.keep_params = True
    try:
        out = engine(ids.to(device), labels.to(device), mask.to(device))
    finally:
        engine.keep_params = keep
    params = [(n, p) for n, p in engine.params.items()]
    per_param: dict[str, tuple[float, str]] = {}
    by_kind: dict[str, tuple[float, str]] = {}

    def note(err: float, what: str, kind: str) -> None:
        err = math.inf if math.isnan(err) else err  # NaN counts as a failure
        if kind not in by_kind or not err <= by_kind[kind][0]:
            by_kind[kind] = (err, what)

    for i, (x, y) in enumerate(examples):
        ref = _reference(model, params, torch.as_tensor(x, device=device), torch.as_tensor(y, device=device),
                         engine.projector)
        note(scaled_error(out.columns["loss"][i], ref["loss"], 0.0), f"loss (example {i})", "loss")
        total = _stats(list(ref["params"].values()))
        groups: dict[str, list[dict[str, float]]] = {}
        for name, m in ref["params"].items():
            groups.setdefault(group_of(name), []).append(m)
            got = out.params[name]
            rms = math.sqrt(m["ss"] / m["n"])
            floor = FLOOR.get(dtype, 1e-2) * total["grad_norm"] * math.sqrt(m["n"] / total["n"])
            errs = {"norm": scaled_error(math.sqrt(max(got["ss"][i], 0.0)), math.sqrt(m["ss"]), floor),
                    "sum": scaled_error(got["s"][i], m["s"], max(math.sqrt(m["ss"]), floor)),
                    "max": scaled_error(got["mx"][i], m["mx"], max(rms, floor / math.sqrt(m["n"]))),
                    "min": scaled_error(got["mn"][i], m["mn"], max(rms, floor / math.sqrt(m["n"])))}
            if not engine.extrema:
                errs.pop("max"), errs.pop("min")
            kind, err = max(errs.items(), key=lambda kv: kv[1] if not math.isnan(kv[1]) else math.inf)
            note(err, f"{name} {kind} (example {i})", "parameters")
            if not err <= per_param.get(name, (0.0, ""))[0]:
                per_param[name] = (err, kind)
        for prefix, stats in [("", total)] + [(f"{g}.", _stats(v)) for g, v in groups.items()]:
            rms = stats["grad_norm"] / math.sqrt(stats["n"])
            for key in ("grad_norm", "grad_mean", "grad_std", "grad_max", "grad_min"):
                if key in ("grad_max", "grad_min") and not engine.extrema:
                    continue
                floor = stats["grad_norm"] if key == "grad_mean" else rms
                note(scaled_error(out.columns[prefix + key][i], stats[key], floor), f"{prefix}{key} (example {i})",
                     "statistics")
        if out.grad_proj is not None:
            want = ref["proj"]
            note(float(np.linalg.norm(out.grad_proj[i] - want) / max(np.linalg.norm(want), 1e-300)),
                 f"grad_proj (example {i})", "grad_proj")
        want = ref["hidden"]
        note(float(np.abs(out.hidden_mean[i] - want).max() / max(np.abs(want).max(), 1e-300)),
             f"hidden_mean (example {i})", "hidden_mean")
    lines = [f"{name}: batched grad differs from autograd by {_pct(err)} ({kind})"
             for name, (err, kind) in sorted(per_param.items(), key=lambda kv: -kv[1][0]) if not err <= tolerance]
    return by_kind, lines


def _pct(err: float) -> str:
    return "inf" if math.isinf(err) else f"{100 * err:.3g}%"


def _check_once(engine: BatchedGradStats, model, examples, pad_id: int, tol: tuple[float, float]) -> CheckResult:
    """One comparison; ``tol`` = (numbers written, parameters' own moments)."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    result = CheckResult(engine="batched", passed=True, tolerance={"written": tol[0], "parameters": tol[1]},
                         dtype=str(dtype).replace("torch.", ""), device=device.type, rows=len(examples),
                         tokens=[len(x) for x, _ in examples])
    t0 = time.perf_counter()
    try:
        by_kind, lines = compare(engine, model, examples, pad_id, tol[1])
    except UnsupportedModel as exc:
        result.passed, result.engine, result.reason = False, "loop", str(exc)
    except Exception as exc:  # noqa: BLE001 - a rule that breaks on this model is a failed check
        if explain(exc):  # an op with no deterministic kernel: the setting's to change, not the engine's
            raise
        result.passed, result.engine = False, "loop"
        if out_of_memory(exc):
            result.oom = True
            result.reason = f"the self-check ran out of memory: {str(exc).splitlines()[0][:200]}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            result.reason = f"the batched engine failed on this model: {type(exc).__name__}: {exc}"
    else:
        result.errors = {k: v for k, (v, _) in by_kind.items()}
        result.max_rel_error, result.worst = max(by_kind.values())
        result.failures = lines[:20]
        over = [(err / tol[k == "parameters"], k, where) for k, (err, where) in by_kind.items()
                if not err <= tol[k == "parameters"]]
        if over:
            result.passed, result.engine = False, "loop"
            _, kind, where = max(over)
            if lines:  # the parameters that disagree name the rule at fault: they come first
                kind = "parameters"
                head = lines[0] + (f" (and {len(lines) - 1} more parameters)" if len(lines) > 1 else "")
            else:
                head = f"{where}: batched differs from autograd by {_pct(by_kind[kind][0])}"
            result.reason = (f"the batched engine is not exact on this model: {head}; tolerance "
                             f"{tol[kind == 'parameters']:g} in {result.dtype}")
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def run_check(engine: BatchedGradStats, model, examples, pad_id: int, tolerance: float | None = None) -> CheckResult:
    """The self-check of a built engine, in the model's dtype and, for a half-precision model, again
    with its parameters in float32 (cast in place, and back exactly). Any error inside the batched
    pass is a failed check whose reason names it, never an exception."""
    dtype = next(model.parameters()).dtype
    tol = TOLERANCE.get(dtype, (0.25, 0.25)) if tolerance is None else (tolerance, tolerance)
    result = _check_once(engine, model, examples, pad_id, tol)
    if not result.passed or dtype not in (torch.bfloat16, torch.float16):
        return result
    params = [p for p in model.parameters() if p.dtype == dtype]
    try:
        for p in params:
            p.data = p.data.float()
        wide = _check_once(engine, model, examples, pad_id, TOLERANCE[torch.float32])
    finally:
        for p in params:
            p.data = p.data.to(dtype)
    result.seconds = round(result.seconds + wide.seconds, 3)
    result.float32 = {k: getattr(wide, k) for k in ("passed", "max_rel_error", "worst", "tolerance", "seconds",
                                                     "errors", "reason")}
    if wide.oom:  # a model too large for its float32 copy on this device: its own dtype's check stands
        log.warning("[grads-ray] score: the self-check's float32 pass did not fit (%s); the %s pass stands",
                    wide.reason, result.dtype)
    elif not wide.passed:
        result.passed, result.engine, result.failures = False, "loop", wide.failures
        result.reason = wide.reason + f" (parameters cast from {result.dtype} to float32 for the check)"
    return result


def build_engine(model, settings: dict[str, Any], examples: list[tuple[list[int], list[int]]], pad_id: int,
                 tolerance: float | None = None):
    """The engine a scorer uses, decided on the model it has loaded. ``settings["engine"]``:
    ``loop`` (no check), ``batched`` (the batched engine after its check, else :class:`ModelRefused`),
    ``auto`` (the batched engine after its check, else the per-example loop).
    -> (engine, :class:`CheckResult`)."""
    settings = dict(settings)
    mode = settings.pop("engine", "auto")
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    if mode == "loop":
        return LoopGradStats(model, **settings), CheckResult(
            engine="loop", passed=None, reason="score.engine=loop", dtype=str(dtype).replace("torch.", ""),
            device=device.type)
    try:
        engine = BatchedGradStats(model, **settings)
    except UnsupportedModel as exc:
        result = CheckResult(engine="loop", passed=None, reason=str(exc), dtype=str(dtype).replace("torch.", ""),
                             device=device.type)
    else:
        result = run_check(engine, model, examples, pad_id, tolerance)
        if result.passed:
            return engine, result
    if mode == "batched":
        raise ModelRefused(f"score.engine=batched: {result.reason}")
    log.warning("[grads-ray] score: %s; scoring one example at a time instead (score.engine=auto)", result.reason)
    return LoopGradStats(model, **settings), result
