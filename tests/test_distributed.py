"""Data-parallel training with torchrun: 2 gloo processes on CPU train like one process.

The setup is deterministic and sized so that every shard is equal (64 balanced synthetic
images, one per patient; holdout, folds and inner splits all even; global batch 6): then two
processes must take the same optimizer steps as one and reach the same weights, up to float
error. Class weighting and staged freezing are on, because each breaks DDP in its own way when
done naively (per-rank loss normalisation; DDP hooks built before unfreezing).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_square_dataset

from xraycls.errors import ConfigError
from xraycls.training.config import load_config
from xraycls.training.crossval import run_training
from xraycls.training.distributed import DistContext, check_batch

REPO = Path(__file__).resolve().parents[1]
STAGES = "train.stages=[{epochs: 1, train: head, lr: 0.002}, {epochs: 2, train: all, lr: 0.001}]"


def _overrides(labels: Path) -> list[str]:
    return [
        f"data.labels={labels}",
        "data.limit=null",
        "model.name=swin_test",
        "augment.enabled=false",
        "train.class_weighting=true",
        "train.batch_size=6",
        "train.inner_val_fraction=0.25",
        "cv.calibration_holdout=0.25",
        "cv.refit=true",
        "calibration.n_boot=100",
        STAGES,
    ]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def _train_cmd(labels: Path, out: Path, *, nproc: int) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "xraycls",
        "train",
        "--config",
        str(REPO / "configs" / "smoke.yaml"),
    ]
    for o in _overrides(labels):
        cmd += ["--set", o]
    return [*cmd, "--out", str(out), "--nproc", str(nproc)]


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The labels and a one-process run of the setup."""
    root = tmp_path_factory.mktemp("ddp")
    labels = write_square_dataset(root / "data", n=64, size=64, seed=0)
    cfg = load_config(REPO / "configs" / "smoke.yaml", _overrides(labels))
    run_training(cfg, root / "one", log=lambda m: None)
    return labels, root / "one"


def _logits(run: Path, name: str) -> np.ndarray:
    return np.array(json.loads((run / name / "result.json").read_text())["logits"])


def _holdout(run: Path) -> np.ndarray:
    rows = list(csv.DictReader((run / "holdout_predictions.csv").open()))
    return np.array([[float(v) for k, v in r.items() if k.startswith("logit_")] for r in rows])


def test_two_gloo_processes_train_like_one(single: tuple[Path, Path], tmp_path: Path) -> None:
    labels, one = single
    two = tmp_path / "two"
    p = subprocess.run(
        _train_cmd(labels, two, nproc=2), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "x 2 processes" in " ".join((p.stdout + p.stderr).split())
    for name in ("fold0", "fold1", "refit"):
        ranks = json.loads((two / name / "result.json").read_text())["ranks"]
        assert ranks["world"] == 2 and len(set(ranks["weight_digests"])) == 1  # identical weights
    for name in ("fold0", "fold1"):
        np.testing.assert_allclose(_logits(two, name), _logits(one, name), atol=1e-4)
    np.testing.assert_allclose(_holdout(two), _holdout(one), atol=1e-4)
    # The optimizer steps of an epoch: the inner training set (18 images per fold, 36 for the
    # refit model) over the global batch of 6, whatever the number of processes.
    for run in (one, two):
        steps = {
            (r["model"], r["epoch"]): int(r["steps"])
            for r in csv.DictReader((run / "log.csv").open())
        }
        assert steps == {
            (m, str(e)): (6 if m == "refit" else 3)
            for m in ("fold0", "fold1", "refit")
            for e in range(3)
        }
    assert (two / "MODEL_CARD.md").is_file() and (two / "calibration.json").is_file()
    assert json.loads((two / "metrics.json").read_text())["pooled_oof"]["auroc"] == pytest.approx(
        json.loads((one / "metrics.json").read_text())["pooled_oof"]["auroc"], abs=1e-6
    )


@pytest.mark.slow  # two more torchrun jobs (about 2 minutes); the fast suite runs the one above
def test_a_killed_distributed_run_resumes_to_the_same_result(
    single: tuple[Path, Path], tmp_path: Path
) -> None:
    labels, one = single
    out = tmp_path / "resumed"
    proc = subprocess.Popen(
        _train_cmd(labels, out, nproc=2),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:  # kill every process of the job once fold 0 has a checkpoint, mid-fold
        deadline = time.time() + 400
        while not (out / "fold0" / "checkpoint" / "last.json").exists():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (out / "fold0" / "result.json").exists()
    p = subprocess.run(
        _train_cmd(labels, out, nproc=2), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    text = " ".join((p.stdout + p.stderr).split())
    assert "fold0: resuming after epoch" in text, text
    for name in ("fold0", "fold1"):
        np.testing.assert_allclose(_logits(out, name), _logits(one, name), atol=1e-4)
    rows = [(r["model"], r["epoch"]) for r in csv.DictReader((out / "log.csv").open())]
    assert len(rows) == len(set(rows)) == 9  # no epoch logged twice


def test_the_global_batch_must_split_evenly() -> None:
    assert check_batch(DistContext(world=2, rank=0), 8) == 4
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        check_batch(DistContext(world=3, rank=0), 8)
