"""xraycls viewer: upload radiographs, see calibrated predictions and Grad-CAM overlays.

Start it with ``xraycls app --runs RUNS_DIR`` (or ``streamlit run app/streamlit_app.py -- --runs
RUNS_DIR``). This script only lays out widgets; every number comes from ``xraycls`` (the
``Predictor`` of a run bundle, ``dicom.render``, ``cam.explain_pixels``/``overlay``) through
:mod:`xraycls.viewer`.

Caching: the loaded model is a ``st.cache_resource`` keyed by the bundle path, its members and
its files' modification times, so reruns (every slider move) never reload or duplicate it.
Per-upload results (decoded image, prediction, checks, heatmaps) live in this browser session's
``st.session_state`` only, keyed by the file's SHA-256, and are dropped when the file is removed:
one user's images are never served to another, and nothing is written to disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import streamlit as st

from xraycls import viewer as V
from xraycls.bundle.format import Bundle, find_bundles
from xraycls.bundle.summary import (
    RunSummary,
    ci_text,
    default_members,
    intensity_reference_for_run,
    summarize_run,
    threshold_info,
)
from xraycls.inference.analysis import (
    DEFAULT_MAX_UPLOAD_MB,
    Analysis,
    UploadFailure,
    analyse_many,
    decision_text,
    explain,
    findings_table,
    uncertainty,
    uncertainty_text,
)
from xraycls.inference.cam import overlay
from xraycls.inference.report import INTENDED_USE, batch_row, build_report, rows_to_csv
from xraycls.io.display import default_window, display_image, to_png, window_limits
from xraycls.io.privacy import identifying_fields, safe_header


def _args() -> argparse.Namespace:
    """Options after ``--`` on the ``streamlit run`` line; environment variables otherwise."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--runs", default=os.environ.get("XRAYCLS_RUNS", "runs"))
    p.add_argument("--device", default=os.environ.get("XRAYCLS_DEVICE", "auto"))
    p.add_argument("--threads", type=int, default=int(os.environ.get("XRAYCLS_THREADS", 0)))
    p.add_argument(
        "--max-upload-mb",
        type=int,
        default=int(os.environ.get("XRAYCLS_MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB)),
    )
    return p.parse_known_args(sys.argv[1:])[0]


# --------------------------------------------------------------------------- cached resources


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def load_predictor(
    run: str, members: str, calibration: str, device: str, stamp: str, backend: str = "torch"
) -> Any:
    """The bundle's Predictor, loaded once per (bundle, members, calibration, device, times,
    backend). With the onnx backend the stamp includes the export's modification time.

    Warmed up here, behind the loading spinner, so that the first upload does not pay for
    one-time costs: importing pytorch-grad-cam (~4 s), the first forward and the first CAM
    (at the default CAM size; ~1 s even for the tiny demo model).
    """
    import numpy as np

    from xraycls.inference.cam import explain_pixels
    from xraycls.inference.predictor import Predictor

    predictor = Predictor.from_run(
        run,
        members=members,  # type: ignore[arg-type]
        calibration=None if calibration == "default" else calibration,
        device=device,
        backend=backend,  # type: ignore[arg-type]
    )
    size = predictor.prep.image_size
    blank = [np.zeros((size, size), np.float32)]
    predictor.predict(blank)
    explain_pixels(predictor, blank, target=0)
    return predictor


@st.cache_resource(show_spinner=False)
def set_threads(n: int) -> int:
    """Torch's intra-op threads for this server process (0: torch's default, one per core).
    On a CPU shared with other jobs, 1 avoids OpenMP threads spinning against them."""
    import torch

    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


@st.cache_data(max_entries=32, show_spinner=False)
def run_summary(run: str, stamp: str) -> RunSummary:
    """Identity, AUROC with interval and calibration of a bundle."""
    return summarize_run(run)


@st.cache_resource(max_entries=4, show_spinner="Summarising the training images' intensities…")
def intensity_reference(run: str, stamp: str, _prep: Any) -> tuple[Any, str]:
    """The bundle's intensity reference for the out-of-distribution check (see viewer.py)."""
    return intensity_reference_for_run(run, _prep)


def _session_cache(name: str) -> dict[Any, Any]:
    if name not in st.session_state:
        st.session_state[name] = {}
    return st.session_state[name]


def _memo(name: str, key: tuple[Any, ...], compute: Any, *, keep: int = 6) -> Any:
    """``compute()`` once per key in this session (the last ``keep`` keys are kept): a slider
    move re-renders only what it changes."""
    cache = _session_cache(name)
    if key not in cache:
        cache[key] = compute()
        for k in list(cache)[:-keep]:
            del cache[k]
    return cache[key]


# --------------------------------------------------------------------------- sidebar


def pick_model(args: argparse.Namespace) -> tuple[RunSummary, str, str]:
    """Runs folder, bundle, served configuration and calibration; shows what was validated."""
    st.sidebar.header("Model")
    root = st.sidebar.text_input("Runs folder", value=args.runs, help="Searched for run bundles.")
    runs = find_bundles(root)
    summaries: dict[str, RunSummary] = {}
    for run in runs:
        try:
            summaries[str(run)] = run_summary(str(run), Bundle.read(run).stamp())
        except ValueError as e:
            st.sidebar.warning(f"Skipped {run}: {e}")
    if not summaries:
        st.error(
            f"No run bundle found under '{root}'. Train one with `xraycls train --config ...` "
            "or point 'Runs folder' at a folder that holds one."
        )
        st.stop()
    choice = st.sidebar.selectbox(
        "Run bundle", list(summaries), format_func=lambda r: summaries[r].label(), key="run"
    )
    s = summaries[choice]
    options = (["folds"] if s.fold_members else []) + (["refit"] if s.has_refit else [])
    if not options:
        st.error(f"The bundle {s.path} has no weights: neither fold*/ nor weights.safetensors.")
        st.stop()
    labels = {
        "folds": f"fold ensemble ({s.fold_members} models: shows their spread)",
        "refit": "refit model (one model, fastest, no spread)",
    }
    default = default_members(s)
    members = st.sidebar.radio(
        "Members",
        options,
        index=options.index(default) if default in options else 0,
        format_func=labels.__getitem__,
        key=f"members::{choice}",
    )
    calibrations = ["default", *s.site_calibrations]
    calibration = st.sidebar.selectbox(
        "Calibration",
        calibrations,
        format_func=lambda c: "the bundle's (its holdout)" if c == "default" else f"site: {c}",
        key=f"calibration::{choice}",
        help="A site calibration is refitted on a hospital's own labelled images "
        "(`xraycls calibrate RUN --on CSV --name SITE`).",
    )
    lines = [
        f"**Backbone** `{s.backbone}` at {s.image_size} px",
        f"**Data** `{s.data}`"
        + (f" ({s.n_images} images, {s.n_patients} patients)" if s.n_images else ""),
        f"**Cross-validation AUROC** (fold models, out of fold) {s.cv_auroc_text()}",
    ]
    if calibration == "default":
        lines.append(f"**Served** {s.served_text(members)}")
    st.sidebar.markdown("  \n".join(lines))
    st.sidebar.caption(
        "Intervals: 95% patient-level bootstrap. 'Served' numbers were measured on patients "
        "none of the served models trained on; calibrator and threshold cross-fitted."
    )
    return s, members, calibration


def pick_backend(summary: RunSummary, members: str) -> tuple[str, str]:
    """What computes the predictions: PyTorch, or the bundle's ONNX export of the served
    configuration when there is one (``xraycls export RUN --format onnx``). Returns the backend
    and a stamp of the export file (part of the model's cache key)."""
    from xraycls.inference.onnx_backend import default_export_path

    export = default_export_path(Bundle.read(summary.path), members)
    if not export.is_file():
        return "torch", ""
    backend = st.sidebar.radio(
        "Inference",
        ["torch", "onnx"],
        format_func={"torch": "PyTorch", "onnx": "ONNX export (onnxruntime, CPU)"}.__getitem__,
        key=f"backend::{summary.path}::{members}",
        help="The same calibration and threshold either way. Grad-CAM always uses the "
        "PyTorch weights (it needs gradients).",
    )
    if backend == "onnx":
        st.sidebar.caption(
            f"Predictions from `{export.name}` on onnxruntime; Grad-CAM from the PyTorch weights."
        )
    return backend, str(export.stat().st_mtime_ns)


def explanation_controls(summary: RunSummary) -> tuple[str, str | None, float, int | None]:
    """CAM method, target class (None = the decision), opacity, CAM input size.

    The CAM input size defaults to the model's own, so the map explains the prediction shown;
    a reduced size is an explicit choice, labelled on screen and in the exports.
    """
    from xraycls.inference.cam import CAM_METHODS

    st.sidebar.header("Explanation")
    method = st.sidebar.selectbox("CAM method", CAM_METHODS, key="cam_method")
    default_target = "(the most probable finding)" if summary.multilabel else "(the decision)"
    target = st.sidebar.selectbox(
        "Target finding" if summary.multilabel else "Target class",
        [default_target, *summary.classes],
        key="cam_target",
        help="Which finding's (class's) evidence to show. eigencam ignores it.",
    )
    alpha = st.sidebar.slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05, key="cam_alpha")
    sizes = V.cam_sizes(summary.image_size, summary.backbone)
    cam_size = st.sidebar.selectbox(
        "CAM input size",
        sizes,
        index=sizes.index(V.default_cam_size(summary.image_size)),
        format_func=lambda n: V.cam_size_label(n, summary.image_size),
        key="cam_size",
        help="The default explains the prediction from the same input. A reduced size is "
        "faster but runs the model on a scale it never saw; such maps are labelled.",
    )
    return (
        method,
        None if target == default_target else target,
        alpha,
        None if cam_size == summary.image_size else cam_size,
    )


# --------------------------------------------------------------------------- main panels


def analyse_uploads(
    files: list[Any], predictor: Any, model_key: tuple[str, ...], reference: Any, max_mb: int
) -> list[Analysis | UploadFailure]:
    """Analyse each upload once per model (session cache); bad files become failures."""
    cache = _session_cache("analyses")
    results, keep = [], set()
    for f in files:
        data = f.getvalue()
        key = (*model_key, hashlib.sha256(data).hexdigest(), f.name)
        keep.add(key)
        if key not in cache:
            t0 = time.perf_counter()
            with st.spinner(f"Reading and scoring {f.name}…"):
                (cache[key],) = analyse_many(
                    predictor, [(f.name, data)], reference=reference, max_mb=max_mb
                )
            _session_cache("timings")[key] = time.perf_counter() - t0
        results.append(cache[key])
    for key in list(cache):  # forget removed files
        if key not in keep:
            del cache[key]
    return results


def show_batch(results: list[Analysis | UploadFailure], classes: tuple[str, ...]) -> None:
    """The table of every upload and its CSV."""
    rows = [batch_row(r, classes) for r in results]
    st.subheader("Batch")
    st.dataframe(rows, hide_index=True, width="stretch")
    st.download_button(
        "Download batch CSV",
        rows_to_csv(rows),
        file_name="xraycls_batch.csv",
        mime="text/csv",
        on_click="ignore",
        key="dl_batch",
    )


def show_prediction(a: Analysis, summary: RunSummary, predictor: Any) -> None:
    """Decision, calibrated probabilities with the member spread, OOD warnings."""
    pred = a.prediction
    info = threshold_info(predictor.calibration_entry)
    st.markdown(f"### Decision: {decision_text(pred, summary.classes, info)}")
    if not predictor.calibrated:
        st.warning(
            "Uncalibrated: this bundle has no calibration for the served model; the "
            "probabilities are raw "
            + ("sigmoid" if summary.multilabel else "softmax")
            + " outputs and no threshold was validated."
        )
    if summary.multilabel:
        show_findings(a, summary, predictor)
    else:
        show_classes(a, summary)
    for w in a.ood.warnings():
        st.warning(f"Out of distribution? {w}", icon="⚠️")
    if a.ood.intensity is not None and not a.ood.intensity.flagged:
        st.caption(a.ood.intensity.message())
    for note in a.ood.notes:
        st.caption(note)


def show_findings(a: Analysis, summary: RunSummary, predictor: Any) -> None:
    """The ranked findings table: probability, member spread, decision at each finding's
    threshold, and that operating point's cross-fitted numbers with 95% intervals."""
    served = (
        summary.served.get(predictor.configuration)
        if predictor.calibration_name == ("default")
        else None
    )
    rows = [
        {
            "Finding": r.name,
            "P(finding), calibrated": f"{r.probability:.3f}",
            "Members": f"{r.member_min:.3f}-{r.member_max:.3f}",
            "Decision": "present" if r.present else "absent",
            "Threshold": "n/a" if r.threshold is None else f"{r.threshold:.3f}",
            "AUROC (holdout)": ci_text(r.auroc),
            "Sensitivity at threshold": ci_text(r.sensitivity),
            "Specificity at threshold": ci_text(r.specificity),
        }
        for r in findings_table(a.prediction, summary.classes, served)
    ]
    st.markdown("#### Findings, most probable first")
    st.table(rows)
    st.caption(
        "Probabilities are calibrated per finding; each finding has its own operating "
        "threshold. AUROC, sensitivity and specificity: cross-fitted on patients none of the "
        "served models saw, 95% patient-level intervals. "
        + uncertainty_text(a.prediction, summary.classes)
    )


def show_classes(a: Analysis, summary: RunSummary) -> None:
    """One metric per class: the calibrated probability and the member spread."""
    pred = a.prediction
    cols = st.columns(len(summary.classes))
    for col, u in zip(cols, uncertainty(pred, summary.classes), strict=True):
        spread = (
            f"members {u.member_min:.3f}-{u.member_max:.3f}" if u.members > 1 else "single model"
        )
        col.metric(
            f"P({u.name}), calibrated",
            f"{u.probability:.3f}",
            help=f"{spread}; uncalibrated {u.raw_probability:.3f}",
        )
        col.caption(spread)
    st.caption(uncertainty_text(pred, summary.classes))


def view_controls(a: Analysis) -> tuple[tuple[float, float] | None, tuple[slice, slice], int]:
    """Window level/width (defaults from the header) and zoom.

    Returns:
        The window (None: the header's own VOI, untouched), the region to show, the zoom.
    """
    c0, w0 = _memo("window0", (a.sha256,), lambda: default_window(a.raw))
    lo, hi = _memo("limits", (a.sha256,), lambda: window_limits(a.raw))
    step = 1.0 if hi - lo > 50 else (hi - lo) / 500.0
    w0 = max(float(w0), step)
    key = a.sha256[:16]
    src = "header" if a.raw.meta.header_window else "image range"
    with st.expander(f"Window (level/width, defaults from the {src})", expanded=False):
        c1, c2, c3 = st.columns([3, 3, 1])
        level = c1.slider("Level", lo, hi, float(c0), step=step, key=f"level::{key}")
        width = c2.slider("Width", step, 2.0 * (hi - lo), w0, step=step, key=f"width::{key}")
        if c3.button("Reset", key=f"reset::{key}"):
            st.session_state.pop(f"level::{key}", None)
            st.session_state.pop(f"width::{key}", None)
            st.rerun()
        st.caption(
            "The window changes the display only; the model always sees the bundle's preprocessing."
        )
    z1, z2, z3 = st.columns([2, 3, 3])
    zoom = z1.select_slider("Zoom", [1, 2, 4, 8], value=1, key=f"zoom::{key}")
    center = (0.5, 0.5)
    if zoom > 1:
        cx = z2.slider("Centre, left to right", 0.0, 1.0, 0.5, 0.01, key=f"cx::{key}")
        cy = z3.slider("Centre, top to bottom", 0.0, 1.0, 0.5, 0.01, key=f"cy::{key}")
        center = (cy, cx)
    box = V.zoom_box(a.raw.meta.original_shape, zoom, center)
    # Untouched sliders render exactly the default: the header's VOI, which may be a LUT
    # sequence or a sigmoid function rather than a linear window.
    window = None if (level, width) == (float(c0), w0) else (level, width)
    return window, box, zoom


def show_images(
    a: Analysis,
    predictor: Any,
    summary: RunSummary,
    view: tuple[tuple[float, float] | None, tuple[slice, slice], int],
    cam_opts: tuple[str, str | None, float, int | None],
    model_key: tuple[str, ...],
) -> None:
    """Original and overlay side by side, the same region of both, with the downloads.

    Images are sent as lossless PNGs of original pixels (Streamlit scales only images wider
    than 1460 px for the page; zooming crops, so zoomed views are always full resolution).
    """
    method, target, alpha, cam_size = cam_opts
    window, box, zoom = view
    boxkey = (box[0].start, box[0].stop, box[1].start, box[1].stop)
    shown = _memo("display", (a.sha256, window), lambda: display_image(a.raw, window))
    h, w = a.raw.meta.original_shape
    where = f"{w}x{h} px" if zoom == 1 else f"zoom {zoom}x of {w}x{h} px"
    left, right = st.columns(2)
    left.image(
        _memo("display_png", (a.sha256, window, boxkey), lambda: to_png(shown.pixels[box])),
        caption=f"Original — {shown.meta.window_applied} — {where}",
        output_format="PNG",  # "auto" would re-encode a PNG without alpha as JPEG
        width="stretch",
    )
    cam_key = (*model_key, a.sha256, method, target or "", str(cam_size))
    timings = _session_cache("timings")
    if cam_key not in _session_cache("cams"):
        t0 = time.perf_counter()
        try:
            with st.spinner(f"Computing {method}…"):
                cam = explain(predictor, a, method=method, target=target, cam_size=cam_size)
        except (ValueError, RuntimeError) as e:
            right.error(f"{a.name}: cannot compute {method}: {e}")
            return
        _memo("cams", cam_key, lambda: cam, keep=8)
        timings[cam_key] = time.perf_counter() - t0
    cam = _session_cache("cams")[cam_key]
    heat = _memo("heat", cam_key, lambda: cam.to_original(a.letterbox), keep=2)
    right.image(
        _memo(
            "overlay_png",
            (*cam_key, alpha, window, boxkey),
            lambda: to_png(overlay(shown.pixels[box], heat[box], alpha=alpha)),
        ),
        caption=f"Grad-CAM overlay — {cam.method}, target {cam.target}"
        + ("" if cam_size is None else f" — {V.cam_size_label(cam_size, summary.image_size)}"),
        output_format="PNG",
        width="stretch",
    )
    size = cam_size or summary.image_size
    explanation = {
        "method": cam.method,
        "target": cam.target,
        "cam_size": size,
        "cam_size_note": V.cam_size_label(size, summary.image_size),
        "alpha": alpha,
    }
    stem = Path(a.name).stem or "image"
    report = build_report(a, summary, predictor, explanation=explanation)
    d1, d2, d3 = st.columns(3)
    # Full-image PNGs are encoded only when clicked (deferred downloads).
    d1.download_button(
        "Download overlay PNG",
        lambda: to_png(overlay(shown.pixels, heat, alpha=alpha)),
        file_name=f"{stem}_{cam.method}.png",
        mime="image/png",
        on_click="ignore",
        key="dl_overlay",
    )
    d2.download_button(
        "Download JSON report",
        json.dumps(report, indent=2),
        file_name=f"{stem}_report.json",
        mime="application/json",
        on_click="ignore",
        key="dl_report",
    )
    d3.download_button(
        "Download displayed image PNG",
        lambda: to_png(shown.pixels),
        file_name=f"{stem}_window.png",
        mime="image/png",
        on_click="ignore",
        key="dl_image",
    )
    with st.expander("Report (JSON)"):
        st.json(report, expanded=False)
    t_pred = timings.get((*model_key, a.sha256, a.name))
    t_cam = timings.get(cam_key)
    if t_pred is not None and t_cam is not None:
        st.caption(f"Decode + predict {t_pred:.2f} s, {cam.method} {t_cam:.2f} s.")


def show_details(a: Analysis, data: bytes | None, reveal: bool) -> None:
    """Non-identifying header facts; patient identifiers only when asked for."""
    with st.expander("Image details"):
        st.table({"field": list(safe_header(a.raw)), "value": list(safe_header(a.raw).values())})
        if reveal and data is not None:
            ids = identifying_fields(data)
            if ids:
                st.table({"field": list(ids), "value": list(ids.values())})
            else:
                st.caption("No patient name, ID or birth date in this file.")
        else:
            st.caption(
                "Patient name, ID and birth date are hidden. Tick 'Reveal patient identifiers' "
                "in the sidebar to show them."
            )


# --------------------------------------------------------------------------- page


def main() -> None:
    """The page, top to bottom."""
    st.set_page_config(page_title="xraycls viewer", layout="wide")
    st.warning(INTENDED_USE, icon="⚠️")
    st.title("Chest X-ray viewer")
    args = _args()

    set_threads(args.threads)
    summary, members, calibration = pick_model(args)
    backend, export_stamp = pick_backend(summary, members)
    stamp = Bundle.read(summary.path).stamp() + export_stamp
    try:
        predictor = load_predictor(
            str(summary.path), members, calibration, args.device, stamp, backend
        )
    except (ValueError, OSError, RuntimeError, KeyError) as e:  # BundleError is a ValueError
        st.error(f"Cannot load the bundle {summary.path}: {e}")
        st.stop()
    model_key = (str(summary.path), members, calibration, args.device, stamp, backend)
    reference, ref_source = intensity_reference(str(summary.path), stamp, predictor.prep)
    st.sidebar.caption(f"Intensity reference: {ref_source}.")
    cam_opts = explanation_controls(summary)
    st.sidebar.header("Privacy")
    reveal = st.sidebar.checkbox(
        "Reveal patient identifiers",
        value=False,
        key="reveal",
        help="Shows patient name, ID and birth date from the DICOM header of the selected image.",
    )

    files = st.file_uploader(
        "Radiographs: DICOM (with or without extension), PNG or JPEG",
        accept_multiple_files=True,
        max_upload_size=args.max_upload_mb,
        key="uploads",
        help=f"Up to {args.max_upload_mb} MB per file. Decoded in memory; nothing is stored.",
    )
    if not files:
        st.info("Upload one or more radiographs to see predictions and explanations.")
        return
    results = analyse_uploads(files, predictor, model_key, reference, args.max_upload_mb)
    for r in results:
        if isinstance(r, UploadFailure):
            st.error(f"Could not read {r.message}", icon="🚫")
    if len(results) > 1:
        show_batch(results, summary.classes)
    ok = [r for r in results if isinstance(r, Analysis)]
    if not ok:
        return
    a = ok[0]
    if len(ok) > 1:
        i = st.selectbox(
            "Image to view", range(len(ok)), format_func=lambda i: ok[i].name, key="selected"
        )
        a = ok[i]
    st.subheader(a.name)
    show_prediction(a, summary, predictor)
    view = view_controls(a)
    show_images(a, predictor, summary, view, cam_opts, model_key)
    data = None
    if reveal:
        data = next(
            (d for f in files if hashlib.sha256(d := f.getvalue()).hexdigest() == a.sha256), None
        )
    show_details(a, data, reveal)


main()
