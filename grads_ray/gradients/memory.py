"""A device's memory as the scorer sees it: out-of-memory errors recognised (whichever allocator
raised them), and, on CUDA, a step's peak and the budget a process can reach."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# score.chunk_elements=auto, by device: on an H200 (Qwen2.5-0.5B shapes, B = 16, T = 512, bf16) 2^28
# was the fastest of 2^26..2^30 in two runs (229 against 325 ms, 238 against 255 ms a pass) at the same
# peak; a CPU gains nothing from larger blocks (2^20 and 2^26 timed the same) and keeps the smaller bound,
# and so does a GPU under BIG_GPU (a 2^28 block and its float32 moments are ~1.5 GiB: a 16-24 GiB card
# running a fixed score.batch_size that fitted before would not want them)
AUTO_CHUNK = {"cuda": 1 << 28, "cpu": 1 << 26}
BIG_GPU = 40 * 2**30


def chunk_elements(setting: int | str, device_type: str, total_bytes: int | None = None) -> int:
    """``score.chunk_elements`` on this device: an integer as it is, ``auto`` by :data:`AUTO_CHUNK`
    (on CUDA, for a GPU of at least :data:`BIG_GPU`; ``total_bytes``: its memory, read when None)."""
    if setting != "auto":
        return int(setting)
    if device_type == "cuda":
        if total_bytes is None:
            total_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return AUTO_CHUNK["cuda"] if total_bytes >= BIG_GPU else AUTO_CHUNK["cpu"]
    return AUTO_CHUNK["cpu"]


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: a GPU's ``torch.OutOfMemoryError``, Python's
    ``MemoryError``, the CPU allocator's plain RuntimeError ("DefaultCPUAllocator: can't allocate
    memory"), or cuBLAS failing to allocate its workspace (``CUBLAS_STATUS_ALLOC_FAILED``)."""
    text = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text or "cublas_status_alloc_failed" in text


def cuda_peak(step: Callable[[], Any], device: Any) -> int | None:
    """Peak bytes allocated on ``device`` while ``step()`` runs (the weights included), or None when
    it ran out of memory (the cache is emptied so the next, smaller probe starts clean)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    ran_out = False
    try:
        step()
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - only out of memory is an answer; the rest is raised
        if not out_of_memory(exc):
            raise
        ran_out = True
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()  # here, not in ``except``: the failed step's tensors go with its traceback
    return None if ran_out else int(peak)


def memory_budget(device: Any, fraction: float) -> int:
    """``fraction`` of what this process can reach on ``device``: what it holds plus what is free."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(fraction * (free + torch.cuda.memory_reserved(device)))
