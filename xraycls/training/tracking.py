"""Experiment tracking: ``tracking: {mlflow: {...}}`` logs a training run to MLflow.

One MLflow run per ``xraycls train`` run folder: the resolved config as params (dotted keys),
per-epoch metrics per model as ``fold0/train_loss`` etc. with ``step`` = the global epoch, each
fold's out-of-fold metrics, the run's final metrics (``pooled_oof/auroc``, ``floor/auroc``,
``served/folds/ece``...), and as artifacts the plots, the report (``metrics.json``,
``MODEL_CARD.md``) and the bundle. The run id is kept in ``<run>/mlflow_run.json``, so a resumed
training continues the same MLflow run. Only rank 0 of a data-parallel run logs.

The default store is local and travels with the run: ``sqlite:///<run>/mlflow/mlflow.db`` with
artifacts in ``<run>/mlflow/artifacts`` (MLflow 3 refuses plain ``file:`` stores); any tracking
URI (a server, a shared database) can be given instead. Off by default, and then it costs
nothing: MLflow (as slow to import as torch) is imported only when tracking is configured.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from xraycls.io.files import write_json_atomic

RUN_ID_FILE = "mlflow_run.json"


class Tracker:
    """The no-op tracker (tracking off)."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the run's configuration."""

    def log_metrics(self, metrics: dict[str, float], *, step: int | None = None) -> None:
        """Log metrics (at an epoch ``step``, or final when None)."""

    def log_artifacts(self, files: list[Path], artifact_path: str) -> None:
        """Upload files under ``artifact_path``."""

    def finish(self, status: str = "FINISHED") -> None:
        """Close the run as ``FINISHED``, ``FAILED`` or ``KILLED``."""


class MlflowTracker(Tracker):
    """Logs through ``MlflowClient`` (no fluent global state: safe in library code and tests)."""

    def __init__(
        self, run_dir: Path, *, tracking_uri: str | None, experiment: str, run_name: str | None
    ) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # medical data: no telemetry
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient  # the lazy import: only with tracking on

        self.run_dir = run_dir.resolve()
        uri = tracking_uri or f"sqlite:///{self.run_dir / 'mlflow' / 'mlflow.db'}"
        artifacts = None
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            # Without an explicit location a sqlite store writes artifacts under ./mlruns of
            # whatever the working directory is.
            artifacts = (self.run_dir / "mlflow" / "artifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(experiment, artifact_location=artifacts)
        )
        self.run_id = self._resume_or_create(exp_id, run_name or self.run_dir.name, uri)
        self.logged: set[str] = {
            k for k in self.client.get_run(self.run_id).data.params
        }  # params are immutable: a resumed run logs only new ones

    def _resume_or_create(self, exp_id: str, run_name: str, uri: str) -> str:
        saved = self.run_dir / RUN_ID_FILE
        try:
            stored = json.loads(saved.read_text())
            if stored.get("tracking_uri") == uri:
                self.client.update_run(stored["run_id"], status="RUNNING")
                return str(stored["run_id"])
        except (OSError, ValueError, KeyError):
            pass
        from xraycls import __version__

        run = self.client.create_run(
            exp_id,
            run_name=run_name,
            tags={"xraycls.run_dir": str(self.run_dir), "xraycls.version": __version__},
        )
        write_json_atomic(saved, {"run_id": run.info.run_id, "tracking_uri": uri})
        return str(run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        new = [Param(k, str(v)[:6000]) for k, v in flatten(params).items() if k not in self.logged]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=new[start : start + 100])
        self.logged.update(p.key for p in new)

    def log_metrics(self, metrics: dict[str, float], *, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, int | float) and v == v  # NaN is not a number MLflow stores
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifacts(self, files: list[Path], artifact_path: str) -> None:
        for f in files:
            if f.is_file():
                parent = (
                    f.parent.relative_to(self.run_dir) if f.is_relative_to(self.run_dir) else Path()
                )
                sub = str(Path(artifact_path) / parent) if str(parent) != "." else artifact_path
                self.client.log_artifact(self.run_id, str(f), sub)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def make_tracker(settings: Any, run_dir: Path, *, main: bool = True) -> Tracker:
    """The tracker a config asks for (``tracking.mlflow``), or the no-op one; only the main
    process of a data-parallel run gets a real one."""
    mlflow = getattr(settings, "mlflow", None)
    if mlflow is None or not main:
        return Tracker()
    return MlflowTracker(
        run_dir,
        tracking_uri=mlflow.tracking_uri,
        experiment=mlflow.experiment,
        run_name=mlflow.run_name,
    )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"batch_size": 8}}`` -> ``{"train.batch_size": "8"}``; lists as JSON."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return out


def final_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of ``metrics.json`` as flat MLflow metric names."""
    out: dict[str, float] = {}
    for section, name in (("pooled_oof", "pooled_oof"), ("floor_logreg_32px", "floor")):
        for k, v in (metrics.get(section) or {}).items():
            if isinstance(v, int | float):
                out[f"{name}/{k}"] = float(v)
    for config, s in ((metrics.get("served") or {}).get("configurations") or {}).items():
        for k in ("auroc", "ece", "ece_uncalibrated", "brier"):
            if isinstance((s.get(k) or {}).get("value"), int | float):
                out[f"served/{config}/{k}"] = float(s[k]["value"])
        for k, v in (s.get("at_threshold") or {}).items():
            if isinstance((v or {}).get("value"), int | float):
                out[f"served/{config}/{k}"] = float(v["value"])
    return out
