"""Knowledge distillation: a student learns from a trained teacher bundle's logits.

The loss (Hinton et al., 2015) mixes the teacher's softened opinion with the hard labels::

    alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

and, for multi-label tasks, the same with one sigmoid per finding (the soft term is the binary
KL, which has the gradient of BCE against the teacher's softened probability but is zero when
the student matches the teacher; the hard term is a BCE masked where a label is uncertain).
The ``T^2`` keeps the soft term's gradient on the scale of the hard one as ``T`` changes.

Honest cross-validation: the student of fold k learns from the teacher's **fold-k model**, which
never saw fold k's patients, on fold k's training images only; so the student's out-of-fold
predictions are as clean as the teacher's. This needs the same patients in the same folds (and
the same calibration holdout), which :meth:`Teacher.check_folds` verifies from the teacher's
``folds.csv``. The refit student (``cv.refit``) learns from the mean logits of the teacher's fold
models (every one of them trained on development data only, never on the holdout).

Teacher logits are computed once per teacher model at the **teacher's** input size and
preprocessing, and cached on disk (:class:`LogitCache`), keyed by the teacher's identity, the
weight file's hash, the preprocessing and each image file's hash; the student trains at its own
size and family. A student's augmented view is scored against the teacher's logits of the
un-augmented image (the price of computing the teacher once rather than every epoch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xraycls.bundle.format import BUNDLE_FILE, LABELS_FILE, Bundle, BundleError
from xraycls.errors import ConfigError
from xraycls.io.files import atomic_open
from xraycls.io.manifest import read_table
from xraycls.models.runtime import Amp
from xraycls.models.weights import load_weights
from xraycls.training.config import DistillConfig
from xraycls.training.data import Table, XrayDataset

# --------------------------------------------------------------------------- the losses


def soft_kl_softmax(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


def soft_kl_sigmoid(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * mean binary KL(sigmoid(t/T) || sigmoid(s/T))`` over every entry (findings).

    ``BCE(s/T, sigmoid(t/T))`` minus the teacher's own entropy: the gradient of BCE against the
    teacher's soft targets, and zero where student and teacher agree.
    """
    t = float(temperature)
    s_t, t_t = student_logits / t, teacher_logits.detach() / t
    p_t = torch.sigmoid(t_t)
    cross = F.binary_cross_entropy_with_logits(s_t, p_t, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(t_t, p_t, reduction="none")
    return (cross - entropy).mean() * t * t


def distill_loss_softmax(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    T: float,
    alpha: float,
    *,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``.

    Args:
        student_logits: ``N x C``.
        teacher_logits: ``N x C`` (no gradient flows into them).
        targets: ``N`` integer classes.
        T: Temperature (> 0).
        alpha: Weight of the teacher's term, in [0, 1]; 0 is plain cross-entropy.
        weight: Class weights of the hard term, as for :func:`torch.nn.functional.cross_entropy`.
        label_smoothing: Of the hard term.
    """
    hard = F.cross_entropy(student_logits, targets, weight=weight, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    return alpha * soft_kl_softmax(student_logits, teacher_logits, T) + (1 - alpha) * hard


def distill_loss_sigmoid(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    T: float,
    alpha: float,
    *,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-label distillation: one sigmoid per finding.

    ``alpha * T^2 * mean KL(sigmoid(t/T) || sigmoid(s/T)) + (1 - alpha) * masked BCE(s, y)``.
    The soft term is ``BCE(sigmoid(s/T), sigmoid(t/T))`` minus the teacher's own entropy (the
    same gradient, zero at ``s == t``) over every finding, uncertain ones included: the teacher
    has an opinion where the label is missing. The hard term averages BCE over the entries
    ``mask`` keeps (1 = label known).

    Args:
        student_logits: ``N x K``.
        teacher_logits: ``N x K``.
        targets: ``N x K`` in {0, 1} (any value where ``mask`` is 0).
        mask: ``N x K``, 1 where the label counts; None keeps all.
        T: Temperature (> 0).
        alpha: Weight of the teacher's term, in [0, 1].
        pos_weight: ``K`` positive-class weights of the hard term.
    """
    y = targets.to(student_logits.dtype)
    m = torch.ones_like(y) if mask is None else mask.to(student_logits.dtype)
    known = torch.where(m > 0, y, torch.zeros_like(y))  # e.g. CheXpert's -1 never reaches BCE
    per_entry = F.binary_cross_entropy_with_logits(
        student_logits, known, pos_weight=pos_weight, reduction="none"
    )
    hard = (per_entry * m).sum() / m.sum().clamp_min(1.0)
    if alpha == 0:
        return hard
    soft = soft_kl_sigmoid(student_logits, teacher_logits, T)
    return alpha * soft + (1 - alpha) * hard


class DistillLoss(nn.Module):
    """The distillation loss around a run's hard-label loss (``loss(s, y, t)``).

    ``hard`` is the loss the run would use without a teacher (class-weighted cross-entropy, or
    the masked BCE of a multi-label run, globally normalised under data parallelism), so
    distillation changes only the soft term: KL between softmaxes at temperature T, or
    (``multilabel``) the binary KL of each finding's sigmoid.
    """

    def __init__(
        self, hard: nn.Module, *, temperature: float, alpha: float, multilabel: bool = False
    ) -> None:
        super().__init__()
        self.hard, self.temperature, self.alpha = hard, temperature, alpha
        self.multilabel = multilabel

    def forward(
        self, student_logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        hard = self.hard(student_logits, y)
        if self.alpha == 0:
            return hard
        soft_kl = soft_kl_sigmoid if self.multilabel else soft_kl_softmax
        soft = soft_kl(student_logits, teacher_logits, self.temperature)
        return self.alpha * soft + (1 - self.alpha) * hard


# --------------------------------------------------------------------------- the cache


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (what identifies an image in the logit cache)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LogitCache:
    """One teacher model's logits per image file, in ``<folder>/<key>.npz``.

    The key hashes the teacher bundle's identity (``bundle.json``, ``labels.json``), the weight
    file's bytes and the preprocessing; rows are keyed by the image file's SHA-256, so a renamed
    file hits and an edited one misses. Writes are atomic: a killed run leaves the old file.
    """

    def __init__(self, folder: Path, key: str) -> None:
        self.path = folder / f"{key}.npz"

    def load(self) -> dict[str, np.ndarray]:
        """The cached logits by file hash (empty when there is no usable cache file)."""
        if not self.path.is_file():
            return {}
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return dict(zip(z["files"].tolist(), z["logits"], strict=True))
        except (OSError, ValueError, KeyError):
            return {}  # unreadable: recomputed and rewritten

    def save(self, rows: dict[str, np.ndarray]) -> None:
        """Replace the cache file with ``rows`` (atomically)."""
        files = sorted(rows)
        with atomic_open(self.path, "wb") as f:
            np.savez(
                f,
                files=np.array(files, dtype="U64"),
                logits=np.stack([rows[k] for k in files]).astype(np.float32),
            )


# --------------------------------------------------------------------------- the teacher


@dataclass
class Teacher:
    """A teacher bundle opened for distillation: its models, their cached logits and checks."""

    bundle: Bundle
    cfg: DistillConfig
    cache_dir: Path
    device: torch.device
    amp: Amp
    batch_size: int = 32
    log: Callable[[str], None] = print
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per student model: images whose teacher logits came from the cache / were computed."""

    @classmethod
    def open(
        cls,
        cfg: DistillConfig,
        *,
        classes: list[str],
        device: torch.device,
        amp: Amp,
        batch_size: int = 32,
        log: Callable[[str], None] = print,
        multilabel: bool = False,
    ) -> Teacher:
        """Read the teacher bundle and check that it can teach a student of ``classes``.

        Raises:
            ConfigError: The teacher is missing or incomplete, or its classes differ.
        """
        teacher = Path(cfg.teacher)
        if not teacher.is_dir():
            raise ConfigError(f"distill.teacher {teacher}: no such run folder")
        try:
            bundle = Bundle.read(teacher)
            weights = bundle.weights("folds")
        except BundleError as e:
            raise ConfigError(f"distill.teacher {teacher}: not a usable run bundle ({e})") from e
        if list(bundle.classes) != list(classes):
            raise ConfigError(
                f"distill.teacher {teacher}: its classes {list(bundle.classes)} differ from the "
                f"student's {list(classes)}; train the student on the same labels "
                "(data.label_column, data.classes)"
            )
        if bundle.multilabel != multilabel:
            kinds = {True: "multi-label (one sigmoid per finding)", False: "one class per image"}
            raise ConfigError(
                f"distill.teacher {teacher}: the teacher is {kinds[bundle.multilabel]} but the "
                f"student is {kinds[multilabel]}; set data.task to the teacher's task"
            )
        if not weights:
            raise ConfigError(f"distill.teacher {teacher}: no fold models")
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else teacher / "teacher_logits"
        return cls(bundle, cfg, cache_dir, device, amp, batch_size, log)

    @property
    def n_folds(self) -> int:
        return len(self.bundle.fold_weights)

    def identity(self) -> str:
        """A hash of the teacher bundle's identity files (``bundle.json``, ``labels.json``)."""
        h = hashlib.sha256()
        for name in (BUNDLE_FILE, LABELS_FILE):
            h.update((self.bundle.path / name).read_bytes())
        return h.hexdigest()[:16]

    def check_folds(self, table: Table, folds: np.ndarray, holdout: Table, *, n_folds: int) -> None:
        """Verify that the student's folds and holdout are the teacher's (``fold`` mode), or at
        least that no student holdout image trained the teacher (``ensemble`` mode).

        Raises:
            ConfigError: The teacher's ``folds.csv`` is missing or disagrees; the message says
                how many images differ, gives an example and the settings that decide folds.
        """
        path = self.bundle.path / "folds.csv"
        if not path.is_file():
            raise ConfigError(f"distill.teacher {self.bundle.path}: no folds.csv to compare folds")
        teacher_fold = {r["path"]: r["fold"] for r in read_table(path)}
        how = (
            "train the student with the teacher's seed, data.labels, data.limit, cv.folds and "
            "cv.calibration_holdout, or use distill.teacher_model: ensemble (out-of-fold "
            "metrics then optimistic)"
        )
        leaked = [p for p in holdout.paths if teacher_fold.get(p, "holdout") != "holdout"]
        if leaked:
            raise ConfigError(
                f"distill.teacher {self.bundle.path}: {len(leaked)} of the student's calibration "
                f"holdout images trained the teacher (e.g. {leaked[0]}); {how}"
            )
        if self.cfg.teacher_model != "fold":
            return
        if n_folds != self.n_folds:
            raise ConfigError(
                f"distill.teacher {self.bundle.path}: the teacher has {self.n_folds} folds, the "
                f"student cv.folds={n_folds}; {how}"
            )
        differ = [
            (p, teacher_fold.get(p, "absent"), int(k))
            for p, k in zip(table.paths, folds, strict=True)
            if teacher_fold.get(p) != str(int(k))
        ]
        if differ:
            p, t, s = differ[0]
            raise ConfigError(
                f"distill.teacher {self.bundle.path}: fold assignment differs for {len(differ)} "
                f"of {len(table)} images (e.g. {p}: teacher fold {t}, student fold {s}); {how}"
            )

    def members_for(self, name: str) -> list[Path]:
        """The teacher weight files whose mean logits teach the student model ``name``:
        fold k's model for ``fold{k}`` (``fold`` mode), else every fold model."""
        weights = self.bundle.weights("folds")
        if self.cfg.teacher_model == "fold" and name.startswith("fold"):
            return [weights[int(name.removeprefix("fold"))]]
        return weights

    def attach(self, name: str, table: Table) -> Table:
        """``table`` with ``teacher_logits`` filled for the student model ``name``."""
        members = self.members_for(name)
        logits = np.mean([self.logits(w, table, name) for w in members], axis=0)
        return table.with_teacher(logits.astype(np.float32))

    def logits(self, weights: Path, table: Table, name: str = "") -> np.ndarray:
        """One teacher model's logits for every image of ``table`` (cached; computed once)."""
        prep = self.bundle.preprocessing
        key = hashlib.sha256(
            "|".join(
                [self.identity(), file_sha256(weights), prep.fingerprint(), self.bundle.model]
            ).encode()
        ).hexdigest()[:24]
        cache = LogitCache(self.cache_dir, f"{weights.parent.name}-{key}")
        rows = cache.load()
        hashes = [file_sha256(p) for p in table.paths]
        missing = sorted({i for i, h in enumerate(hashes) if h not in rows})
        stat = self.stats.setdefault(name or weights.parent.name, {"cached": 0, "computed": 0})
        stat["cached"] += len(table) - len(missing)
        stat["computed"] += len(missing)
        if missing:
            self.log(
                f"teacher {self.bundle.model}@{self.bundle.image_size}px "
                f"{weights.parent.name}: computing logits of {len(missing)} images "
                f"({len(table) - len(missing)} cached)"
            )
            computed = self._run(weights, table.subset(np.array(missing, dtype=np.int64)))
            for i, row in zip(missing, computed, strict=True):
                rows[hashes[i]] = row
            try:
                cache.save(rows)
            except OSError as e:
                raise ConfigError(
                    f"distill: cannot write the teacher-logit cache {cache.path} ({e}); "
                    "set distill.cache_dir to a writable folder"
                ) from e
        else:
            self.log(f"teacher {weights.parent.name}: {len(table)} logits from {cache.path}")
        return np.stack([rows[h] for h in hashes]).astype(np.float32)

    def _run(self, weights: Path, table: Table) -> np.ndarray:
        from torch.utils.data import DataLoader

        from xraycls.models import create_model
        from xraycls.training.engine import predict

        bundle = self.bundle
        model = create_model(
            bundle.model, num_classes=len(bundle.classes), image_size=bundle.image_size
        )
        try:
            model.load_state_dict(load_weights(weights))
        except (RuntimeError, OSError) as e:
            raise ConfigError(
                f"distill.teacher: {weights} does not hold {bundle.model} ({e})"
            ) from e
        model.to(self.device)
        dataset = XrayDataset(
            table.with_teacher(None),
            bundle.preprocessing,
            cache=None,
            normalization=bundle.normalization,
        )
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False)
        logits, _, index = predict(model, loader, amp=self.amp, device=self.device)
        return logits[np.argsort(index)]

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` records about the teacher and the distillation."""
        teacher_metrics = self.bundle.metrics().get("pooled_oof", {})
        return {
            "teacher": str(self.bundle.path.resolve()),
            "teacher_id": self.identity(),
            "teacher_model": self.bundle.model,
            "teacher_image_size": self.bundle.image_size,
            "teacher_pooled_oof_auroc": teacher_metrics.get("auroc"),
            "temperature": self.cfg.temperature,
            "alpha": self.cfg.alpha,
            "teacher_models": self.cfg.teacher_model,
            "out_of_fold_honest": self.cfg.teacher_model == "fold",
            "teacher_logits": self.stats,
        }


def describe(summary: dict[str, Any]) -> str:
    """One line about a distillation (logs and the model card)."""
    return (
        f"distilled from {summary['teacher_model']}@{summary['teacher_image_size']}px "
        f"({summary['teacher']}, id {summary['teacher_id']}): T={summary['temperature']}, "
        f"alpha={summary['alpha']}, teacher models: {summary['teacher_models']}"
        + ("" if summary["out_of_fold_honest"] else " (out-of-fold metrics optimistic)")
    )
