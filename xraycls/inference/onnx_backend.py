"""Running a bundle's ONNX export with onnxruntime: the ``onnx`` backend of the Predictor.

An export (written by :mod:`xraycls.inference.export`) is one graph per served configuration:
input ``input`` (N x 3 x H x W, normalised), output ``member_logits`` (N x members x classes).
Its ``metadata_props`` carry the bundle id (a hash of ``bundle.json``, ``labels.json`` and
``config.yaml``) and a SHA-256 of the served weight files; :func:`open_export` refuses a graph
whose identity does not match the bundle it is asked to serve, so a retrained bundle never runs
a stale export.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xraycls.bundle.format import BUNDLE_FILE, CONFIG_FILE, LABELS_FILE, Bundle, Configuration

EXPORT_DIR = "export"
"""Where in the bundle exports go by default: ``export/<configuration>.onnx``."""
INPUT_NAME = "input"
OUTPUT_NAME = "member_logits"


class ExportError(ValueError):
    """A model cannot be exported, or an export does not match or reproduce its bundle."""


# --------------------------------------------------------------------------- identity


def bundle_id(bundle: Bundle) -> str:
    """A short hash of the files that define a bundle's model and task (``bundle.json``,
    ``labels.json``, ``config.yaml``)."""
    h = hashlib.sha256()
    for name in (BUNDLE_FILE, LABELS_FILE, CONFIG_FILE):
        p = bundle.path / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.is_file() else b"") + b"\0")
    return h.hexdigest()[:16]


def weights_sha256(files: Sequence[Path]) -> str:
    """SHA-256 over the weight files of a configuration, in order."""
    h = hashlib.sha256()
    for f in files:
        with Path(f).open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def default_export_path(bundle: Bundle, configuration: str) -> Path:
    """``RUN/export/<configuration>.onnx``: where export writes and the onnx backend looks."""
    return bundle.path / EXPORT_DIR / f"{configuration}.onnx"


def sidecar_path(onnx_path: Path) -> Path:
    """The JSON beside an export (``folds.onnx`` -> ``folds.onnx.json``)."""
    return onnx_path.with_name(onnx_path.name + ".json")


def first_line(e: BaseException) -> str:
    """The informative line of an exporter's or onnxruntime's message: the dynamo exporter's
    "Exception summary" (the operator it has no ONNX function for) rather than its headline."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].strip()
        text = re.sub(r"^<class '[\w.]*?(\w+)'>: ", r"\1: ", text)
    lines = text.splitlines()
    return (lines[0] if lines else "")[:400]


class OnnxRunner:
    """An onnxruntime session of an exported configuration, checked against its bundle."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        """Open ``path`` on the CPU.

        Args:
            path: The ``.onnx`` file.
            threads: Intra-op threads (default: torch's setting, so ``OMP_NUM_THREADS`` and the
                viewer's ``--threads`` apply to both backends alike).

        Raises:
            ExportError: onnxruntime is not installed or cannot load the file.
        """
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError(
                "the onnx backend needs onnxruntime: pip install 'xraycls[export]'"
            ) from e
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        import torch  # for its thread setting only

        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ExportError(f"{self.path}: onnxruntime cannot load it ({first_line(e)})") from e
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def check(self, bundle: Bundle, configuration: Configuration, files: Sequence[Path]) -> None:
        """Refuse an export of another bundle, configuration or set of weights.

        Raises:
            ExportError: The message says which identity differs and how to re-export.
        """
        expected = {
            "xraycls_bundle_id": bundle_id(bundle),
            "xraycls_configuration": configuration,
            "xraycls_weights_sha256": weights_sha256(files),
        }
        for key, value in expected.items():
            got = self.metadata.get(key)
            if got != value:
                what = key.removeprefix("xraycls_").replace("_", " ")
                raise ExportError(
                    f"{self.path}: exported from another {what} ({got or 'none recorded'}, this "
                    f"bundle's is {value}); re-export it: xraycls export {bundle.path} "
                    f"--format onnx --members {configuration}"
                )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Members x N x C logits for a normalised N x 3 x H x W float32 batch."""
        (out,) = self.session.run(
            [OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}
        )
        return np.ascontiguousarray(np.transpose(out, (1, 0, 2)))


def open_export(
    bundle: Bundle,
    configuration: Configuration,
    path: str | Path | None = None,
) -> OnnxRunner:
    """The checked onnxruntime session of a bundle's configuration (default location unless
    ``path``).

    Raises:
        ExportError: The file is absent (the message says how to export it), unloadable, or
            belongs to other weights.
        BundleError: The configuration's weights are missing.
    """
    target = Path(path) if path is not None else default_export_path(bundle, configuration)
    if not target.is_file():
        raise ExportError(
            f"{target}: no ONNX export of the {configuration} configuration; create it with "
            f"xraycls export {bundle.path} --format onnx --members {configuration}"
        )
    runner = OnnxRunner(target)
    runner.check(bundle, configuration, bundle.weights(configuration))
    return runner
