"""Experiment configuration: typed, strict, and saved with every run.

A config is YAML validated by pydantic models that forbid unknown keys (a typo is an error, not
a silently ignored setting). ``--set a.b=c`` overrides any key; the value is parsed as YAML, so
``--set train.stages='[{epochs: 1, train: all, lr: 1e-4}]'`` works.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from xraycls.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The network."""

    name: str = "swin_tiny"
    image_size: int = 1024
    pretrained: str | None = None
    """A local HF directory, a .safetensors file, or a hub id (needs the hub cache offline)."""
    grad_checkpointing: bool = False

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v < 32 or v % 32:
            raise ValueError(f"must be a positive multiple of 32, got {v}")
        return v


NO_FINDING = frozenset({"no finding", "no_finding", "nofinding", "normal"})
"""Labels meaning "none of the findings" (NIH's ``No Finding``): not a finding to predict."""


class DataConfig(_Strict):
    """Where the images and labels are, and how images become tensors."""

    labels: Path = Path("../shared/data/cxr-pneumonia-224/sample-1000.csv")
    """A labels CSV (``path,label[,patient_id,...]``, paths relative to it) or an ingest manifest."""
    task: Literal["multiclass", "multilabel"] = "multiclass"
    """``multiclass``: one label per image (softmax). ``multilabel``: any number of findings
    per image (one sigmoid each), from ``label_columns`` or a separated ``label_column``."""
    label_column: str = "label"
    label_columns: list[str] | None = None
    """Multi-label: one 0/1 column per finding (blank or -1, as in CheXpert: unknown)."""
    label_separator: str | None = None
    """Multi-label: ``label_column`` holds the findings joined by this (NIH: ``"|"``)."""
    findings: list[str] | None = None
    """Multi-label: the findings to predict, in order (default: ``label_columns``, or every
    finding named in ``label_column`` except "No Finding")."""
    uncertain: Literal["mask", "zero", "one"] = "mask"
    """Multi-label: what a blank or -1 label counts as. ``mask``: unknown, left out of the loss
    and of every metric for that finding; ``zero``/``one``: absent/present."""
    min_positives: int = Field(default=2, ge=1)
    """Multi-label: each finding needs this many positive images in every fold (and in the
    calibration holdout) to be evaluated there; fewer is an error naming finding and fold."""
    patient_column: str = "patient_id"
    classes: list[str] | None = None
    """Class order (the last one is "positive" for binary metrics); default: sorted labels."""
    limit: int | None = Field(default=None, ge=4)
    """Use a stratified, patient-grouped subset of this many images (smoke runs)."""
    age_range: tuple[float, float] | None = None
    """The training population's ages in years as the data set documents them (the Kermany set:
    ``[1, 5]``). Stored in the bundle: images whose DICOM age is outside are flagged
    out-of-distribution wherever a prediction is written."""
    resize: Literal["letterbox", "squash"] = "letterbox"
    window: Literal["auto", "header", "none", "percentile"] = "auto"
    cache_dir: Path | None = None
    """On-disk uint16 cache of preprocessed images: saves the decode and resize of every image in
    every epoch and run (full-size DICOM above all; the CPU recipes use it for the 224-px PNGs)."""
    num_workers: int = Field(default=0, ge=0)


class AugmentConfig(_Strict):
    """Radiograph-safe augmentation (MONAI): small geometry and contrast changes, no flips."""

    enabled: bool = True
    prob: float = Field(default=0.8, ge=0, le=1)
    rotate_deg: float = Field(default=5.0, ge=0, le=45)
    scale: float = Field(default=0.05, ge=0, le=0.5)
    translate: float = Field(default=0.03, ge=0, le=0.5)
    gamma: tuple[float, float] = (0.8, 1.25)
    hflip: bool = False
    """Off by default: the heart is on the left; flipping teaches situs inversus."""


_TRAIN_SPEC = re.compile(r"^(head|all|last_stages\((\d+)\))$")


class StageConfig(_Strict):
    """One training stage: which parameters train, for how long, at which learning rate."""

    epochs: int = Field(ge=1)
    train: str = "all"
    """``head``, ``all`` or ``last_stages(N)`` (the head plus the last N backbone stages)."""
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    layer_decay: float | None = Field(default=None, gt=0, le=1)
    """Each stage further from the head gets ``lr * layer_decay**distance``."""
    warmup_epochs: float = Field(default=0.0, ge=0)

    @field_validator("train")
    @classmethod
    def _train_spec(cls, v: str) -> str:
        v = v.replace(" ", "")
        if not _TRAIN_SPEC.match(v):
            raise ValueError(f"must be 'head', 'all' or 'last_stages(N)', got {v!r}")
        return v


class TrainConfig(_Strict):
    """The optimisation loop."""

    stages: list[StageConfig] = Field(
        default_factory=lambda: [
            StageConfig(epochs=2, train="head", lr=1e-3),
            StageConfig(epochs=3, train="last_stages(2)", lr=3e-4),
            StageConfig(epochs=10, train="all", lr=1e-4, layer_decay=0.75),
        ]
    )
    batch_size: int = Field(default=8, ge=1)
    accumulate: int = Field(default=1, ge=1)
    """Gradient accumulation steps (effective batch = batch_size * accumulate)."""
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on CUDA (fp16 + GradScaler where the GPU lacks bf16); on CPU bf16 only
    with native support (AMX/AVX512-BF16), else fp32 (bf16 is 7-100x slower on AVX2 CPUs)."""
    channels_last: Literal["auto", "on", "off"] = "auto"

    @field_validator("amp", "channels_last", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: object) -> object:
        # YAML 1.1 reads a bare `off` / `on` as a boolean.
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v

    class_weighting: bool = True
    """Multi-class: inverse-frequency class weights in the cross-entropy."""
    pos_weight: Literal["auto", "none"] | dict[str, float] = "none"
    """Multi-label: BCE ``pos_weight`` per finding. ``auto``: negatives/positives of each
    finding in the training fold; a mapping sets it per finding (others 1)."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    early_stopping_patience: int | None = Field(default=3, ge=1)
    """Stop after this many epochs without inner-validation AUROC gain (last stage only)."""
    select: Literal["best", "last"] = "best"
    """Which epoch's weights a fold keeps. ``best``: the highest inner-validation AUROC (with
    early stopping). ``last``: the end of the schedule, no early stopping; the inner set is
    then only watched. A small inner set's AUROC is noisy enough to pick an undertrained
    epoch-1 model when training from scratch; a full cosine schedule's end is not."""
    inner_val_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    """Patients held out of each training fold for early stopping and checkpoint selection, so
    the outer fold's out-of-fold predictions are never used to choose anything."""
    device: str = "auto"
    threads: int | None = None

    @field_validator("stages")
    @classmethod
    def _non_empty(cls, v: list[StageConfig]) -> list[StageConfig]:
        if not v:
            raise ValueError("at least one stage is required")
        return v


class CVConfig(_Strict):
    """Patient-grouped cross-validation, and the holdout that calibrates what the bundle serves."""

    folds: int = Field(default=5, ge=2)
    refit: bool = False
    """Also train one model on all development data (the bundle's ``weights.safetensors``)."""
    calibration_holdout: float = Field(default=0.2, ge=0, lt=0.5)
    """Fraction of patients set aside before cross-validation: no model of the bundle trains
    on them, so the served models' calibration and operating threshold are fitted (and
    validated, cross-fitted) on data they never saw. 0 ships uncalibrated probabilities."""


class CalibrationConfig(_Strict):
    """Fitted on the calibration holdout at the end of ``xraycls train``, per served model."""

    method: Literal["auto", "temperature", "platt", "vector", "isotonic", "none"] = "auto"
    """``auto`` picks, by cross-fitted NLL on the holdout, between temperature scaling and a
    calibrator with intercepts (Platt for two classes, vector scaling for more)."""
    threshold_target: Literal["sensitivity", "specificity", "youden"] = "sensitivity"
    """Binary runs: how the stored operating threshold is chosen on calibrated probabilities."""
    threshold_value: float | None = Field(default=0.95, gt=0, le=1)
    n_boot: int = Field(default=1000, ge=100)
    """Bootstrap resamples of every interval the bundle reports."""


class MlflowConfig(_Strict):
    """Where and how a run is logged to MLflow (see :mod:`xraycls.training.tracking`)."""

    tracking_uri: str | None = None
    """Default: a SQLite store inside the run folder (``sqlite:///<run>/mlflow/mlflow.db``)."""
    experiment: str = "xraycls"
    run_name: str | None = None
    """Default: the run folder's name."""
    log_bundle: bool = True
    """Upload the bundle (weights included) as artifacts at the end."""


class TrackingConfig(_Strict):
    """Experiment tracking; off unless a backend is configured (and then only imported)."""

    mlflow: MlflowConfig | None = None


class DistillConfig(_Strict):
    """Train this run as a student of a finished run (see :mod:`xraycls.training.distill`)."""

    teacher: Path
    """The teacher's run folder (a bundle of the same classes)."""
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.7, ge=0, le=1)
    """Weight of the teacher's soft term; ``1 - alpha`` goes to the hard labels."""
    teacher_model: Literal["fold", "ensemble"] = "fold"
    """``fold``: the student of fold k learns from the teacher's fold-k model only (it never saw
    fold k), so out-of-fold metrics stay honest; needs the teacher's folds (checked).
    ``ensemble``: every student model learns from the mean of the teacher's fold models (the
    student's out-of-fold metrics are then optimistic, and marked so)."""
    cache_dir: Path | None = None
    """Where teacher logits are cached; default ``<teacher>/teacher_logits``."""


class Config(_Strict):
    """A whole experiment."""

    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    distill: DistillConfig | None = None
    """Learn from a teacher run's logits (``xraycls distill``); None trains on labels alone."""

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.data.limit is not None and self.data.limit < 2 * self.cv.folds:
            raise ValueError(f"data.limit={self.data.limit} is too small for {self.cv.folds} folds")
        if self.calibration.method != "none" and self.cv.calibration_holdout == 0:
            raise ValueError(
                "calibration.method needs data no model saw: set cv.calibration_holdout > 0, "
                "or calibration.method: none (uncalibrated probabilities, no threshold)"
            )
        if self.calibration.threshold_target == "youden":
            self.calibration.threshold_value = None
        self._check_task()
        return self

    def _check_task(self) -> None:
        d = self.data
        if d.task == "multiclass":
            extra = [
                k
                for k, v in (
                    ("data.label_columns", d.label_columns),
                    ("data.label_separator", d.label_separator),
                    ("data.findings", d.findings),
                )
                if v is not None
            ]
            if extra:
                raise ValueError(f"{', '.join(extra)} need data.task: multilabel")
            if self.train.pos_weight != "none":
                raise ValueError("train.pos_weight needs data.task: multilabel")
            return
        if d.classes is not None:
            raise ValueError("data.classes is for multiclass; use data.findings for multilabel")
        if d.label_columns is not None and d.label_separator is not None:
            raise ValueError(
                "data.label_columns and data.label_separator exclude each other: give 0/1 "
                "columns, or one column of findings joined by a separator"
            )
        if d.label_columns is None and d.label_separator is None:
            raise ValueError(
                "data.task multilabel needs data.label_columns (0/1 columns) or "
                "data.label_separator (e.g. '|' for a column like NIH's finding_labels)"
            )
        if d.label_columns is not None:
            _unique_names("data.label_columns", d.label_columns)
            if len(d.label_columns) < 1:
                raise ValueError("data.label_columns: name at least one column")
            unknown = sorted(set(d.findings or []) - set(d.label_columns))
            if unknown:
                raise ValueError(f"data.findings {unknown} are not in data.label_columns")
        if d.label_separator == "":
            raise ValueError(
                "data.label_separator must not be empty (quote it in YAML: '|', since a bare "
                "| starts a block)"
            )
        if d.findings is not None:
            _unique_names("data.findings", d.findings)
            if not d.findings:
                raise ValueError("data.findings: name at least one finding")
        if isinstance(self.train.pos_weight, dict):
            bad = {k: v for k, v in self.train.pos_weight.items() if not v > 0}
            if bad:
                raise ValueError(f"train.pos_weight: weights must be > 0, got {bad}")
            names = d.findings or d.label_columns
            if names is not None:
                unknown = sorted(set(self.train.pos_weight) - set(names))
                if unknown:
                    raise ValueError(f"train.pos_weight: {unknown} are not findings {names}")

    def to_yaml(self) -> str:
        """The resolved config as YAML (what a run saves as ``config.yaml``)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _unique_names(option: str, names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{option}: duplicated {dupes}")
    blank = [n for n in names if not str(n).strip()]
    if blank:
        raise ValueError(f"{option}: blank name")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config and apply ``key.path=value`` overrides.

    Raises:
        ConfigError: Unreadable YAML, an unknown key, a bad value, or a malformed override; the
            message names the file and the key.
    """
    data: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: config file not found") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded or {}
    for item in overrides or []:
        _apply_override(data, item)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{source}: {problems}") from e


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from e
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
