"""Parameter name -> layer group, for per-group gradient statistics.

Groups: ``embedding`` (token and position embeddings), ``head`` (LM head), ``norm`` (every norm
layer), ``layer{i}.attn`` and ``layer{i}.mlp`` (block i), ``other``. Names follow Llama/Qwen2
(``model.layers.3.self_attn.q_proj``) and GPT-2 (``transformer.h.3.attn.c_attn``). A weight tied
between embedding and head appears once among the parameters, as the embedding.
"""

from __future__ import annotations

import re

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBED = ("embed_tokens", "wte", "wpe", "embed_positions", "word_embeddings", "position_embeddings")
_NORM = ("norm", "ln_")
_ATTN = ("attn", "attention")
_MLP = ("mlp", "feed_forward", "ffn")

GRAD_STATS = ("grad_norm", "grad_mean", "grad_std", "grad_max", "grad_min")


def group_of(name: str) -> str:
    """The layer group of a parameter, from its dotted name."""
    if any(key in name for key in _EMBED):
        return "embedding"
    if name.startswith("lm_head") or ".lm_head." in name or name.startswith("embed_out"):
        return "head"
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    if any(key in leaf for key in _NORM):
        return "norm"
    match = _BLOCK.search(name)
    if match:
        block = f"layer{int(match.group(1))}"
        if any(key in name for key in _ATTN):
            return f"{block}.attn"
        if any(key in name for key in _MLP):
            return f"{block}.mlp"
        return f"{block}.other"
    return "other"


def group_names(param_names: list[str]) -> list[str]:
    """Distinct groups of these parameters, in first-seen order (stable column order)."""
    seen: dict[str, None] = {}
    for name in param_names:
        seen.setdefault(group_of(name), None)
    return list(seen)


def stat_columns(groups: list[str]) -> list[str]:
    """Per-group column names of the stats table: ``<group>.<stat>``."""
    return [f"{g}.{s}" for g in groups for s in GRAD_STATS]
