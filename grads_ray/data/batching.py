"""Variable-length token rows -> padded tensors (pure torch), for scoring, training and evaluation."""

from __future__ import annotations

import numpy as np

from grads_ray.data.formats import IGNORE_INDEX


def pad_batch(input_ids: list[np.ndarray], labels: list[np.ndarray], pad_id: int = 0):
    """Right-pad variable-length rows. -> torch (B, T) input_ids, labels (-100 on pads), attention_mask."""
    import torch

    width = max((len(x) for x in input_ids), default=1)
    b = len(input_ids)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    lab = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(input_ids, labels, strict=True)):
        ids[i, : len(x)] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        lab[i, : len(y)] = torch.as_tensor(np.asarray(y, dtype=np.int64))
        mask[i, : len(x)] = 1
    return ids, lab, mask
