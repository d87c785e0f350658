"""Loading pretrained backbone weights: local directories and files, or Hub ids, safetensors only.

Every source ends as one backbone state dict that is fitted to the model's geometry (relative
position tables for a new window, ViT position embeddings for a new grid) and then loaded
strictly: a shape mismatch, a missing key or an unexpected key is an error that names them. The
source model's own classifier is dropped; the head stays freshly initialised.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from xraycls.models.base import XrayClassifier

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# One metadata request decides whether the Hub is reachable; huggingface_hub's own download
# retries for ~25 s on a dead network, which is not what an offline user wants to wait for.
HUB_PROBE_TIMEOUT_S = 10.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".tar"}


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be found, read or fitted to the model; the message says what to do."""


@dataclass
class LoadReport:
    """What ``load_pretrained`` did.

    Attributes:
        source: The resolved local file or directory.
        loaded: Number of backbone tensors loaded.
        resized: Keys interpolated to the model's geometry.
        ignored: Checkpoint keys dropped on purpose (the source model's classifier or pooler).
        missing: Backbone keys the checkpoint lacked (non-empty only with ``strict=False``).
        unexpected: Checkpoint keys the backbone lacks (non-empty only with ``strict=False``).
    """

    source: str
    loaded: int = 0
    resized: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_pretrained(
    model: XrayClassifier, source: str | Path, *, strict: bool = True
) -> LoadReport:
    """Load backbone weights into ``model``; the head is left as it is.

    Args:
        model: The classifier to fill.
        source: A directory from ``save_pretrained`` (``config.json`` + ``model.safetensors``,
            Swin/ViT; legacy key names are converted by transformers), a directory holding one
            ``model.safetensors``, a ``.safetensors`` file with the backbone state dict (timm
            keys for MaxViT/ResNet, current transformers keys for Swin/ViT; an
            ``XrayClassifier`` state dict also works), or a Hugging Face Hub id.
        strict: Raise on missing or unexpected keys (shape mismatches always raise).

    Returns:
        A report of what was loaded, resized and ignored.

    Raises:
        PretrainedWeightsError: If the weights cannot be found, read or fitted.
    """
    path = resolve_source(source, hf_format=model.hf_format)
    ignored: list[str] = []
    if path.is_dir() and model.hf_format and (path / CONFIG_NAME).is_file():
        state, ignored = model._read_hf_checkpoint(path)
    else:
        state = read_safetensors(_weights_file(path))
    state, dropped = _strip_prefixes(state, model)
    ignored += dropped
    state, resized = model._adapt_checkpoint(state)
    report = load_backbone_state(model.backbone, state, source=str(path), strict=strict)
    report.resized, report.ignored = resized, sorted(ignored)
    logger.info(
        "%s: loaded %d tensors from %s; resized %d: %s; ignored %d: %s",
        model.spec.name,
        report.loaded,
        path,
        len(resized),
        _listing(resized, limit=3),
        len(report.ignored),
        _listing(report.ignored, limit=3),
    )
    return report


# ------------------------------------------------------------------------------ sources


def resolve_source(source: str | Path, *, hf_format: bool) -> Path:
    """A local path for ``source``, downloading Hub ids (or taking them from the local cache).

    Args:
        source: A local path or a Hub id ``"org/name"`` (``"hf-hub:"`` prefix allowed).
        hf_format: Whether a Hub download also needs ``config.json`` (transformers models).

    Raises:
        PretrainedWeightsError: If the path does not exist and the id cannot be fetched.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    repo_id = str(source).removeprefix("hf-hub:")
    if isinstance(source, Path) or not _HUB_ID.match(repo_id) or path.suffix == ".safetensors":
        raise PretrainedWeightsError(f"{source}: no such file or directory")
    files = [CONFIG_NAME, WEIGHTS_NAME] if hf_format else [WEIGHTS_NAME]
    fetched = _from_hub(repo_id, files)
    return fetched.parent if hf_format else fetched


def hub_offline() -> bool:
    """Whether Hub access is switched off (read at call time, unlike huggingface_hub's constant)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for v in flags
    )


def _from_hub(repo_id: str, files: list[str]) -> Path:
    """Cached or downloaded Hub files; returns the path of the last one."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return [Path(hf_hub_download(repo_id, f, local_files_only=True)) for f in files][-1]
    except LocalEntryNotFoundError:
        pass
    if hub_offline():
        raise PretrainedWeightsError(
            _offline_help(
                repo_id,
                files,
                "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
            )
        )
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, WEIGHTS_NAME), timeout=HUB_PROBE_TIMEOUT_S)
    except RepositoryNotFoundError as e:
        raise PretrainedWeightsError(
            f"Hub repository {repo_id!r} does not exist or needs access (gated/private): "
            f"check the id, or run `hf auth login`. ({e.__class__.__name__})"
        ) from e
    except EntryNotFoundError as e:
        raise PretrainedWeightsError(
            f"Hub repository {repo_id!r} has no {WEIGHTS_NAME}; only safetensors weights are "
            "loaded (pickled .bin files can run code). Convert them to safetensors on a trusted "
            "machine and pass the file."
        ) from e
    except Exception as e:  # httpx connection errors are not OSErrors: anything here = unreachable
        raise PretrainedWeightsError(
            _offline_help(
                repo_id, files, f"the Hub could not be reached ({e.__class__.__name__}: {e})"
            )
        ) from e
    try:
        return [Path(hf_hub_download(repo_id, f)) for f in files][-1]
    except Exception as e:
        raise PretrainedWeightsError(f"downloading {repo_id!r} failed: {e}") from e


def _offline_help(repo_id: str, files: list[str], why: str) -> str:
    return (
        f"cannot load pretrained weights {repo_id!r} (no such local path, so read as a Hub id): "
        f"{why}. Download them on a machine with "
        f"internet access, e.g. `hf download {repo_id} {' '.join(files)} --local-dir DIR`, copy "
        f"DIR here and pass pretrained=DIR (or the .safetensors file itself). To use the cache "
        f"instead, run the same download here while online, without --local-dir."
    )


def _weights_file(path: Path) -> Path:
    """The single safetensors file that ``path`` names or holds."""
    if path.is_dir():
        candidates = (
            [path / WEIGHTS_NAME]
            if (path / WEIGHTS_NAME).is_file()
            else sorted(path.glob("*.safetensors"))
        )
        if len(candidates) != 1:
            found = ", ".join(p.name for p in sorted(path.iterdir())) or "nothing"
            raise PretrainedWeightsError(
                f"{path}: expected {WEIGHTS_NAME} (or exactly one .safetensors file), found {found}"
            )
        return candidates[0]
    if path.suffix in _PICKLE_SUFFIXES:
        raise PretrainedWeightsError(
            f"{path}: pickled checkpoints are refused (loading one can run arbitrary code); "
            "convert it to .safetensors on a trusted machine"
        )
    return path


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """A state dict from a safetensors file, on the CPU.

    Raises:
        PretrainedWeightsError: If the file is not valid safetensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise PretrainedWeightsError(f"{path}: not a readable safetensors file ({e})") from e


def _strip_prefixes(
    state: dict[str, Tensor], model: XrayClassifier
) -> tuple[dict[str, Tensor], list[str]]:
    """Bring checkpoint keys to the backbone's naming; returns the state and the dropped keys."""
    dropped: list[str] = []
    if state and all(k.startswith(("backbone.", "head.")) for k in state):
        # An XrayClassifier state dict (a previous run's weights): keep the backbone only.
        dropped = [k for k in state if k.startswith("head.")]
        state = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
    for prefix in model.checkpoint_prefixes:
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
            break
    ignore = model.ignored_checkpoint_prefixes
    if ignore:
        dropped += [k for k in state if k.startswith(ignore)]
        state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    return state, dropped


# ------------------------------------------------------------------------------ loading


def load_backbone_state(
    backbone: nn.Module, state: dict[str, Tensor], *, source: str, strict: bool = True
) -> LoadReport:
    """Copy ``state`` into ``backbone`` after checking keys and shapes.

    Raises:
        PretrainedWeightsError: On any shape mismatch, or missing / unexpected keys if strict.
    """
    expected = backbone.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        raise PretrainedWeightsError(
            f"{source}: {len(mismatched)} tensors do not fit the model (another architecture or "
            f"size variant?): " + _listing(mismatched)
        )
    # BatchNorm step counters carry no learned information and some checkpoints omit them.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        raise PretrainedWeightsError(
            f"{source}: checkpoint keys do not match the model; missing {len(missing)}: "
            f"{_listing(missing)}; unexpected {len(unexpected)}: {_listing(unexpected)}"
        )
    if missing or unexpected:
        logger.warning("%s: missing keys %s; unexpected keys %s", source, missing, unexpected)
    with torch.no_grad():
        backbone.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return LoadReport(
        source=source,
        loaded=len(state) - len(unexpected),
        missing=missing,
        unexpected=unexpected,
    )


def _listing(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ------------------------------------------------------------------------------ geometry


def resize_relative_position_table(table: Tensor, window_size: int) -> Tensor:
    """Bicubically resize a relative-position bias table to a new attention window.

    A window of ``w`` has ``(2w-1)^2`` relative offsets per head. Swin (transformers) stores
    them flat, ``((2w-1)^2, heads)``; TF-ported MaxViT (timm) as ``(heads, 2w-1, 2w-1)``. Both
    are resized like the official Swin fine-tuning recipe (bicubic, align_corners=False). The
    lookup index is not part of a checkpoint: the new model builds it for its own window.

    Args:
        table: The checkpoint's table, in either layout.
        window_size: The target window.

    Returns:
        The table for the new window, in the input's layout.
    """
    new_side = 2 * window_size - 1
    if table.ndim == 3:
        heads, side, _ = table.shape
        grid = table.float().unsqueeze(0)
    else:
        count, heads = table.shape
        side = math.isqrt(count)
        if side * side != count:
            raise PretrainedWeightsError(f"relative position table of {count} rows is not square")
        grid = table.float().T.reshape(1, heads, side, side)
    if side == new_side:
        return table
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    if table.ndim == 3:
        return grid[0].to(table.dtype)
    return grid.reshape(heads, new_side * new_side).T.contiguous().to(table.dtype)


def resize_position_embedding(
    embedding: Tensor, grid_size: int, *, num_prefix_tokens: int = 1
) -> Tensor:
    """Bicubically resize ViT absolute position embeddings to a new square patch grid.

    Args:
        embedding: ``(1, prefix + g*g, dim)`` from the checkpoint.
        grid_size: The target grid side (image size / patch size).
        num_prefix_tokens: Leading embeddings (CLS) copied unchanged.

    Returns:
        ``(1, prefix + grid_size**2, dim)``.
    """
    prefix, patches = embedding[:, :num_prefix_tokens], embedding[:, num_prefix_tokens:]
    count, dim = patches.shape[1], patches.shape[2]
    side = math.isqrt(count)
    if side * side != count:
        raise PretrainedWeightsError(f"position embedding of {count} patches is not a square grid")
    if side == grid_size:
        return embedding
    grid = patches.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim).to(embedding.dtype)
    return torch.cat([prefix, patches], dim=1)
