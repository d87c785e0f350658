"""Shared fixtures: package test data (runs everywhere) and the real shared data (skips if absent)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$XRAYCLS_SHARED_DATA`` or ``../shared/data`` beside the repository."""
    return Path(os.environ.get("XRAYCLS_SHARED_DATA") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if not (root / "dicom").is_dir():
        pytest.skip(f"real shared data not found at {root} (set XRAYCLS_SHARED_DATA)")
    return root


@pytest.fixture(autouse=True)
def _fixed_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests must not create a salt file in the user's home.
    monkeypatch.setenv("XRAYCLS_SALT", "test-salt")
    import xraycls.io.dicom as d

    monkeypatch.setattr(d, "_SALT", None)


@pytest.fixture(autouse=True)
def _restore_main_module() -> Iterator[None]:
    # Streamlit's AppTest installs the app script as sys.modules["__main__"] and leaves it
    # there; a later test that spawns worker processes (DataLoader, Ray) would then re-run the
    # app script in every child. Put the real __main__ back after each test.
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


def pkg_file(name: str) -> str:
    """A file from pydicom's bundled test files or the pydicom-data package (no network)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"{name} missing: install the test extra (pydicom-data)")
    return str(path)


def write_square_dataset(root: Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """A synthetic labelled PNG set (no shared data needed): class ``square`` has a bright square.

    Returns the labels CSV (``path,label,patient_id``; one patient per image).
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,patient_id"]
    for i in range(n):
        img = rng.normal(0.35, 0.08, (size, size)).clip(0, 1)
        label = "square" if i % 2 else "plain"
        if label == "square":
            s = size // 4
            y, x = rng.integers(0, size - s, 2)
            img[y : y + s, x : x + s] = 0.95
        Image.fromarray((img * 255).astype(np.uint8)).save(root / f"img{i:03d}.png")
        rows.append(f"img{i:03d}.png,{label},p{i:03d}")
    csv_path = root / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run bundle (2 folds + refit, calibration, threshold) of a tiny ResNet on
    synthetic PNGs, trained in seconds: for scoring, CAM and viewer tests that run everywhere."""
    from xraycls.training.config import load_config
    from xraycls.training.crossval import run_training

    labels = write_square_dataset(tmp_path_factory.mktemp("squares"))
    cfg = load_config(
        REPO / "configs" / "smoke.yaml",
        [
            f"data.labels={labels}",
            "model.name=resnet50_test",
            "data.limit=null",
            "cv.refit=true",
            "augment.enabled=false",
        ],
    )
    out = tmp_path_factory.mktemp("tiny_run")
    run_training(cfg, out, log=lambda m: None)
    return out


FINDINGS = ["Square", "Disc", "Bar"]
"""The synthetic multi-label set's findings (:func:`write_findings_dataset`)."""


def write_findings_dataset(root: Path, n: int = 72, seed: int = 0) -> Path:
    """A synthetic multi-label PNG set: each finding is a shape an image carries or not,
    independently (``Square`` a bright square in the upper half, ``Disc`` a bright disc in the
    lower half, ``Bar`` a dark horizontal bar). Columns ``path,patient_id,finding_labels``
    (pipe-separated, ``No Finding`` for none) and one 0/1 column per finding, with a few blank
    (unknown) and -1 (uncertain) cells. Patients own two images each."""
    import csv

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    size, s = 64, 16
    rows = []
    for i in range(n):
        present = {f for f in FINDINGS if rng.random() < 0.4}
        img = rng.normal(0.4, 0.06, (size, size)).clip(0, 1)
        if "Square" in present:
            y, x = rng.integers(2, size // 2 - s, 2)
            img[y : y + s, x : x + s] = 0.95
        if "Disc" in present:
            cy, cx = rng.integers(size // 2 + s // 2, size - s // 2 - 2, 2)
            yy, xx = np.ogrid[:size, :size]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (s // 2) ** 2] = 0.9
        if "Bar" in present:
            y = int(rng.integers(2, size - 6))
            img[y : y + 4, 4 : size - 4] = 0.02
        Image.fromarray((img * 255).astype(np.uint8)).save(root / f"img{i:03d}.png")
        cells = {f: "1" if f in present else "0" for f in FINDINGS}
        if i % 17 == 5:
            cells["Bar"] = ""  # unknown
        if i % 23 == 7:
            cells["Disc"] = "-1"  # uncertain, as in CheXpert
        rows.append(
            {
                "path": f"img{i:03d}.png",
                "patient_id": f"p{i // 2:03d}",
                "finding_labels": "|".join(f for f in FINDINGS if f in present) or "No Finding",
                **cells,
            }
        )
    path = root / "labels.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def multilabel_overrides(labels: Path) -> list[str]:
    """``configs/smoke.yaml`` overrides for a tiny multi-label run on ``labels``."""
    return [
        f"data.labels={labels}",
        "data.task=multilabel",
        f"data.label_columns=[{', '.join(FINDINGS)}]",
        "data.limit=null",
        "data.age_range=null",
        "model.name=resnet50_test",
        "augment.enabled=false",
        "cv.calibration_holdout=0.25",
        "train.stages=[{epochs: 2, train: all, lr: 3.0e-3}]",
    ]


@pytest.fixture(scope="session")
def tiny_multilabel_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete multi-label bundle (2 folds, per-finding calibration and thresholds) of a tiny
    ResNet on the synthetic findings set, trained in seconds."""
    from xraycls.training.config import load_config
    from xraycls.training.crossval import run_training

    labels = write_findings_dataset(tmp_path_factory.mktemp("findings"))
    cfg = load_config(
        REPO / "configs" / "smoke.yaml", [*multilabel_overrides(labels), "train.pos_weight=auto"]
    )
    out = tmp_path_factory.mktemp("tiny_multilabel_run")
    run_training(cfg, out, log=lambda m: None)
    return out
