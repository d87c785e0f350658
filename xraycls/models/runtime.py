"""Where and in which precision a model runs: device choice and mixed precision (AMP).

Used by training and by inference alike, so it lives with the models rather than in the
training loop.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from xraycls.errors import ConfigError


def resolve_device(setting: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU.

    Raises:
        ConfigError: An unknown device name, or CUDA asked for on a machine without it.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as e:
        raise ConfigError(f"device {setting!r}: unknown; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {setting!r}: CUDA is not available on this machine; use --device cpu (or auto)"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise ConfigError(
            f"device {setting!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16); read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


@dataclass(frozen=True)
class Amp:
    """Resolved mixed-precision settings."""

    dtype: torch.dtype | None
    """None: full fp32."""
    use_scaler: bool
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The autocast context for a forward pass (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def describe(self) -> str:
        """E.g. ``bf16 autocast (cuda)`` or ``fp32``."""
        if self.dtype is None:
            return "fp32"
        name = "bf16" if self.dtype == torch.bfloat16 else "fp16"
        return f"{name} autocast ({self.device_type}){' + GradScaler' if self.use_scaler else ''}"


def resolve_amp(setting: str, device: torch.device) -> Amp:
    """Choose the precision for ``train.amp`` on ``device``.

    ``auto``: bf16 autocast on CUDA when the GPU supports it, else fp16 with a GradScaler; on
    CPU, bf16 only where the processor computes it natively (AMX / AVX512-BF16), else fp32. On
    AVX2-only CPUs bf16 autocast is 7-100x slower (a 3x3 conv 0.066 s -> 15.8 s); on an AMX
    Xeon it made 1024² steps 1.4-2.4x faster, but tiny models at 224 px slower, so small CPU
    recipes (demo, smoke) set ``amp: off`` (docs/benchmarks.md). The rule reads CPU flags, not a
    timing probe: a probe flipped between runs under load, and the numerics with it.
    """
    kind = device.type
    if setting == "off":
        return Amp(None, False, kind)
    if kind == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if setting == "fp16" or (setting == "auto" and not bf16_ok):
            return Amp(torch.float16, True, kind)
        return Amp(torch.bfloat16, False, kind)
    if setting == "fp16":
        raise ValueError("train.amp=fp16 needs CUDA; use bf16 or off on CPU")
    native = cpu_has_native_bf16()
    if setting == "bf16" and not native:
        warnings.warn(
            "train.amp=bf16 on a CPU without AMX/AVX512-BF16: expect it to be many times slower than fp32",
            stacklevel=2,
        )
    if setting == "bf16" or native:
        return Amp(torch.bfloat16, False, kind)
    return Amp(None, False, kind)
