"""The real DICOM corpus in ../shared/data/dicom (skipped where it is absent)."""

from __future__ import annotations

import csv
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest

from xraycls.errors import ImageReadError, NotDicomError
from xraycls.io.read import iter_image_files, read_image

PER_FILE_SECONDS = 30


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def test_every_file_is_an_image_or_a_specific_error_and_none_hangs(shared_data: Path) -> None:
    root = shared_data / "dicom"
    with (root / "inventory.csv").open(newline="") as f:
        inventory = {r["file"]: r for r in csv.DictReader(f)}
    files = list(iter_image_files(root))
    assert {str(p.relative_to(root)) for p in files} == set(inventory)  # 239, docs ignored

    old = signal.signal(signal.SIGALRM, _alarm)
    outcomes: dict[str, str] = {}
    try:
        for p in files:
            rel = str(p.relative_to(root))
            signal.alarm(PER_FILE_SECONDS)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    img = read_image(p)
                assert img.pixels.ndim == 2 and img.pixels.dtype == np.float32, rel
                assert float(img.pixels.min()) >= 0.0 and float(img.pixels.max()) <= 1.0, rel
                outcomes[rel] = "ok"
            except ImageReadError as e:
                assert rel in str(e) or str(p) in str(e), f"error does not name the file: {e}"
                assert e.code not in ("unreadable", "dicom_error") or len(e.reason) > 20, rel
                outcomes[rel] = e.code
            except _Timeout:
                pytest.fail(f"{rel}: took over {PER_FILE_SECONDS} s")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)

    # Everything the inventory decoded with the pylibjpeg plugins, we render.
    should_decode = [f for f, r in inventory.items() if r["decode"].startswith("ok")]
    assert [f for f in should_decode if outcomes[f] != "ok"] == []
    assert sum(v == "ok" for v in outcomes.values()) >= len(should_decode)
    # Chest radiographs are all readable.
    assert all(outcomes[f] == "ok" for f in inventory if f.startswith("chest_cr/"))


def test_siim_fake_monochrome1_is_the_inverse_of_the_original(shared_data: Path) -> None:
    chest = shared_data / "dicom" / "chest_cr"
    original = read_image(next(chest.glob("siim_1.*.dcm")))
    fake = read_image(chest / "siim_fake_MONOCHROME1.dcm")
    assert original.meta.photometric == "MONOCHROME2" and fake.meta.photometric == "MONOCHROME1"
    assert np.allclose(fake.pixels, 1.0 - original.pixels, atol=1e-6)


def test_html_saved_as_dcm_is_rejected(shared_data: Path) -> None:
    path = shared_data / "dicom" / "not_dicom" / "udacity_test1_actually_html.dcm"
    with pytest.raises(NotDicomError, match="HTML page"):
        read_image(path)


def test_jpeg_extended_12_bit_decodes(shared_data: Path) -> None:
    img = read_image(shared_data / "dicom" / "pydicom_testfiles" / "JPGExtended.dcm")
    assert img.pixels.shape == (1024, 256) and img.pixels.std() > 0.01
