"""Exporting a bundle's served model to ONNX, verified against PyTorch before it is kept.

``xraycls export RUN --format onnx`` writes one ONNX graph per served configuration (the fold
ensemble or the refit model): input ``input`` (N x 3 x H x W, normalised, N dynamic), output
``member_logits`` (N x members x classes). Everything after the logits stays in the bundle and in
Python: the Predictor averages the members and applies the bundle's calibration and operating
threshold (or a site calibration) exactly as it does for PyTorch, so both backends share one
decision path. Grad-CAM needs gradients and always runs on the PyTorch weights.

The graph carries its identity in ``metadata_props`` (also written to a JSON sidecar beside it):
the bundle id (a hash of ``bundle.json``, ``labels.json`` and ``config.yaml``), a SHA-256 of the
served weight files, the configuration, opset and exporter. A Predictor refuses an export whose
identity does not match the bundle it serves, so a retrained bundle never runs a stale graph.

Export tries ``torch.onnx.export(dynamo=True)`` first and falls back to the TorchScript exporter
(``dynamo=False``); which one produced the file is recorded. Every export is verified before it
is kept: onnxruntime and PyTorch score the same images (generated ones, plus real ones: the
bundle's own holdout images where readable, and any given with ``verify_on``), and the largest
absolute logit difference and the equality of the decisions are recorded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from xraycls.bundle.format import (
    HOLDOUT_FILE,
    Bundle,
    BundleError,
    Members,
)
from xraycls.inference.onnx_backend import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    OnnxRunner,
    bundle_id,
    default_export_path,
    first_line,
    open_export,
    sidecar_path,
    weights_sha256,
)
from xraycls.io.files import atomic_path, write_json_atomic

if TYPE_CHECKING:
    from xraycls.inference.predictor import Predictor

FORMATS = ("onnx",)
"""Export formats ``xraycls export --format`` accepts."""
DEFAULT_OPSET = 18
"""ONNX opset used unless asked otherwise: the dynamo exporter's native opset, run by every
onnxruntime since 1.14."""
MAX_PROTO_BYTES = 2_000_000_000
"""Protobuf's 2 GB limit on one ONNX file (larger graphs would need external data files)."""
DEFAULT_TOLERANCE = 1e-3
"""Largest absolute logit difference between onnxruntime and PyTorch that an export may show."""

Exporter = Literal["dynamo", "torchscript"]


@dataclass
class Verification:
    """How an export was checked against PyTorch."""

    n_images: int
    n_real_images: int
    max_abs_logit_diff: float
    decisions_equal: bool
    max_abs_prob_diff: float
    tolerance: float
    real_sources: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    """What ``export_run`` wrote and how it was checked."""

    path: Path
    sidecar: Path
    configuration: str
    exporter: str
    opset: int
    seconds: float
    size_bytes: int
    verification: Verification
    fallback_reason: str | None = None

    def line(self) -> str:
        """One summary line for the command line."""
        v = self.verification
        how = self.exporter + (" (dynamo failed)" if self.fallback_reason else "")
        return (
            f"{self.path} ({self.size_bytes / 1e6:.1f} MB, {self.configuration}, opset {self.opset}, "
            f"{how}, {self.seconds:.1f} s); verified on {v.n_images} images ({v.n_real_images} "
            f"real): max |logit diff| {v.max_abs_logit_diff:.2e}, decisions "
            f"{'identical' if v.decisions_equal else 'DIFFER'}"
        )


class MemberLogits(nn.Module):
    """The members of a served configuration as one graph: N x members x classes logits."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=1)


# --------------------------------------------------------------------------- export


def export_onnx(
    models: Sequence[nn.Module],
    path: str | Path,
    *,
    image_size: int,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto",
) -> tuple[Exporter, int, str | None]:
    """Export ``models`` (one model or ensemble members, on CPU) as one ONNX graph at ``path``.

    Args:
        models: Members sharing input size and classes.
        path: The ``.onnx`` file to write (atomically).
        image_size: Side of the square input.
        opset: ONNX opset of the default domain.
        metadata: Stored in the graph's ``metadata_props``.
        exporter: ``auto`` (dynamo, then TorchScript), or one of them only.

    Returns:
        The exporter that succeeded, the opset in the file, and why dynamo failed (or None).

    Raises:
        ExportError: No exporter can convert the model; the message gives each one's reason.
    """
    import onnx

    wrapper = MemberLogits(models).eval()
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2: 1 would be specialised
    tries: list[tuple[Exporter, Callable[[], onnx.ModelProto]]] = []
    if exporter in ("auto", "dynamo"):
        tries.append(("dynamo", lambda: _dynamo(wrapper, example, opset)))
    if exporter in ("auto", "torchscript"):
        tries.append(("torchscript", lambda: _torchscript(wrapper, example, opset)))
    reasons: list[str] = []
    for name, run in tries:
        try:
            # No grad: the dynamo exporter traces transformers' Swin only without autograd.
            # Its progress lines go to stdout: keep them off the command's output.
            with (
                warnings.catch_warnings(),
                torch.no_grad(),
                contextlib.redirect_stdout(io.StringIO()),
            ):
                warnings.simplefilter("ignore")
                proto = run()
        except Exception as e:  # exporters raise anything from torch._dynamo to onnx errors
            reasons.append(f"{name}: {type(e).__name__}: {first_line(e)}")
            continue
        used_opset = _default_opset(proto)
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        size = proto.ByteSize()
        if size > MAX_PROTO_BYTES:
            raise ExportError(
                f"{path}: the graph is {size / 1e9:.1f} GB, over ONNX's 2 GB single-file limit; "
                "export the refit model (--members refit) or fewer members"
            )
        onnx.checker.check_model(proto)
        with atomic_path(path) as tmp:
            tmp.write_bytes(proto.SerializeToString())
        return name, used_opset, reasons[0] if reasons else None
    raise ExportError(
        f"{path}: {_model_name(models)} cannot be exported to ONNX (opset {opset}): "
        + "; ".join(reasons)
    )


def _dynamo(wrapper: nn.Module, example: torch.Tensor, opset: int) -> Any:
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(
        wrapper,
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: batch}},
        optimize=True,
        verbose=False,
    )
    return program.model_proto


def _torchscript(wrapper: nn.Module, example: torch.Tensor, opset: int) -> Any:
    import onnx

    buf = io.BytesIO()
    torch.onnx.export(
        wrapper,
        (example,),
        buf,
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    return onnx.load_from_string(buf.getvalue())


def _default_opset(proto: Any) -> int:
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def _model_name(models: Sequence[nn.Module]) -> str:
    spec = getattr(models[0], "spec", None) if models else None
    return getattr(spec, "name", type(models[0]).__name__ if models else "model")


def export_run(
    run_dir: str | Path,
    *,
    fmt: str = "onnx",
    out: str | Path | None = None,
    members: Members = "auto",
    opset: int = DEFAULT_OPSET,
    exporter: Literal["auto", "dynamo", "torchscript"] = "auto",
    verify_on: Sequence[str | Path] = (),
    n_real: int = 8,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Callable[[str], None] = lambda m: None,
) -> ExportResult:
    """Export a bundle's served configuration and verify it against PyTorch.

    Args:
        run_dir: The run bundle.
        fmt: ``onnx`` (the only format so far).
        out: The ``.onnx`` file (default ``RUN/export/<configuration>.onnx``, where the onnx
            backend of the Predictor looks).
        members: ``folds``, ``refit`` or ``auto`` (the bundle's default).
        opset: ONNX opset.
        exporter: ``auto`` (dynamo, falling back to TorchScript), ``dynamo`` or ``torchscript``.
        verify_on: Image files to verify on besides generated images and the bundle's holdout.
        n_real: How many of the bundle's holdout images (when readable) to verify on.
        tolerance: Largest absolute logit difference accepted.
        log: Progress messages.

    Raises:
        ExportError: Unknown format or opset, an unexportable model, or a verification failure
            (the file is then removed).
        BundleError: The bundle is unusable.
    """
    from xraycls.inference.predictor import Predictor

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: unknown; supported: {', '.join(FORMATS)}")
    if not 7 <= opset <= 23:
        raise ExportError(f"--opset {opset}: use an ONNX opset between 7 and 23 (default 18)")
    if out is not None and Path(out).suffix != ".onnx":
        raise ExportError(f"--out {out}: the file name must end in .onnx")
    missing = [str(p) for p in verify_on if not Path(p).is_file()]
    if missing:
        raise ExportError(f"--verify-on: no such file: {', '.join(missing)}")
    t0 = time.perf_counter()
    bundle = Bundle.read(run_dir)
    torch_pred = Predictor.from_run(bundle, members=members, device="cpu")
    configuration = torch_pred.configuration
    target = Path(out) if out is not None else default_export_path(bundle, configuration)
    files = bundle.weights(configuration)
    meta = _metadata(bundle, configuration, files)
    log(f"export: {bundle.model} x{len(files)} ({configuration}) -> {target}")
    # Written beside the target and moved over it only once verified: a failed export never
    # replaces a good one.
    staged = target.with_name(f".{target.stem}.unverified.onnx")
    used, used_opset, fallback = export_onnx(
        torch_pred.models,
        staged,
        image_size=bundle.image_size,
        opset=opset,
        metadata=meta | {"xraycls_opset_requested": str(opset)},
        exporter=exporter,
    )
    if fallback:
        log(f"export: dynamo exporter failed ({fallback}); used the TorchScript exporter")
    try:
        onnx_pred = Predictor.from_run(
            bundle, members=configuration, device="cpu", backend="onnx", onnx_path=staged
        )
        verification = verify(
            torch_pred, onnx_pred, real=_real_images(bundle, verify_on, n_real), tolerance=tolerance
        )
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    ok = verification.decisions_equal and verification.max_abs_logit_diff <= tolerance
    if ok:
        os.replace(staged, target)
    else:
        staged.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    result = ExportResult(
        path=target,
        sidecar=sidecar_path(target),
        configuration=configuration,
        exporter=used,
        opset=used_opset,
        seconds=seconds,
        size_bytes=target.stat().st_size if ok else 0,
        verification=verification,
        fallback_reason=fallback,
    )
    import onnx
    import onnxruntime

    write_json_atomic(
        result.sidecar,
        {
            "format": "onnx",
            "file": target.name,
            "metadata": meta,
            "exporter": used,
            "dynamo_failure": fallback,
            "opset": used_opset,
            "opset_requested": opset,
            "input": {
                "name": INPUT_NAME,
                "shape": ["batch", 3, bundle.image_size, bundle.image_size],
                "dtype": "float32",
                "normalization": {
                    "mean": list(bundle.normalization[0]),
                    "std": list(bundle.normalization[1]),
                },
            },
            "output": {"name": OUTPUT_NAME, "shape": ["batch", len(files), len(bundle.classes)]},
            "classes": list(bundle.classes),
            "postprocessing": "mean over members, then the bundle's calibration.json "
            "(or a site calibration) and operating threshold, as xraycls.Predictor applies them",
            "verification": asdict(verification),
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "seconds": round(seconds, 2),
        },
    )
    if not ok:
        raise ExportError(
            f"{target}: onnxruntime does not reproduce PyTorch (max |logit diff| "
            f"{verification.max_abs_logit_diff:.2e}, tolerance {tolerance:g}; decisions "
            f"{'equal' if verification.decisions_equal else 'differ'}); nothing was exported, "
            f"the details are in {result.sidecar}"
        )
    return result


def _metadata(bundle: Bundle, configuration: str, files: Sequence[Path]) -> dict[str, str]:
    from xraycls import __version__

    return {
        "xraycls_bundle_id": bundle_id(bundle),
        "xraycls_weights_sha256": weights_sha256(files),
        "xraycls_model": bundle.model,
        "xraycls_configuration": configuration,
        "xraycls_members": str(len(files)),
        "xraycls_image_size": str(bundle.image_size),
        "xraycls_classes": json.dumps(list(bundle.classes)),
        "xraycls_version": __version__,
    }


# --------------------------------------------------------------------------- verification


def generated_images(size: int, n: int = 4, *, seed: int = 0) -> list[np.ndarray]:
    """Synthetic [0, 1] images at ``size``: smooth gradients, blobs and noise, each different,
    so the verification covers more than one kind of input."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    out = []
    for i in range(n):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / rng.uniform(0.01, 0.1))
        img = 0.3 * (xx if i % 2 else yy) + 0.5 * blob + rng.normal(0, 0.05, (size, size))
        out.append(np.clip(img, 0.0, 1.0).astype(np.float32))
    return out


def _real_images(bundle: Bundle, extra: Sequence[str | Path], n_real: int) -> list[Path]:
    """Files to verify on: those given, then up to ``n_real`` of the bundle's holdout images
    that still exist on this machine."""
    files = [Path(p) for p in extra]
    holdout = bundle.path / HOLDOUT_FILE
    if n_real > 0 and holdout.is_file():
        import csv

        with holdout.open(newline="") as f:
            for row in csv.DictReader(f):
                p = Path(row.get("path", ""))
                if p.is_file():
                    files.append(p)
                if len(files) >= len(extra) + n_real:
                    break
    return files


def verify(
    reference: Predictor,
    candidate: Predictor,
    *,
    real: Sequence[Path] = (),
    n_generated: int = 4,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Verification:
    """Score the same images with two Predictors of one bundle and compare logits and decisions.

    Real files go through the bundle's preprocessing (``preprocess_file``); unreadable ones are
    skipped. Batches of several images exercise the dynamic batch axis.
    """
    from xraycls.errors import ImageReadError
    from xraycls.io.preprocess import preprocess_file

    pixels = generated_images(reference.prep.image_size, n_generated)
    used: list[str] = []
    for p in real:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels.append(preprocess_file(p, reference.prep).pixels)
            used.append(str(p))
        except ImageReadError:
            continue
    diffs, pdiffs, same = [0.0], [0.0], True
    for start in range(0, len(pixels), 4):
        chunk = pixels[start : start + 4]
        batch = reference.to_tensor(chunk)
        a, b = reference.logits(batch), candidate.logits(batch)
        diffs.append(float(np.abs(a - b).max()))
        pa, pb = reference.predict(chunk), candidate.predict(chunk)
        pdiffs.extend(float(np.abs(x.probs - y.probs).max()) for x, y in zip(pa, pb, strict=True))
        same &= all(x.predicted == y.predicted for x, y in zip(pa, pb, strict=True))
    return Verification(
        n_images=len(pixels),
        n_real_images=len(used),
        max_abs_logit_diff=max(diffs),
        decisions_equal=bool(same),
        max_abs_prob_diff=max(pdiffs),
        tolerance=tolerance,
        real_sources=used,
    )


__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "BundleError",
    "ExportError",
    "ExportResult",
    "OnnxRunner",
    "Verification",
    "bundle_id",
    "default_export_path",
    "export_onnx",
    "export_run",
    "generated_images",
    "open_export",
    "sidecar_path",
    "verify",
    "weights_sha256",
]
