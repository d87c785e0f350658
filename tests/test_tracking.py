"""Experiment tracking against a real local MLflow store (SQLite), read back with MlflowClient;
and off by default, at no cost (MLflow is never imported)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_square_dataset

from xraycls.training.config import load_config
from xraycls.training.crossval import run_training

REPO = Path(__file__).resolve().parents[1]


def _cfg(labels: Path, *extra: str):
    return load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"data.labels={labels}",
            "data.limit=null",
            "model.name=resnet50_test",
            "augment.enabled=false",
            "calibration.n_boot=100",
            "train.stages=[{epochs: 2, train: all, lr: 0.002}]",
            *extra,
        ],
    )


def test_a_run_is_logged_to_a_local_mlflow_store_and_resumes_into_it(tmp_path: Path) -> None:
    pytest.importorskip(
        "mlflow", reason="tracking extra not installed (pip install 'xraycls[tracking]')"
    )
    from mlflow.tracking import MlflowClient

    labels = write_square_dataset(tmp_path / "data", n=32, seed=3)
    out = tmp_path / "run"
    cfg = _cfg(labels, "tracking.mlflow={experiment: smoke-test}")
    run_training(cfg, out, log=lambda m: None)
    stored = json.loads((out / "mlflow_run.json").read_text())
    assert stored["tracking_uri"] == f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=stored["tracking_uri"])
    exp = client.get_experiment_by_name("smoke-test")
    runs = client.search_runs(
        [exp.experiment_id], filter_string="params.`model.name` = 'resnet50_test'"
    )
    assert [r.info.run_id for r in runs] == [stored["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["cv.folds"] == "2"
    history = client.get_metric_history(run.info.run_id, "fold0/train_loss")
    assert [m.step for m in history] == [0, 1]  # one point per epoch of fold 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["pooled_oof/auroc"] == pytest.approx(metrics["pooled_oof"]["auroc"])
    assert "floor/auroc" in run.data.metrics and "served/folds/ece" in run.data.metrics
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/metrics.json", "report/MODEL_CARD.md"} <= listed
    bundle = {a.path for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert "bundle/calibration.json" in bundle and "bundle/fold0" in bundle
    assert client.list_artifacts(run.info.run_id, "plots")[0].path == "plots/training_curves.png"
    assert (out / "mlflow" / "artifacts").is_dir()  # artifacts stay with the run, not in ./mlruns

    # Re-running the same command resumes the same MLflow run.
    run_training(cfg, out, log=lambda m: None)
    again = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in again] == [stored["run_id"]]
    assert again[0].info.status == "FINISHED"


def test_tracking_off_never_imports_mlflow(tmp_path: Path) -> None:
    labels = write_square_dataset(tmp_path / "data", n=24, seed=4)
    code = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from test_tracking import _cfg
from xraycls.training.crossval import run_training
run_training(_cfg({str(labels)!r}), {str(tmp_path / "run")!r}, log=lambda m: None)
assert "mlflow" not in sys.modules, "tracking is off but mlflow was imported"
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
    assert not (tmp_path / "run" / "mlflow_run.json").exists()
