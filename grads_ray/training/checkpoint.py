"""Mid-run training state in a folder, without pickles: the trainable weights and the optimizer's
tensors as safetensors, everything else (step, epoch, batches seen, optimizer hyper-parameters,
scheduler state) as JSON. Ray Train carries the folder as its checkpoint; a restarted worker group
reads it back and goes on from the same optimizer step.

Files: ``trainable.safetensors`` (parameters with ``requires_grad``: all of them for a full
fine-tune, the adapters for LoRA), ``optimizer.safetensors`` (``{param index}.{name}``, e.g.
``3.exp_avg``), ``state.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (``.module``), or the model itself."""
    return model.module if hasattr(model, "module") else model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train, by name (tied weights once), detached, contiguous, on CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def has_state(folder: str | Path) -> bool:
    """Whether ``folder`` holds a mid-run training state (a final checkpoint holds a model instead)."""
    return (Path(folder) / "state.json").is_file()


def save_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, progress: dict[str, Any]) -> None:
    """Write the training state to ``folder`` (created). ``progress``: step, epoch, batches seen in the
    epoch, and anything JSON that the loop wants back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(folder / "trainable.safetensors"))
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in opt["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    (folder / "state.json").write_text(json.dumps({"progress": progress, "param_groups": opt["param_groups"],
                                                   "optimizer_scalars": scalars, "scheduler": sched}))


def load_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Read :func:`save_state`'s folder into the (freshly built) model, optimizer and scheduler.
    -> the saved progress. Every trainable parameter must be in the file."""
    folder = Path(folder)
    inner = unwrap(model)
    weights = load_file(str(folder / "trainable.safetensors"))
    missing = [n for n, p in inner.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise ValueError(f"checkpoint {folder} lacks trainable parameters, e.g. {missing[:3]}")
    device = next(inner.parameters()).device
    with torch.no_grad():
        params = dict(inner.named_parameters())
        for name, value in weights.items():
            params[name].copy_(value.to(device))
    meta = json.loads((folder / "state.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value.to(device) if name != "step" else value
    for key, value in meta["optimizer_scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    return meta["progress"]
