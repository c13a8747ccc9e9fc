"""What each selection method reads, declared once, and the inputs themselves as one value.

:func:`method_needs` says what a selection reads (each method declares its own in
grads_ray/selection/methods.py) besides the ids and the base columns (``loss``, ``n_tokens``, ``finite``): which stats columns, whether the similarity stage's
neighbour lists, FisherSFT's factors, LESS's projected gradients and target, or the feature vectors
of the ``max_similarity`` pass. The select stage reads just that; the stage table derives from it
which stages ``select`` needs; :func:`grads_ray.selection.choose.select` checks that it was given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pyarrow as pa

BASE_COLUMNS = ("loss", "n_tokens", "finite")


@dataclass(frozen=True)
class MethodNeeds:
    """``columns``: stats columns read beyond :data:`BASE_COLUMNS`, where the table has them;
    ``neighbours``: the similarity
    stage (k-NN lists, near-duplicate groups, diversity, clusters); ``factors``: the features'
    ``fisher_factor``; ``grad_proj``: the features' projected gradients; ``target``: the target
    stage (LESS); ``vectors``: the similarity feature's unit vectors (``max_similarity``)."""

    columns: tuple[str, ...] = ()
    neighbours: bool = False
    factors: bool = False
    grad_proj: bool = False
    target: bool = False
    vectors: bool = False


def method_needs(cfg: Any) -> MethodNeeds:
    """What ``cfg`` (a :class:`grads_ray.config.SelectConfig`) makes the selection read: its method's
    needs (:data:`grads_ray.selection.methods.METHODS`), the neighbours when ``dedup=true``, the
    vectors for the ``max_similarity`` pass."""
    from grads_ray.selection.methods import method

    need = method(cfg.method).needs(cfg)
    return replace(need, neighbours=need.neighbours or cfg.dedup == "true", vectors=cfg.max_similarity > 0)


Block = tuple[np.ndarray, np.ndarray, np.ndarray]  # (m,) positions, (m, k) neighbour positions, (m, k) cosines


class Neighbours:
    """Every example's k nearest neighbours, as blocks of rows: (positions (m,), neighbour positions
    (m, k) int64 with -1 for none, cosines (m, k) float32), together covering each position once.
    ``blocks`` is called for each pass, so the lists may be read from disk part by part and never
    held whole (at 10^7 rows and k = 10 they are 1.2 GB). :meth:`from_arrays` wraps (N, k) arrays."""

    def __init__(self, blocks: Callable[[], Iterator[Block]], n: int, new_pos: np.ndarray | None = None):
        self._blocks, self.n, self._new_pos = blocks, n, new_pos

    @classmethod
    def from_arrays(cls, nn_idx: np.ndarray, nn_sims: np.ndarray) -> Neighbours:
        nn_idx, nn_sims = np.asarray(nn_idx), np.asarray(nn_sims)
        return cls(lambda: iter([(np.arange(len(nn_idx)), nn_idx, nn_sims)]), len(nn_idx))

    def __iter__(self) -> Iterator[Block]:
        for pos, idx, sims in self._blocks():
            if self._new_pos is not None:  # a subset: renumber, drop rows outside it and links to them
                n_old = len(self._new_pos) - 1
                pos = self._new_pos[pos]
                keep = pos >= 0
                pos, idx, sims = pos[keep], idx[keep], sims[keep]
                idx = self._new_pos[np.where(idx >= 0, idx, n_old)]
            yield pos, idx, sims

    def rows(self, new_pos: np.ndarray, n: int) -> Neighbours:
        """The lists of a subset: ``new_pos`` (N + 1,) maps each old position to the new one, -1 for
        dropped (its last entry, for -1 links, is -1); ``n`` rows are kept."""
        if self._new_pos is not None:  # compose: a row dropped before maps through new_pos[-1] = -1
            new_pos = np.append(new_pos[self._new_pos[:-1]], -1)
        return Neighbours(self._blocks, n, new_pos)


class PartColumns(Mapping):
    """Stats columns read on demand, one whole column at a time, by ``read(name) -> (N,) array``,
    so a selection holds the columns it is using rather than every one it may use (a 10^7-row table
    of 40 statistics is 3.2 GB). ``keep`` (sorted positions) restricts them to a subset. Columns in
    ``cached`` are kept once read (the base columns: read by several steps)."""

    def __init__(self, names: list[str], read: Callable[[str], np.ndarray], keep: np.ndarray | None = None,
                 cached: tuple[str, ...] = ()):
        self._names, self._read, self._keep, self._cached = list(names), read, keep, cached
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if name in self._cache:
            return self._cache[name]
        values = self._read(name)
        if self._keep is not None:
            values = values[self._keep]
        if name in self._cached:
            self._cache[name] = values
        return values

    def __contains__(self, name: object) -> bool:  # by name: Mapping's would read the column
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def subset(self, keep: np.ndarray) -> PartColumns:
        return PartColumns(self._names, self._read, keep if self._keep is None else self._keep[keep], self._cached)


@dataclass
class SelectionInputs:
    """Everything a selection reads, for N scored examples in one order.

    ``columns``: stats columns, (N,) each (a dict, or :class:`PartColumns` read on demand); ``ids``
    (N,); ``source`` (N,) input file names, for quotas; ``similarity``: ``dup_group``,
    ``diversity``, ``cluster`` (N,) and either ``nn_idx`` / ``nn_sims`` (N, k) or ``neighbours``
    (:class:`Neighbours`) (neighbours as positions in this order, -1 none); ``fisher_factors``
    (N, r, d'); ``grad_proj`` (N, p) and ``target_proj`` (T, p); ``vectors`` (N, d), centred and
    L2-normalised.
    """

    columns: Mapping[str, np.ndarray]
    ids: pa.Array | list[str]
    source: pa.Array | np.ndarray | None = None
    similarity: dict[str, np.ndarray] | None = None
    fisher_factors: np.ndarray | None = None
    grad_proj: np.ndarray | None = None
    target_proj: np.ndarray | None = None
    vectors: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.columns["loss"])

    def require(self, need: MethodNeeds, method: str) -> None:
        """A clear error when an input ``need`` names was not given (columns are the method's own
        business: GrADS reads those of its groups that the table has)."""
        missing = {"neighbours": self.similarity is None, "factors": self.fisher_factors is None,
                   "grad_proj": self.grad_proj is None, "target": self.target_proj is None,
                   "vectors": self.vectors is None}
        said = {"neighbours": f"{method} needs the similarity stage's neighbours (near-duplicate groups, clusters)",
                "factors": "FisherSFT needs the score stage's fisher_factor features",
                "grad_proj": "LESS needs projected gradients of the corpus and of the target set",
                "target": "LESS needs projected gradients of the corpus and of the target set",
                "vectors": "select.max_similarity needs the similarity feature's vectors"}
        for key, gone in missing.items():
            if getattr(need, key) and gone:
                raise ValueError(said[key])

    def rows(self, keep: np.ndarray) -> SelectionInputs:
        """The inputs of the rows at positions ``keep`` (sorted), in that order: per-row arrays are
        subset, neighbour positions renumbered, links to dropped rows become -1."""
        n = len(self)
        new_pos = np.full(n + 1, -1, dtype=np.int64)  # old position -> new (index -1 maps to -1)
        new_pos[keep] = np.arange(len(keep))
        sim = None
        if self.similarity is not None:
            sim = {k: v.rows(new_pos, len(keep)) if isinstance(v, Neighbours) else np.asarray(v)[keep]
                   for k, v in self.similarity.items()}
            if "nn_idx" in sim:
                sim["nn_idx"] = new_pos[np.where(sim["nn_idx"] >= 0, sim["nn_idx"], n)]
        ids = self.ids if isinstance(self.ids, (pa.Array, pa.ChunkedArray)) else pa.array(self.ids, pa.string())
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("fisher_factors", "grad_proj", "vectors"):  # per-row arrays (target_proj is not)
            out[name] = None if out[name] is None else out[name][keep]
        if self.source is not None:
            out["source"] = (self.source.take(pa.array(keep)) if isinstance(self.source, (pa.Array, pa.ChunkedArray))
                             else np.asarray(self.source)[keep])
        columns = (self.columns.subset(keep) if isinstance(self.columns, PartColumns)
                   else {k: np.asarray(v)[keep] for k, v in self.columns.items()})
        out.update(columns=columns, ids=ids.take(pa.array(keep)),
                   similarity=sim)
        return SelectionInputs(**out)
