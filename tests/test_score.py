"""``xraycls predict``: streaming batch scoring into a resumable, kill-safe results CSV."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import pkg_file, write_square_dataset
from PIL import Image

from xraycls.inference.predictor import Predictor
from xraycls.inference.results import settings_path
from xraycls.inference.rows import ScoreError, result_columns
from xraycls.inference.scoring import collect_inputs, score
from xraycls.io.read import iter_image_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predictor(tiny_run: Path) -> Predictor:
    return Predictor.from_run(tiny_run, device="cpu")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """Synthetic PNGs (two with the same name in different folders), two small DICOMs (one
    without extension), two broken files and a README that is not an input."""
    root = tmp_path / "src"
    write_square_dataset(root / "pngs", n=6)
    (root / "pngs" / "labels.csv").unlink()
    for sub in ("a", "b"):
        (root / sub).mkdir()
        shutil.copy(root / "pngs" / "img001.png", root / sub / "x.png")
    (root / "dcm").mkdir()
    shutil.copy(pkg_file("CT_small.dcm"), root / "dcm" / "ct.dcm")
    shutil.copy(pkg_file("MR_small.dcm"), root / "dcm" / "IM0002")
    (root / "bad").mkdir()
    (root / "bad" / "page.dcm").write_text("<!DOCTYPE html><html>not an image</html>" * 5)
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "README.txt").write_text("notes")
    return root


def _read(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    with out.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _probs(rows: list[dict[str, str]], classes: list[str]) -> dict[str, np.ndarray]:
    return {
        r["path"]: np.array([float(r[f"prob_{c}"]) for c in classes])
        for r in rows
        if r["status"] == "ok"
    }


def test_one_row_per_file_errors_do_not_stop_and_probs_match_predict_files(
    src: Path, tmp_path: Path, predictor: Predictor
) -> None:
    out = tmp_path / "res" / "results.csv"
    s = score(src, out, run=predictor, workers=0, batch_size=3, parquet=True)
    header, rows = _read(out)
    assert header == result_columns(predictor.classes)
    assert header[:4] == ["path", "status", "error", "sop_instance_uid"]
    files = list(iter_image_files(src))
    assert [r["path"] for r in rows] == [str(p) for p in files]  # input order, each once
    assert (s.ok, s.error, s.skipped) == (10, 2, 0)
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["page.dcm"]["status"] == "error"
    assert by_name["page.dcm"]["error_code"] == "not_dicom"
    assert by_name["page.dcm"]["error"].startswith("not_dicom: not a DICOM file")
    assert by_name["empty.png"]["error"] and by_name["empty.png"]["prob_square"] == ""
    assert by_name["ct.dcm"]["sop_instance_uid"].startswith("1.3.6.1.4.1.5962")
    for r in rows:
        assert r["status"] in ("ok", "error")
        assert float(r["seconds"]) >= 0 and r["size_bytes"] and r["mtime_ns"]
        if r["status"] == "ok":
            assert r["error"] == "" and float(r["threshold"]) == pytest.approx(predictor.threshold)
            assert r["predicted"] in predictor.classes
    expected = predictor.predict_files(files)
    got = _probs(rows, predictor.classes)
    for p, e in zip(files, expected, strict=True):
        if isinstance(e, Exception):
            assert str(p) not in got
        else:
            np.testing.assert_allclose(got[str(p)], e.probs, atol=1e-7)
            assert by_name[p.name]["predicted"] == e.predicted
    assert "10 ok, 2 error (1 not_dicom, 1 " in s.line() and "images/s" in s.line()

    import pyarrow.parquet as pq

    table = pq.read_table(out.with_suffix(".parquet"))
    assert table.num_rows == 12 and table.schema.field("prob_square").type == "double"
    assert table.column("prob_square").null_count == 2


def test_workers_0_and_2_give_identical_rows(
    src: Path, tmp_path: Path, predictor: Predictor
) -> None:
    score(src, tmp_path / "w0.csv", run=predictor, workers=0, batch_size=4)
    score(src, tmp_path / "w2.csv", run=predictor, workers=2, batch_size=4)
    drop = ("seconds",)
    rows0 = [{k: v for k, v in r.items() if k not in drop} for r in _read(tmp_path / "w0.csv")[1]]
    rows2 = [{k: v for k, v in r.items() if k not in drop} for r in _read(tmp_path / "w2.csv")[1]]
    assert rows0 == rows2


def _counting(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = predictor.predict

    def counted(pixels: list[np.ndarray]) -> list:
        calls.append(len(pixels))
        return original(pixels)

    monkeypatch.setattr(predictor, "predict", counted)
    return calls


def test_resume_skips_scored_files_and_rescoring_a_changed_file_replaces_its_row(
    src: Path, tmp_path: Path, predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "results.csv"
    score(src, out, run=predictor, workers=0, batch_size=4)
    _, first = _read(out)
    calls = _counting(predictor, monkeypatch)
    again = score(src, out, run=predictor, workers=0, batch_size=4)
    assert (again.skipped, again.ok, again.error, calls) == (12, 0, 0, [])
    assert _read(out)[1] == first

    changed = src / "pngs" / "img002.png"
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(changed)
    new = src / "pngs" / "zz_new.png"
    shutil.copy(src / "pngs" / "img003.png", new)
    (src / "a" / "x.png").unlink()  # gone from the input: its row goes too
    third = score(src, out, run=predictor, workers=0, batch_size=4)
    assert (third.skipped, third.ok, sum(calls)) == (10, 2, 2)
    _, rows = _read(out)
    assert [r["path"] for r in rows] == [str(p) for p in iter_image_files(src)]
    old = {r["path"]: r for r in first}
    row = next(r for r in rows if r["path"] == str(changed))
    assert row["prob_square"] != old[str(changed)]["prob_square"]


def test_torn_last_line_is_cut_and_that_file_rescored(
    src: Path, tmp_path: Path, predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "results.csv"
    score(src, out, run=predictor, workers=0, batch_size=4)
    _, complete = _read(out)
    data = out.read_bytes()
    # A kill inside the last record's write: its tail (the mtime, and the newline) is missing.
    out.write_bytes(data[: data.rstrip(b"\r\n").rfind(b",") - 3])
    last = complete[-1]
    calls = _counting(predictor, monkeypatch)
    s = score(src, out, run=predictor, workers=0, batch_size=4)
    assert s.skipped == 11 and s.ok + s.error == 1
    assert calls == ([] if last["status"] == "error" else [1])
    header, rows = _read(out)
    assert len(rows) == 12 and all(None not in r and len(r) == len(header) for r in rows)
    assert [r["path"] for r in rows] == [r["path"] for r in complete]
    assert out.read_bytes().endswith(b"\r\n")


def test_a_model_failure_costs_its_batch_and_is_retried_on_resume(
    src: Path, tmp_path: Path, predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    original, calls = predictor.predict, []

    def flaky(pixels: list[np.ndarray]) -> list:
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(pixels)

    monkeypatch.setattr(predictor, "predict", flaky)
    out = tmp_path / "results.csv"
    s = score(src, out, run=predictor, workers=0, batch_size=4)
    failed = [r for r in _read(out)[1] if r["error_code"] == "internal_error"]
    assert len(failed) == calls[1] == s.errors_by_code["internal_error"] == 4
    assert failed[0]["status"] == "error" and "out of memory (simulated)" in failed[0]["error"]
    again = score(src, out, run=predictor, workers=0, batch_size=4)
    assert (again.ok, again.skipped) == (4, 8)
    assert all(r["error_code"] != "internal_error" for r in _read(out)[1])


def test_kill_9_of_a_real_process_then_resume_scores_every_file_exactly_once(
    tmp_path: Path, tiny_run: Path, predictor: Predictor
) -> None:
    src = tmp_path / "src"
    write_square_dataset(src, n=40)
    out = tmp_path / "results.csv"
    # The child is the real CLI, with each model batch slowed down so the kill lands mid-run.
    child = textwrap.dedent(
        f"""
        import sys, time
        from xraycls.inference.predictor import Predictor
        slow = Predictor.predict
        Predictor.predict = lambda self, px: (time.sleep(0.3), slow(self, px))[1]
        sys.argv = ["xraycls", "predict", {str(src)!r}, "--run", {str(tiny_run)!r},
                    "--out", {str(out)!r}, "--batch-size", "2", "--workers", "1"]
        from xraycls.cli import main
        main()
        """
    )
    env = os.environ | {"XRAYCLS_SALT": "test-salt"}
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 7:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"predict ended before the kill: {proc.stderr.read().decode()}"
    proc.kill()
    proc.wait()
    proc.stderr.close()
    _, partial = _read(out)
    assert 6 <= len(partial) < 40

    s = score(src, out, run=predictor, workers=0, batch_size=8)
    assert s.skipped >= 6 and s.skipped + s.ok + s.error == 40
    header, rows = _read(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in iter_image_files(src))
    assert len({r["path"] for r in rows}) == 40
    assert all(r["status"] == "ok" and len(r) == len(header) for r in rows)
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in predictor.classes) - 1) < 1e-5 for r in rows)


def test_manifest_csv_input_resolves_paths_against_the_csv_folder(
    tmp_path: Path, predictor: Predictor
) -> None:
    labels = write_square_dataset(tmp_path / "data", n=4)
    inputs = collect_inputs(labels)
    assert inputs.root == labels.parent
    s = score(labels, tmp_path / "r.csv", run=predictor, workers=0)
    _, rows = _read(tmp_path / "r.csv")
    assert s.ok == 4
    assert [r["path"] for r in rows] == [str(labels.parent / f"img{i:03d}.png") for i in range(4)]


def test_settings_mismatch_and_bad_inputs_are_clear_errors(
    src: Path, tmp_path: Path, predictor: Predictor
) -> None:
    out = tmp_path / "results.csv"
    score(src / "pngs", out, run=predictor, workers=0)
    assert settings_path(out).exists()
    with pytest.raises(ScoreError, match=r"other settings \(input differ\)"):
        score(src, out, run=predictor, workers=0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        score(tmp_path / "missing", tmp_path / "x.csv", run=predictor)
    with pytest.raises(ScoreError, match="lies inside the input"):
        score(src, tmp_path / "y.csv", run=predictor, cam_dir=src / "cams")
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(ScoreError, match="not written by xraycls predict"):
        score(src, foreign, run=predictor)


def test_cli_exit_codes_and_summary(src: Path, tmp_path: Path, tiny_run: Path) -> None:
    from typer.testing import CliRunner

    from xraycls.cli import app

    runner = CliRunner()
    out = tmp_path / "r.csv"
    args = ["predict", str(src), "--run", str(tiny_run), "--out", str(out), "--workers", "0"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output  # per-file errors do not fail the run
    assert "10 ok, 2 error" in res.stderr and out.exists()
    res = runner.invoke(app, ["predict", str(src), "--run", str(tmp_path), "--out", str(out)])
    assert res.exit_code == 2 and "not a complete run bundle" in res.stderr
    res = runner.invoke(
        app, ["predict", str(tmp_path / "nope"), "--run", str(tiny_run), "--out", str(out)]
    )
    assert res.exit_code == 2 and "no such file" in res.stderr


def test_cam_pngs_and_dicom_secondary_captures(
    src: Path, tmp_path: Path, predictor: Predictor
) -> None:
    pytest.importorskip(
        "xraycls.inference.cam", reason="xraycls.inference.cam (CAM module) is not available"
    )
    import pydicom

    cams, dcm = tmp_path / "cams", tmp_path / "dcm"
    s = score(src, tmp_path / "r.csv", run=predictor, workers=0, cam_dir=cams, dicom_out=dcm)
    assert s.cam_failed == 0
    _, rows = _read(tmp_path / "r.csv")
    by_rel = {str(Path(r["path"]).relative_to(src)): r for r in rows}
    for rel, r in by_rel.items():
        if r["status"] != "ok":
            assert r["cam_path"] == ""
            continue
        assert r["cam_path"] == str(cams / f"{rel}.png")
        img = Image.open(r["cam_path"])
        original = Image.open(r["path"]).size if rel.endswith(".png") else None
        assert img.mode == "RGB" and (original is None or img.size == original)
    assert by_rel["a/x.png"]["cam_path"] != by_rel["b/x.png"]["cam_path"]
    assert by_rel["pngs/img000.png"]["dicom_path"] == ""  # PNG input: no DICOM
    from xraycls.io.dicom_results import read_sr_findings

    row = by_rel["dcm/ct.dcm"]
    sr = pydicom.dcmread(row["dicom_path"])
    ct = pydicom.dcmread(row["dicom_path"].removesuffix(".sr.dcm") + ".cam.dcm")
    source = pydicom.dcmread(src / "dcm" / "ct.dcm")
    assert ct.StudyInstanceUID == sr.StudyInstanceUID == source.StudyInstanceUID
    assert (ct.Rows, ct.Columns, ct.SamplesPerPixel) == (source.Rows, source.Columns, 3)
    assert ct.BurnedInAnnotation == "YES" and "research use" in ct.SeriesDescription.lower()
    found = read_sr_findings(sr)
    for c in predictor.classes:
        assert found[c][0] == pytest.approx(float(row[f"prob_{c}"]), abs=1e-6)
        assert found[c][1] == (row["predicted"] == c)
    assert Path(by_rel["dcm/IM0002"]["dicom_path"]).name == "IM0002.sr.dcm"


def test_shared_dicom_corpus_lists_every_file_and_scores_every_chest_file(
    shared_data: Path, tmp_path: Path, predictor: Predictor
) -> None:
    root = shared_data / "dicom"
    with (root / "inventory.csv").open(newline="") as f:
        inventory = {r["file"]: r for r in csv.DictReader(f)}
    out = tmp_path / "results.csv"
    s = score(root, out, run=predictor, workers=2, batch_size=16)
    _, rows = _read(out)
    by_rel = {str(Path(r["path"]).relative_to(root.resolve())): r for r in rows}
    assert len(rows) == len(by_rel) == len(inventory) and set(by_rel) == set(inventory)
    assert all(by_rel[f]["status"] == "ok" for f in inventory if f.startswith("chest_cr/"))
    should_decode = [f for f, r in inventory.items() if r["decode"].startswith("ok")]
    assert [f for f in should_decode if by_rel[f]["status"] != "ok"] == []
    assert all(r["error"] and r["error_code"] for r in rows if r["status"] == "error")
    assert s.ok + s.error == len(inventory)


def test_awkward_file_names_are_scored_and_resumed(tmp_path: Path, predictor: Predictor) -> None:
    """A Latin-1 name (not UTF-8: os.walk yields surrogates) and a name with a line break are
    scored, written, resumed and exported to Parquet; output names stay single-line."""
    pytest.importorskip("pyarrow")
    root = tmp_path / "src"
    write_square_dataset(root, n=2)
    (root / "labels.csv").unlink()
    latin1 = os.fsdecode(b"M\xfcller.png")  # surrogate-escaped, as os.walk returns it
    os.rename(root / "img000.png", root / latin1)
    os.rename(root / "img001.png", root / "two\nlines.png")
    out, cams = tmp_path / "r.csv", tmp_path / "cams"
    s = score(root, out, run=predictor, workers=0, cam_dir=cams, parquet=True)
    assert (s.ok, s.error) == (2, 0)
    raw = out.read_bytes()
    assert b"M\xfcller.png" in raw  # the file system's bytes, round-tripped
    assert sorted(p.name for p in cams.iterdir()) == sorted([f"{latin1}.png", "two_lines.png.png"])
    again = score(root, out, run=predictor, workers=0, cam_dir=cams, parquet=True)
    assert (again.ok, again.skipped) == (0, 2)
    import pyarrow.parquet as pq

    assert pq.read_table(out.with_suffix(".parquet")).num_rows == 2
