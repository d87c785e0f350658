"""Data-parallel training on PyTorch's own stack: ``torchrun`` + DistributedDataParallel.

``torchrun --nproc_per_node N -m xraycls train --config C.yaml`` (or ``xraycls train --nproc N``)
starts N processes; each finds its rank in the environment torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). One GPU per process with NCCL,
or CPU processes with gloo. Without those variables everything runs in one process and none of
this module's collectives does anything.

The rules the training loop follows (each one a bug found when it was broken):

- ``train.batch_size`` is the **global** batch: each rank takes ``batch_size / N`` per step, so
  N processes take the same optimizer steps, with the same learning rate, as one process. (To
  scale the global batch up on more GPUs, raise ``batch_size`` and scale the learning rate with
  it, linearly as a first guess; nothing does that automatically.)
- The model is wrapped in DDP again after every change of trainable parameters (staged
  freezing): DDP registers its all-reduce hooks only on parameters that require gradients when
  it is built, and ranks silently diverge otherwise.
- BatchNorm running statistics are per rank; rank 0's are broadcast before validation and
  before any weights are saved, so every rank validates and saves the same model.
- Validation runs on every rank on its shard; the predictions are gathered to **every** rank
  (``all_gather_object``, never a rank-0-only collective that can hang the others) and
  de-duplicated by dataset index (``DistributedSampler`` pads with repeats). Early stopping is
  then decided identically everywhere.
- Only rank 0 writes files; the others wait at a barrier before they read them.
- After each model, the ranks compare a digest of their weights and stop if they differ.

Multi-node: start the same command on every node with ``--nnodes M --node_rank i
--rdzv-backend c10d --rdzv-endpoint HOST:PORT`` (see torchrun's documentation); nothing here
depends on the node count.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from xraycls.errors import ConfigError
from xraycls.models.runtime import resolve_device

TIMEOUT_MINUTES = 30
"""How long a collective waits for the other ranks before failing (gloo's default is 30 min)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run (world 1 when run alone)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0


def init_distributed(device_setting: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes in the environment, or run alone.

    Returns:
        The context and this process's device (``cuda:LOCAL_RANK`` with NCCL when CUDA is
        available and the device setting allows it, else CPU with gloo).

    Raises:
        ConfigError: torchrun's variables are incomplete, or the device is not available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistContext(), resolve_device(device_setting)
    import torch.distributed as dist

    try:
        rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"WORLD_SIZE={world} but RANK/LOCAL_RANK are not set: start with torchrun"
        ) from e
    _die_with_parent()
    device = resolve_device(device_setting)
    timeout = datetime.timedelta(minutes=TIMEOUT_MINUTES)
    if not dist.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)  # before any collective: NCCL binds to it
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return DistContext(world=world, rank=rank, local_rank=local), device


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when torchrun's agent (its parent) dies: a ``kill -9`` of
    the job must not leave ranks training on, writing into a run folder that a re-run is
    resuming."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (a no-op when running alone)."""
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op when running alone)."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(ctx: DistContext, values: Sequence[float]) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (float64)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def gather_predictions(
    ctx: DistContext, logits: np.ndarray, labels: np.ndarray, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every rank's shard of predictions, on every rank, de-duplicated by dataset index and
    sorted by it (the sampler pads the last shard with repeats)."""
    if not ctx.enabled:
        return logits, labels, index
    import torch.distributed as dist

    parts: list[Any] = [None] * ctx.world
    dist.all_gather_object(parts, (logits, labels, index))
    lg = np.concatenate([p[0] for p in parts])
    lb = np.concatenate([p[1] for p in parts])
    ix = np.concatenate([p[2] for p in parts])
    ix, first = np.unique(ix, return_index=True)
    return lg[first], lb[first], ix


def broadcast_buffers(ctx: DistContext, model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics)."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    for b in model.buffers():
        dist.broadcast(b, src=0)


def wrap(ctx: DistContext, model: nn.Module, device: torch.device) -> nn.Module | None:
    """A DDP wrapper of ``model`` for its current trainable parameters (None when alone).

    Build a new one whenever the trainable parameters change.
    """
    if not ctx.enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def weight_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers, in order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_ranks_agree(ctx: DistContext, model: nn.Module) -> list[str]:
    """Every rank's weight digest; raises when they differ (the ranks trained apart).

    Raises:
        RuntimeError: The ranks' weights differ.
    """
    digest = weight_digest(model)
    if not ctx.enabled:
        return [digest]
    import torch.distributed as dist

    digests: list[Any] = [None] * ctx.world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP ranks hold different weights after training: {digests}")
    return [str(d) for d in digests]


def check_batch(ctx: DistContext, batch_size: int) -> int:
    """The per-rank batch for a global ``train.batch_size``.

    Raises:
        ConfigError: The global batch is not a multiple of the number of processes.
    """
    if batch_size % ctx.world:
        raise ConfigError(
            f"train.batch_size={batch_size} is the global batch; it must be a multiple of the "
            f"{ctx.world} processes (each takes batch_size / {ctx.world})"
        )
    return batch_size // ctx.world
