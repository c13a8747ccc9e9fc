"""The selection report: what was scored, what was chosen and what was removed, in one Markdown page
with plots of the gradient-statistic distributions (``selection_report.md`` and
``selection_report/*.png`` beside it). Arrays in, files out; no Ray."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from grads_ray import storage
from grads_ray.rundir import write_text

PLOTTED = ("loss", "grad_norm", "grad_std", "grad_max")  # overall statistics, log10 where positive


def _log(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """Finite values, log10 when they are all positive (gradient norms span decades)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) and (v > 0).all():
        return np.log10(v), True
    return v, False


def distribution_plot(columns: dict[str, np.ndarray], selected: np.ndarray, reason: np.ndarray, path: storage.Location) -> list[str]:
    """One panel per statistic of ``PLOTTED`` present in ``columns`` ((N,) arrays): histograms of all
    scored rows, the selected ones, and those removed as near-duplicates. -> the statistics drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in PLOTTED if c in columns]
    if not names:
        return []
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    dup = reason == "duplicate"
    for ax, name in zip(axes[0], names, strict=True):
        col = np.asarray(columns[name], dtype=np.float64)
        everything, logged = _log(col)
        if not len(everything):
            continue
        bins = np.histogram_bin_edges(everything, bins=40)
        for mask, label, style in ((np.ones(len(col), bool), "all scored", {"color": "0.7"}),
                                   (selected, "selected", {"color": "tab:blue", "alpha": 0.7}),
                                   (dup, "near-duplicate, removed", {"color": "tab:red", "alpha": 0.7})):
            values, _ = _log(col[mask]) if logged else (col[mask][np.isfinite(col[mask])], False)
            if len(values):
                ax.hist(values, bins=bins, label=f"{label} ({mask.sum()})", histtype="stepfilled", **style)
        ax.set_xlabel(f"log10 {name}" if logged else name)
        ax.set_yscale("log")
    axes[0][0].set_ylabel("examples")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    storage.atomic_write(storage.location(path), lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
    return names


def _quantiles(values: np.ndarray) -> str:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return "–"
    q = np.quantile(v, [0.05, 0.5, 0.95])
    return " / ".join(f"{x:.3g}" for x in q)


def write_report(path: storage.Location, columns: dict[str, np.ndarray], ids, selected: np.ndarray,
                 reason: np.ndarray, dup_group: np.ndarray | None, manifest: dict[str, Any]) -> storage.Location:
    """The report at ``path`` (``.../selection_report.md``; its plot in the folder of the same stem) from the stats columns, the verdicts and the manifest.

    ``columns``: (N,) stats arrays; ``ids`` (N,) (a list or an Arrow array: only a few are read); ``selected`` (N,) bool; ``reason`` (N,) why not; ``dup_group``
    (N,) the near-duplicate group (its smallest position) or None. -> the report's path.
    """
    path = storage.location(path)
    reason = np.asarray(reason, dtype=object)
    selected = np.asarray(selected, dtype=bool)
    n = len(selected)
    drawn = distribution_plot(columns, selected, reason, path.parent / path.stem / "distributions.png")
    st = manifest.get("stages", {})
    acc = manifest.get("accounting", {})
    lines = ["# Selection report", ""]
    if acc:
        lines += [f"- input rows: {acc.get('input_rows')}; scored: {acc.get('scored')}; rejected: "
                  f"{acc.get('rejected_ingest', 0) + acc.get('rejected_score', 0)}"]
        for why, count in manifest.get("rejected_by_reason", {}).items():
            lines.append(f"  - {why}: {count}")
    sel = st.get("select", {})
    lines.append(f"- selected: {int(selected.sum())} of {n}" + (f" by {sel['method']}, budget {sel['budget']}" if sel else ""))
    for why, count in Counter(r for r in reason[~selected] if r).most_common():
        lines.append(f"  - not selected, {why}: {count}")
    lines += ["", "## Gradient statistics", "",
              "5% / median / 95% of each statistic, for all scored rows and for the selected ones.", "",
              "| statistic | all scored | selected |", "| --- | --- | --- |"]
    for name in [c for c in columns if c in PLOTTED or c.endswith(".grad_norm")]:
        lines.append(f"| {name} | {_quantiles(columns[name])} | {_quantiles(np.asarray(columns[name])[selected])} |")
    if drawn:
        lines += ["", f"![distributions]({path.stem}/distributions.png)", "",
                  "Grey: every scored example; blue: the selected; red: removed as near-duplicates."]
    if dup_group is not None:
        groups = np.asarray(dup_group)
        removed = np.flatnonzero(reason == "duplicate")
        lines += ["", "## Removed as near-duplicates", "",
                  f"{len(removed)} examples, in {len(set(groups[removed].tolist()))} groups (a group keeps its "
                  "best-ranked members; those may still miss the budget); the first 10:", "",
                  "| removed | selected from its group |", "| --- | --- |"]
        for i in removed[:10]:  # a few whole-array passes, never a Python loop over every row
            kept = np.flatnonzero(selected & (groups == groups[i]))
            twin = str(ids[int(kept[0])]) if len(kept) else "(none selected)"
            lines.append(f"| `{ids[int(i)]}` | `{twin}` |")
    write_text(path, "\n".join(lines) + "\n")
    return path
