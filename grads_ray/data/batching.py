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


def left_padded_positions(attention_mask):
    """Position ids counted from each row's first real token, (B, T), when some row is left-padded;
    None when every row starts at position 0 (right padding, as the job pads): the model's own
    default positions then apply, which for most models are 0..T-1 and for some are not (RoBERTa
    starts after its padding index), exactly as when the row is run alone."""
    if not bool((attention_mask[:, 0] == 0).any()):
        return None
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)
