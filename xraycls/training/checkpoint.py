"""Safetensors-only persistence: weights, resumable training state, nothing unpickled.

A resumable checkpoint is three files with one tag (``ckpt-<tag>.model.safetensors``,
``ckpt-<tag>.optim.safetensors``, ``ckpt-<tag>.json``) plus ``last.json`` naming the tag. Files are
written to temporary names and renamed; ``last.json`` is replaced last, so a kill at any moment
leaves either the previous checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from xraycls.io.files import write_text_atomic
from xraycls.models.weights import load_weights, save_weights


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{name}"] = value
            else:
                plain.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["plain"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: str | Path,
    tag: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    state: dict[str, Any],
) -> None:
    """Save a resumable checkpoint and point ``last.json`` at it; older tags are removed."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_weights(d / f"ckpt-{tag}.model.safetensors", model.state_dict())
    extra: dict[str, Any] = {"state": state}
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer.state_dict())
        save_weights(d / f"ckpt-{tag}.optim.safetensors", tensors)
        extra["optimizer"] = meta
    if scaler is not None and scaler.is_enabled():
        extra["scaler"] = {
            k: (v.item() if isinstance(v, torch.Tensor) else v)
            for k, v in scaler.state_dict().items()
        }
    write_text_atomic(d / f"ckpt-{tag}.json", json.dumps(extra, indent=1))  # keeps -inf
    write_text_atomic(d / "last.json", json.dumps({"tag": tag}))
    for old in d.glob("ckpt-*"):
        if not old.name.startswith(f"ckpt-{tag}."):
            old.unlink(missing_ok=True)


def load_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer_factory: Any = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[dict[str, Any], torch.optim.Optimizer | None] | None:
    """Restore the checkpoint named by ``last.json`` (None when there is none).

    Args:
        directory: The checkpoint folder.
        model: Receives the saved weights.
        optimizer_factory: Called with the restored ``state`` to build the optimizer (its
            parameter set depends on the training stage), which then receives the saved state.
        scaler: Receives the saved GradScaler state.

    Returns:
        ``(state, optimizer)``.
    """
    d = Path(directory)
    try:
        tag = json.loads((d / "last.json").read_text())["tag"]
        extra = json.loads((d / f"ckpt-{tag}.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
    model.load_state_dict(load_weights(d / f"ckpt-{tag}.model.safetensors"))
    state = extra["state"]
    optimizer = None
    if optimizer_factory is not None:
        optimizer = optimizer_factory(state)
        if "optimizer" in extra:
            tensors = load_weights(d / f"ckpt-{tag}.optim.safetensors")
            optimizer.load_state_dict(_unflatten_optimizer(tensors, extra["optimizer"]))
    if scaler is not None and "scaler" in extra:
        scaler.load_state_dict(extra["scaler"])
    return state, optimizer
