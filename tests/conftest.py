"""Shared fixtures: package test data (runs everywhere) and the real shared data (skips if absent)."""

from __future__ import annotations

import os
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
    import xraycls.dicom as d

    monkeypatch.setattr(d, "_SALT", None)


def pkg_file(name: str) -> str:
    """A file from pydicom's bundled test files or the pydicom-data package (no network)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"{name} missing: install the test extra (pydicom-data)")
    return str(path)
