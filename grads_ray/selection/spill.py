"""Per-row result columns kept on disk while a selection runs, so that its twenty-odd (N,)
components (8 bytes a row each at float64) are not all in memory at once at 10^7 rows.

:class:`ColumnSpill` is a mapping a selection writes its results into: each numeric 1-D array is
written as a raw file when set and read back when asked for, whole or a slice of rows (with plain
reads, not a memory map, so the pages read are not counted in the process's resident memory once
the array is dropped). Other values (the ``reason`` strings) stay in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from pathlib import Path

import numpy as np


class ColumnSpill(MutableMapping):
    """{name: (N,) array}, numeric arrays as files ``<folder>/<k>.bin``; insertion order kept."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple[Path, np.dtype, int]] = {}
        self._memory: dict[str, np.ndarray] = {}
        self._order: list[str] = []
        self._count = 0

    def __setitem__(self, name: str, values) -> None:
        values = np.asarray(values)
        self._forget(name)
        if values.ndim == 1 and values.dtype.kind in "biuf":
            path = self.folder / f"{self._count}.bin"
            self._count += 1
            np.ascontiguousarray(values).tofile(path)
            self._files[name] = (path, values.dtype, len(values))
        else:
            self._memory[name] = values
        self._order.append(name)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._memory:
            return self._memory[name]
        if name not in self._files:
            raise KeyError(name)
        path, dtype, n = self._files[name]
        return np.fromfile(path, dtype, count=n)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one column (read from its file, not the whole column)."""
        if name in self._memory:
            return self._memory[name][start:stop]
        path, dtype, n = self._files[name]
        stop = min(stop, n)
        return np.fromfile(path, dtype, count=max(stop - start, 0), offset=start * dtype.itemsize)

    def _forget(self, name: str) -> None:
        if name in self._files:
            self._files.pop(name)[0].unlink(missing_ok=True)
        self._memory.pop(name, None)
        if name in self._order:
            self._order.remove(name)

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self._forget(name)

    def __contains__(self, name: object) -> bool:
        return name in self._files or name in self._memory

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)
