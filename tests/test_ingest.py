"""``xraycls ingest`` end to end: manifest, labels, cache, resume, and the source left untouched."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import pkg_file
from PIL import Image
from typer.testing import CliRunner

from xraycls.cli import app
from xraycls.io.ingest import JOURNAL, ingest
from xraycls.io.manifest import MANIFEST_COLUMNS, LabelsError, read_labels
from xraycls.io.preprocess import Preprocessing


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        + str(p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A small mixed folder: class subfolders, DICOM (with and without extension), PNG, junk."""
    root = tmp_path / "src"
    (root / "NORMAL").mkdir(parents=True)
    (root / "PNEUMONIA").mkdir()
    shutil.copy(pkg_file("CT_small.dcm"), root / "NORMAL" / "ct.dcm")
    shutil.copy(pkg_file("MR_small.dcm"), root / "NORMAL" / "IM0002")  # no extension
    shutil.copy(pkg_file("RG1_UNCR.dcm"), root / "PNEUMONIA" / "chest.dcm")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(
        root / "PNEUMONIA" / "a.png"
    )
    (root / "PNEUMONIA" / "page.dcm").write_text("<!DOCTYPE html><html>not an image</html>" * 5)
    shutil.copy(pkg_file("rtplan.dcm"), root / "NORMAL" / "plan.dcm")
    (root / "README.txt").write_text("notes")
    return root


def _manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_ingest_writes_one_row_per_input_and_never_touches_source(
    src: Path, tmp_path: Path
) -> None:
    before = _tree_digest(src)
    out = tmp_path / "out"
    s = ingest(src, out, prep=Preprocessing(image_size=128), workers=2)
    rows = _manifest(out)
    assert [c for c in MANIFEST_COLUMNS if c not in rows[0]] == []
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) == {"ct.dcm", "IM0002", "chest.dcm", "a.png", "page.dcm", "plan.dcm"}
    assert (s.ok, s.error) == (4, 2)
    assert s.ignored == [str(src / "README.txt")]
    assert by_name["page.dcm"]["status"] == "error" and by_name["page.dcm"]["error"].startswith(
        "not_dicom:"
    )
    assert by_name["plan.dcm"]["error"].startswith("no_pixel_data:")
    chest = by_name["chest.dcm"]
    assert chest["label"] == "PNEUMONIA" and by_name["ct.dcm"]["label"] == "NORMAL"
    assert (chest["modality"], chest["photometric"], chest["rows"], chest["cols"]) == (
        "CR",
        "MONOCHROME1",
        "1955",
        "1841",
    )
    assert chest["patient_id"] and chest["patient_id"] not in ("", "RG1")  # pseudonymised
    cached = np.load(out / chest["cache_path"])
    assert cached.shape == (128, 128) and cached.dtype == np.uint16
    assert _tree_digest(src) == before
    assert not (out / JOURNAL).exists()


def test_rerun_skips_done_files_and_param_change_recomputes(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ingest(src, out, prep=Preprocessing(image_size=64), workers=1)
    first = _manifest(out)
    again = ingest(src, out, prep=Preprocessing(image_size=64), workers=1)
    assert again.reused == 6 and _manifest(out) == first
    # A touched file is decoded again; the others are not.
    os.utime(src / "NORMAL" / "ct.dcm", ns=(time.time_ns(), time.time_ns()))
    assert ingest(src, out, prep=Preprocessing(image_size=64), workers=1).reused == 5
    # A changed parameter must not reuse rows or cache entries made with the old one.
    bigger = ingest(src, out, prep=Preprocessing(image_size=96), workers=1)
    assert bigger.reused == 0
    rows = {r["path"]: r for r in _manifest(out)}
    old = {r["path"]: r for r in first}
    ok = [p for p, r in rows.items() if r["status"] == "ok"]
    assert all(rows[p]["cache_path"] != old[p]["cache_path"] for p in ok)
    assert all(np.load(out / rows[p]["cache_path"]).shape == (96, 96) for p in ok)


def test_resume_after_interruption(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ingest(src, out, prep=Preprocessing(image_size=64), workers=1, on_progress=stop_after_two)
    assert (out / JOURNAL).exists()
    # A kill in the middle of a write leaves a torn last line: it must be ignored.
    with (out / JOURNAL).open("a") as f:
        f.write(f"{src}/NORMAL/ct.dcm,ok,,abc")
    s = ingest(src, out, prep=Preprocessing(image_size=64), workers=1)
    assert s.reused == 2 and s.ok + s.error == 6
    rows = _manifest(out)
    assert len(rows) == len({r["path"] for r in rows}) == 6
    assert all(r["status"] == "ok" or r["error"] for r in rows)


def test_resume_after_kill_9_of_a_real_process(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "xraycls.cli",
        "ingest",
        str(shared_data / "dicom"),
        "--out",
        str(out),
        "--size",
        "64",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / JOURNAL
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not journal.exists() or journal.stat().st_size < 3000):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert journal.exists(), "ingest did not start writing its journal"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    assert "unchanged from the previous run" in done.stdout
    rows = _manifest(out)
    assert len(rows) == len({r["path"] for r in rows}) == 239


def test_labels_csv_relative_paths_and_patient_ids(src: Path, tmp_path: Path) -> None:
    labels = src.parent / "labels.csv"
    labels.write_text(
        "path,label,patient_id,subtype\n"
        "src/NORMAL/ct.dcm,NORMAL,P1,normal\n"
        "src/PNEUMONIA/chest.dcm,PNEUMONIA,P2,virus\n"
        "src/PNEUMONIA/missing.png,PNEUMONIA,P3,bacteria\n"
    )
    out = tmp_path / "out"
    s = ingest(src, out, prep=Preprocessing(image_size=32), labels=labels, workers=1)
    assert s.unlabelled_in_csv == 1
    rows = {Path(r["path"]).name: r for r in _manifest(out)}
    assert (rows["ct.dcm"]["label"], rows["ct.dcm"]["patient_id"], rows["ct.dcm"]["subtype"]) == (
        "NORMAL",
        "P1",
        "normal",
    )
    assert rows["chest.dcm"]["subtype"] == "virus"
    assert rows["a.png"]["label"] == ""  # not in the CSV: no label guessed


def test_labels_csv_errors(tmp_path: Path) -> None:
    bad = tmp_path / "l.csv"
    bad.write_text("file,label\na.png,X\n")
    with pytest.raises(LabelsError, match="no 'path' column"):
        read_labels(bad)
    bad.write_text("path,label\na.png,X\na.png,Y\n")
    with pytest.raises(LabelsError, match="repeats"):
        read_labels(bad)


def test_cli_ingest_summary_and_errors(src: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app, ["ingest", str(src), "--out", str(tmp_path / "o"), "--size", "32", "--workers", "1"]
    )
    assert res.exit_code == 0, res.output
    assert "4 ok, 2 error (1 no_pixel_data, 1 not_dicom)" in res.stdout
    res = runner.invoke(app, ["ingest", str(src), "--out", str(src / "inside")])
    assert res.exit_code == 2 and not (src / "inside").exists()


def test_cli_help_is_fast_and_imports_no_torch() -> None:
    code = "import sys, xraycls.cli; print(any(m in sys.modules for m in ('torch', 'monai', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "xraycls.cli", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - t0 < 2.0
