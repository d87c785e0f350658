"""The viewer: ``xraycls.viewer`` unit tests and ``AppTest`` runs of ``app/streamlit_app.py``.

AppTest (streamlit 1.67) simulates ``st.file_uploader`` natively (``set_value`` with
``(name, bytes, mime)`` tuples), so uploads go through the same code path as in a browser.
Everything runs on the session's tiny ResNet bundle (``tiny_run``) and package DICOMs.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import pkg_file
from streamlit.testing.v1 import AppTest

from xraycls import viewer as V
from xraycls.bundle.format import INTENSITY_FILE, find_bundles, read_oof
from xraycls.bundle.summary import (
    ThresholdInfo,
    default_members,
    intensity_reference_for_run,
    summarize_run,
)
from xraycls.errors import ImageTooLargeError, NotDicomError
from xraycls.inference.analysis import (
    UploadTooLargeError,
    analyse,
    analyse_many,
    decision_text,
    decode_upload,
    explain,
    uncertainty,
    uncertainty_text,
)
from xraycls.inference.cam import overlay
from xraycls.inference.predictor import Predictor
from xraycls.inference.report import batch_row, build_report, rows_to_csv
from xraycls.io.display import default_window, display_image, to_png, window_limits
from xraycls.io.ood import (
    IntensityReference,
    build_intensity_reference,
    header_check,
    intensity_check,
)
from xraycls.io.privacy import identifying_fields, safe_header

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
PATIENT = ("CompressedSamples^RG1", "9RG1", "19400305")  # RG1_UNCI.dcm's identifiers


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _square_png(seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.normal(0.35, 0.08, (64, 64)).clip(0, 1)
    img[10:26, 20:36] = 0.95
    return _png((img * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def runs(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``a``: the tiny bundle; ``b``: its fold models without refit weights or calibration."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(tiny_run, root / "a")
    shutil.copytree(tiny_run, root / "b")
    (root / "b" / "weights.safetensors").unlink()
    (root / "b" / "calibration.json").unlink()
    return root


@pytest.fixture(scope="module")
def predictor(runs: Path) -> Predictor:
    return Predictor.from_run(runs / "a", members="folds", device="cpu")


@pytest.fixture
def rg1() -> bytes:
    return Path(pkg_file("RG1_UNCI.dcm")).read_bytes()


# --------------------------------------------------------------------------- viewer: bundles


def test_run_summary_reads_bundle(runs: Path) -> None:
    assert find_bundles(runs) == [runs / "a", runs / "b"]
    assert find_bundles(runs / "a") == [runs / "a"] and find_bundles(runs / "nope") == []
    s = summarize_run(runs / "a")
    assert s.backbone == "resnet50_test" and s.classes == ("plain", "square")
    assert s.fold_members == 2 and s.has_refit and default_members(s) == "folds"
    assert s.cv_auroc is not None and s.cv_auroc_ci is not None
    assert s.cv_auroc_ci[0] <= s.cv_auroc <= s.cv_auroc_ci[1]
    # Both servable configurations are calibrated on the holdout, each its own way.
    assert set(s.served) == {"folds", "refit"}
    folds = s.served["folds"]
    assert folds.threshold is not None and folds.threshold.describe() == "95%-sensitivity threshold"
    assert folds.threshold.sensitivity is not None  # cross-fitted, with an interval
    assert "holdout images no model of it saw" in s.served_text("folds")
    assert "95%-sensitivity" in s.served_text("folds") and "(cross-fitted)" in s.served_text(
        "folds"
    )
    b = summarize_run(runs / "b")
    assert b.served == {} and not b.has_refit
    assert "uncalibrated" in b.served_text("folds")


def test_auroc_interval_without_model_card_is_bootstrapped(runs: Path, tmp_path: Path) -> None:
    run = tmp_path / "c"
    shutil.copytree(runs / "a", run)
    metrics = json.loads((run / "metrics.json").read_text())
    stored = metrics.pop("pooled_oof_ci")["auroc"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    s = summarize_run(run)
    assert s.cv_auroc_ci is not None and s.cv_auroc_ci[0] <= s.cv_auroc <= s.cv_auroc_ci[1]
    assert s.cv_auroc_ci == pytest.approx((stored["low"], stored["high"]), abs=0.05)


# --------------------------------------------------------------------------- viewer: uploads


def test_upload_guards_name_the_file(rg1: bytes) -> None:
    with pytest.raises(UploadTooLargeError, match=r"big\.dcm: file is 2\.0 MB, over the 1 MB"):
        decode_upload("big.dcm", b"\0" * (2 * 1024**2), max_mb=1)
    with pytest.raises(ImageTooLargeError, match="RG1: header declares 1955x1841 pixels"):
        decode_upload("RG1", rg1, max_pixels=1_000_000)
    with pytest.raises(NotDicomError, match=r"page\.dcm: not a DICOM file.*HTML page"):
        decode_upload("page.dcm", b"<!DOCTYPE html><html></html>")


def test_decompression_bomb_refused_before_decoding() -> None:
    import pydicom

    ds = pydicom.dcmread(pkg_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 60000, 60000  # declares 3.6 gigapixels in a 39 kB file
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageTooLargeError, match="over the 50,000,000-pixel guard"):
        decode_upload("bomb.dcm", buf.getvalue())


def test_analyse_many_keeps_going_after_a_bad_file(predictor: Predictor, rg1: bytes) -> None:
    out = analyse_many(
        predictor,
        [("sq.png", _square_png()), ("bad.dcm", b"<html></html>"), ("RG1", rg1)],
    )
    assert [type(r).__name__ for r in out] == ["Analysis", "UploadFailure", "Analysis"]
    assert out[1].message.startswith("bad.dcm: not a DICOM file") and out[1].code == "not_dicom"
    a = out[2]
    assert a.model_input.shape == (64, 64) and a.letterbox.original_shape == (1955, 1841)
    assert a.prediction.member_probs.shape == (2, 2)
    rows = [batch_row(r, predictor.classes) for r in out]
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    text = rows_to_csv(rows)
    assert text.splitlines()[0].startswith("file,status,decision,P(plain),P(square)")
    assert "bad.dcm: not a DICOM file" in text


def test_display_window_defaults_from_header_and_monochrome1(rg1: bytes) -> None:
    raw = decode_upload("RG1", rg1)
    assert default_window(raw) == (15000.0, 30000.0)  # the header's
    lo, hi = window_limits(raw)
    assert lo <= 0 and hi >= 30000
    header = display_image(raw)
    same = display_image(raw, (15000.0, 30000.0))
    assert "MONOCHROME1 inverted" in header.meta.window_applied
    assert np.allclose(header.pixels, same.pixels, atol=1e-3)
    narrow = display_image(raw, (15000.0, 3000.0))
    assert narrow.meta.window_applied.startswith("window 15000/3000")
    assert narrow.pixels.shape == (1955, 1841) and narrow.pixels.std() > header.pixels.std()


def test_png_window_defaults_to_nominal_range() -> None:
    raw = decode_upload("sq.png", _square_png())
    assert default_window(raw) == (127.5, 255.0)
    png = to_png(display_image(raw).pixels)
    assert png.startswith(b"\x89PNG")


# --------------------------------------------------------------------------- viewer: decisions


def test_decision_and_uncertainty_texts() -> None:
    from xraycls.inference.predictor import Prediction

    t = ThresholdInfo("PNEUMONIA", "sensitivity", 0.95, 0.3)
    classes = ["NORMAL", "PNEUMONIA"]
    members = np.array([[0.5, 0.5], [0.8, 0.2]])
    p = Prediction(np.array([0.6, 0.4]), np.array([0.6, 0.4]), members, "PNEUMONIA", 0.3)
    assert decision_text(p, classes, t) == (
        "PNEUMONIA — P(PNEUMONIA) 0.400 is at or above the 95%-sensitivity threshold (0.300)"
    )
    assert "1 of 2 are at or above the threshold: the members disagree" in uncertainty_text(
        p, classes
    )
    single = Prediction(p.probs, p.raw_probs, members[:1], "PNEUMONIA", 0.3)
    assert uncertainty_text(single, classes).startswith("Single model: no ensemble spread")
    u = uncertainty(p, classes)
    assert (u[1].member_min, u[1].member_max, u[1].members) == (0.2, 0.5, 2)
    none = Prediction(p.probs, p.raw_probs, members, "NORMAL", None)
    assert "no operating threshold stored" in decision_text(none, classes, None)
    assert ThresholdInfo("P", "youden", None, 0.5).describe() == "Youden threshold"


# --------------------------------------------------------------------------- viewer: OOD


def test_intensity_check_is_a_calibrated_conformal_test() -> None:
    rng = np.random.default_rng(0)

    def image(mean: float) -> np.ndarray:
        return rng.normal(mean + rng.normal(0, 0.03), 0.12, (48, 48)).clip(0, 1)

    ref = build_intensity_reference([image(0.45) for _ in range(300)], source="test")
    same = [intensity_check(image(0.45), ref) for _ in range(300)]
    # Exchangeable with the reference: P(p <= 0.01) <= 0.01 (+ sampling noise).
    assert np.mean([c.flagged for c in same]) <= 0.03
    assert np.mean([c.p_value for c in same]) == pytest.approx(0.5, abs=0.08)
    far = intensity_check(image(0.8), ref)
    assert far.flagged and far.p_value == pytest.approx(1 / 301)
    assert "far from the training images'" in far.message()
    back = IntensityReference.from_dict(json.loads(json.dumps(ref.to_dict())))
    assert back.n == 300 and intensity_check(image(0.8), back).flagged
    with pytest.raises(ValueError, match="at least 2"):
        build_intensity_reference([image(0.4)])


def test_intensity_reference_from_the_bundle(
    runs: Path, predictor: Predictor, tmp_path: Path
) -> None:
    bare = tmp_path / "bare"  # an older bundle, without a stored reference
    shutil.copytree(runs / "a", bare)
    (bare / INTENSITY_FILE).unlink(missing_ok=True)
    ref, source = intensity_reference_for_run(bare, predictor.prep)
    n = len(read_oof(bare).paths)  # the development images (the holdout trains nothing)
    assert ref is not None and ref.n == n and f"computed from {n} of {n} training images" in source
    stored = tmp_path / "s"
    shutil.copytree(bare, stored)
    (stored / INTENSITY_FILE).write_text(json.dumps(ref.to_dict()))
    again, source = intensity_reference_for_run(stored, predictor.prep)
    assert again is not None and source.startswith("stored in the bundle")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    assert intensity_reference_for_run(lonely, predictor.prep)[0] is None


def test_header_check_flags_non_chest_dicom(rg1: bytes) -> None:
    ct = decode_upload("ct", Path(pkg_file("CT_small.dcm")).read_bytes())
    warns, _ = header_check(ct)
    assert any("Modality is CT" in w for w in warns)
    assert header_check(decode_upload("RG1", rg1)) == ([], [])
    warns, notes = header_check(decode_upload("sq.png", _square_png()))
    assert not warns and "no DICOM header" in notes[0]


def test_header_check_on_shared_non_chest_radiographs(shared_data: Path) -> None:
    tibia = shared_data / "dicom" / "other_radiographs" / "RG3_UNCR.dcm"
    warns, _ = header_check(decode_upload(tibia.name, tibia.read_bytes()))
    assert any("BodyPartExamined" in w for w in warns)


# --------------------------------------------------------------------------- viewer: privacy


def test_identifiers_only_on_request_and_never_in_the_report(
    predictor: Predictor,
    runs: Path,
    rg1: bytes,
) -> None:
    a = analyse(predictor, "RG1", rg1)
    shown = json.dumps(safe_header(a.raw))
    assert not any(x in shown for x in PATIENT) and "Patient (pseudonym)" in shown
    assert identifying_fields(rg1) == {
        "Patient name": PATIENT[0],
        "Patient ID": PATIENT[1],
        "Birth date": PATIENT[2],
    }
    assert identifying_fields(_square_png()) == {}
    report = build_report(a, summarize_run(runs / "a"), predictor)
    text = json.dumps(report, allow_nan=False)
    assert not any(x in text for x in PATIENT)
    assert report["prediction"]["decision"] in ("plain", "square")
    assert report["model"]["backbone"] == "resnet50_test" and report["model"]["n_members"] == 2
    assert report["model"]["served"] == "folds" and report["calibration"]["calibrated"]
    assert report["calibration"]["threshold"]["target"] == "sensitivity"
    # The report's threshold is the served configuration's, with its cross-fitted rates.
    assert report["calibration"]["threshold"]["threshold"] == predictor.threshold
    assert report["calibration"]["threshold"]["sensitivity"]["low"] is not None
    assert report["intended_use"].startswith("Research use only")
    assert report["generated_utc"].endswith("+00:00")


def test_explanation_overlay_on_the_original_grid(predictor: Predictor, rg1: bytes) -> None:
    a = analyse(predictor, "RG1", rg1)
    cam = explain(predictor, a, method="gradcam")
    assert cam.target == a.prediction.predicted and cam.heatmap.shape == (64, 64)
    shown = display_image(a.raw).pixels
    heat = cam.to_original(a.letterbox)
    rgb = overlay(shown, heat, alpha=0.5)
    assert rgb.shape == (1955, 1841, 3) and rgb.dtype == np.uint8
    box = V.zoom_box(shown.shape, 4, (0.0, 1.0))  # top right corner, clamped inside
    assert (box[0].start, box[0].stop, box[1].start, box[1].stop) == (0, 489, 1381, 1841)
    assert np.array_equal(overlay(shown[box], heat[box], alpha=0.5), rgb[box])
    assert V.zoom_box(shown.shape, 1) == (slice(0, 1955), slice(0, 1841))
    assert explain(predictor, a, method="eigencam", target="plain").method == "eigencam"


def test_cam_sizes() -> None:
    assert V.cam_sizes(1024, "swin_tiny") == [1024, 512, 256]
    assert V.cam_sizes(1024, "vit_base_patch16") == [1024]
    assert V.cam_sizes(224, "swin_test") == [224]
    # By default the CAM explains the prediction from the same input; smaller is labelled.
    assert V.default_cam_size(1024) == 1024
    assert "explains the prediction shown" in V.cam_size_label(1024, 1024)
    assert V.cam_size_label(512, 1024).startswith("512 px (REDUCED from the model's 1024 px")


# --------------------------------------------------------------------------- AppTest


@pytest.fixture
def app(runs: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AppTest:
    """A fresh AppTest of the viewer on ``runs``, CPU, no caches from earlier tests."""
    import streamlit as st

    monkeypatch.setenv("XRAYCLS_RUNS", str(runs))
    monkeypatch.setenv("XRAYCLS_DEVICE", "cpu")
    monkeypatch.setattr("sys.argv", ["streamlit_app.py"])
    # Privacy check: anything written through tempfile would land here.
    spool = tmp_path / "tempdir"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    st.cache_resource.clear()
    st.cache_data.clear()
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.spool = spool  # type: ignore[attr-defined]
    return at


def _captions(at: AppTest) -> list[str]:
    return [c for img in at.image for c in img.captions]


def _texts(at: AppTest) -> str:
    parts = [
        e.value
        for kind in ("markdown", "caption", "warning", "error", "info")
        for e in at.get(kind)
    ]
    parts += [
        json.dumps(t.value.to_dict() if hasattr(t.value, "to_dict") else str(t.value))
        for t in at.table
    ]
    return "\n".join(str(p) for p in parts)


def test_app_starts_with_banner_and_model_identity(app: AppTest) -> None:
    at = app.run()
    assert not at.exception
    assert at.warning[0].value.startswith("Research use only. Not a medical device")
    assert "Upload one or more radiographs" in at.info[0].value
    sidebar = "\n".join(m.value for m in at.sidebar.markdown)
    assert "`resnet50_test` at 64 px" in sidebar and "(fold models, out of fold) 0." in sidebar
    assert "**Served** fold ensemble on" in sidebar and "95%-sensitivity threshold" in sidebar
    a, b = at.selectbox(key="run").options
    assert a.startswith("a (resnet50_test, 64 px, AUROC 0.") and b.startswith("b (resnet50_test")


def test_app_png_dicom_and_bad_file(app: AppTest, rg1: bytes, runs: Path) -> None:
    before = sorted(p.name for p in (runs / "a").rglob("*"))
    at = app.run()
    at.file_uploader(key="uploads").set_value(
        [
            ("square.png", _square_png(), "image/png"),
            ("RG1_UNCI", rg1, "application/octet-stream"),  # DICOM without extension
            ("broken.dcm", b"<!DOCTYPE html><html></html>", "application/dicom"),
        ]
    ).run()
    assert not at.exception
    assert len(at.error) == 1
    assert at.error[0].value.startswith("Could not read broken.dcm: not a DICOM file")
    table = at.dataframe[0].value
    assert list(table["file"]) == ["square.png", "RG1_UNCI", "broken.dcm"]
    assert list(table["status"]) == ["ok", "ok", "error"]
    assert any(m.value.startswith("### Decision: ") for m in at.markdown)
    images = _captions(at)
    assert images[0] == "Original — nominal range — 64x64 px"
    # Served as PNG: Streamlit's "auto" format would have re-encoded them as JPEG.
    assert all(url.endswith(".png") for img in at.image for url in img.value)
    assert images[1].startswith("Grad-CAM overlay — gradcam, target ")
    labels = [b.label for b in at.get("download_button")]
    assert labels == [
        "Download batch CSV",
        "Download overlay PNG",
        "Download JSON report",
        "Download displayed image PNG",
    ]
    # The DICOM: header window, MONOCHROME1, header check passes, identifiers hidden.
    at.selectbox(key="selected").set_value(1).run()
    assert not at.exception
    captions = _captions(at)
    assert captions[0] == "Original — window 15000/30000, MONOCHROME1 inverted — 1841x1955 px"
    report = json.loads(at.json[0].value)
    assert report["image"]["file"] == "RG1_UNCI" and report["image"]["modality"] == "CR"
    assert not any(x in _texts(at) for x in PATIENT)
    # Reveal on request.
    at.checkbox(key="reveal").check().run()
    assert all(x in _texts(at) for x in PATIENT)
    # Nothing written: no temp files, the bundle unchanged.
    assert list(at.spool.iterdir()) == []
    assert sorted(p.name for p in (runs / "a").rglob("*")) == before


def test_app_bundle_without_weights_is_a_message(app: AppTest, runs: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken_runs" / "c"
    shutil.copytree(runs / "a", broken, ignore=shutil.ignore_patterns("*.safetensors"))
    app.run()
    app.sidebar.text_input[0].set_value(str(broken.parent)).run()
    assert not app.exception
    assert app.error[0].value.startswith(f"The bundle {broken} has no weights")


def test_app_non_chest_dicom_warns(app: AppTest) -> None:
    at = app.run()
    ct = Path(pkg_file("CT_small.dcm")).read_bytes()
    at.file_uploader(key="uploads").set_value(("ct.dcm", ct, "application/dicom")).run()
    assert not at.exception
    warnings = [w.value for w in at.warning]
    assert any("Not a radiograph by its header: Modality is CT" in w for w in warnings)


def test_app_upload_size_cap(app: AppTest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XRAYCLS_MAX_UPLOAD_MB", "1")
    at = app.run()
    at.file_uploader(key="uploads").set_value(
        [
            ("huge.dcm", b"\0" * (3 * 1024**2), "application/dicom"),
            ("ok.png", _square_png(), "image/png"),
        ]
    ).run()
    assert not at.exception
    assert (
        at.error[0].value == "Could not read huge.dcm: file is 3.0 MB, over the 1 MB per-file limit"
    )
    assert list(at.dataframe[0].value["status"]) == ["error", "ok"]


def test_app_controls_and_model_switch_without_reloading(
    app: AppTest,
    rg1: bytes,
    runs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loads: list[str] = []
    original = Predictor.from_run.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Predictor], run_dir: str | Path, **kw: Any) -> Predictor:
        loads.append(f"{Path(run_dir).name}:{kw.get('members')}")
        return original(cls, run_dir, **kw)

    monkeypatch.setattr(Predictor, "from_run", classmethod(counting))
    at = app.run()
    at.file_uploader(key="uploads").set_value(("RG1_UNCI.dcm", rg1, "application/dicom")).run()
    assert loads == ["a:folds"]
    key = next(s.key for s in at.slider if s.key.startswith("level::"))
    at.slider(key=key).set_value(20000.0).run()
    assert _captions(at)[0].startswith("Original — window 20000/30000")
    zoom = next(s.key for s in at.select_slider if s.key.startswith("zoom::"))
    at.select_slider(key=zoom).set_value(4).run()
    cx = next(s.key for s in at.slider if s.key.startswith("cx::"))
    at.slider(key=cx).set_value(0.2).run()
    assert _captions(at)[0].endswith("— zoom 4x of 1841x1955 px")
    at.selectbox(key="cam_method").set_value("eigencam").run()
    at.selectbox(key="cam_target").set_value("plain").run()
    at.slider(key="cam_alpha").set_value(0.8).run()
    assert not at.exception
    overlay = _captions(at)[1]
    assert overlay == "Grad-CAM overlay — eigencam, target plain"
    assert json.loads(at.json[0].value)["explanation"]["alpha"] == 0.8
    assert loads == ["a:folds"]  # eight reruns, one load
    # The other bundle and back: no reload (the cache holds two models); then refit members.
    at.selectbox(key="run").set_value(str(runs / "b")).run()
    assert not at.exception
    assert any("no operating threshold stored" in m.value for m in at.markdown)
    at.selectbox(key="run").set_value(str(runs / "a")).run()
    assert loads == ["a:folds", "b:folds"]
    at.radio(key=f"members::{runs / 'a'}").set_value("refit").run()
    assert "Single model: no ensemble spread" in _texts(at)
    assert loads == ["a:folds", "b:folds", "a:refit"]
    assert not at.exception


def test_cli_app_command_builds_the_streamlit_line(
    monkeypatch: pytest.MonkeyPatch, runs: Path
) -> None:
    from typer.testing import CliRunner

    from xraycls.cli import app as cli

    seen: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda exe, argv: seen.append(argv))
    result = CliRunner().invoke(cli, ["app", "--runs", str(runs), "--port", "8765"])
    assert result.exit_code == 0, result.output
    argv = seen[0]
    assert argv[1:4] == ["-m", "streamlit", "run"] and argv[4] == str(APP)
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert argv[argv.index("--browser.gatherUsageStats") + 1] == "false"
    assert argv[argv.index("--runs") + 1] == str(runs.resolve())
    missing = CliRunner().invoke(cli, ["app", "--script", str(runs / "nope.py")])
    assert missing.exit_code == 2 and "viewer script not found" in missing.output


def test_train_stores_the_intensity_reference_the_viewer_reads(tiny_run: Path) -> None:
    stored = json.loads((tiny_run / INTENSITY_FILE).read_text())
    predictor = Predictor.from_run(tiny_run)
    ref, where = intensity_reference_for_run(tiny_run, predictor.prep)
    assert ref is not None and where.startswith("stored in the bundle")
    assert (
        ref.n == len(stored["distances"]) == len(read_oof(tiny_run).paths)
    )  # every training image


def test_png_export_is_lossless_and_keeps_colour_order() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    back = np.asarray(Image.open(io.BytesIO(to_png(rgb))))
    np.testing.assert_array_equal(back, rgb)
    gray = rng.random((20, 30)).astype(np.float32)
    assert np.asarray(Image.open(io.BytesIO(to_png(gray)))).shape == (20, 30)
