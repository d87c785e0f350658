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
