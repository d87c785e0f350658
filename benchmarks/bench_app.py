"""Viewer latency: time from upload to Grad-CAM overlay shown, in a real browser.

For each benchmark bundle, ``xraycls app`` is started on 127.0.0.1 and driven by headless
Chromium (Playwright + Debian's ``/usr/bin/chromium``). Each round opens a fresh browser session
(the model stays loaded: it is a ``st.cache_resource``; the session's per-upload cache is empty),
uploads a real chest DICOM and stops the clock when both images (original and overlay) have
loaded in the page. The app's own split (decode + predict, CAM) is read from its caption. The
1024-px bundle also measures the full-resolution CAM by switching "CAM input size".

Bundles (random initialisation: latency does not depend on the weights' values, and no
pretrained weights can be downloaded here; the calibration is a temperature fitted to synthetic
logits and the threshold is a placeholder, all marked as such in the bundle):

* ``demo``: the demo config's backbone and size when the figures in docs/benchmarks.md were
  measured (``swin_test``, 224 px) with its 5 fold models and a refit model; the viewer uses the
  fold ensemble (5 forwards, ensemble CAM). Kept so that the figures stay comparable.
* ``swin_tiny_1024``: Swin-T at 1024², one (refit) model.

Each bundle runs with torch's default threads (one per core) and with 1 thread: on a CPU
shared with other jobs, OpenMP threads spinning against them can cost more than they gain.

Usage: python benchmarks/bench_app.py [--rounds 3] [--threads 0,1] [--json docs/bench_app.json]
       [--screenshot docs/app_screenshot.png] [--screenshot-run RUN_DIR] [--skip-1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("XRAYCLS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run",
]  # fmt: skip
IMAGES_LOADED = """n => [...document.querySelectorAll('[data-testid="stImage"] img')]
    .filter(i => i.complete && i.naturalWidth > 0).length >= n"""
SPLIT = re.compile(r"Decode \+ predict ([0-9.]+) s, (\S+) ([0-9.]+) s\.")


def make_bundle(
    out: Path, *, model: str, image_size: int, folds: int, refit: bool, seed: int = 0
) -> Path:
    """A random-initialised run bundle with the files and layout ``xraycls train`` writes."""
    import numpy as np
    import torch

    from xraycls import __version__
    from xraycls.evaluation.calibration import fit_calibrator, save_calibration
    from xraycls.models import create_model
    from xraycls.models.weights import normalization_for, save_weights
    from xraycls.training.config import load_config
    from xraycls.training.crossval import preprocessing_for

    classes = ["NORMAL", "PNEUMONIA"]
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"model.name={model}", f"model.image_size={image_size}", f"cv.folds={max(folds, 2)}"],
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    members = [f"fold{k}/weights.safetensors" for k in range(folds)]
    files = members + (["weights.safetensors"] if refit else [])
    for k, name in enumerate(files):
        torch.manual_seed(seed + k)
        net = create_model(model, num_classes=len(classes), image_size=image_size)
        save_weights(out / name, net.state_dict())
    mean, std = normalization_for(model)
    (out / "labels.json").write_text(json.dumps({"classes": classes, "positive": classes[1]}))
    bundle = {
        "format": 1,
        "xraycls_version": __version__,
        "model": model,
        "image_size": image_size,
        "num_classes": len(classes),
        "normalization": {"mean": list(mean), "std": list(std)},
        "preprocessing": json.loads(preprocessing_for(cfg).fingerprint()),
        "weights": "weights.safetensors" if refit else None,
        "fold_weights": members,
        "note": "benchmark bundle: random initialisation, not a trained model",
    }
    (out / "bundle.json").write_text(json.dumps(bundle, indent=2))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    logits = rng.normal(0, 1, (200, 2)) + 2.0 * np.eye(2)[labels]
    note = "synthetic logits (benchmark bundle, not a trained model)"
    save_calibration(
        out / "calibration.json",
        fit_calibrator("temperature", logits, labels),
        classes=classes,
        summary={"method": "temperature", "fitted_on": note},
        threshold={"positive": classes[1], "target": "sensitivity", "value": 0.95,
                   "threshold": 0.5, "note": "placeholder"},
    )  # fmt: skip
    return out


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_app(runs: Path, log: Path, *, threads: int = 0) -> tuple[subprocess.Popen[bytes], str]:
    """``xraycls app`` on a free port; returns once it answers its health check."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xraycls.cli",
            "app",
            "--runs",
            str(runs),
            "--port",
            str(port),
            "--threads",
            str(threads),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the viewer exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                if r.read() == b"ok":
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"the viewer did not come up; see {log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server started by :func:`start_app`."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def open_page(browser: Any, url: str, *, height: int = 1400) -> tuple[Any, float]:
    """A new session on the viewer, ready for an upload; returns it and its load time."""
    page = browser.new_page(viewport={"width": 1600, "height": height})
    t0 = time.perf_counter()
    page.goto(url)
    page.locator('input[type="file"]').first.wait_for(state="attached", timeout=600_000)
    return page, time.perf_counter() - t0


def upload_to_overlay(page: Any, image: Path) -> dict[str, Any]:
    """Upload ``image``; seconds until original and overlay have loaded, plus the app's split."""
    t0 = time.perf_counter()
    page.locator('input[type="file"]').first.set_input_files(str(image))
    page.get_by_text("Grad-CAM overlay").first.wait_for(timeout=600_000)
    page.wait_for_function(IMAGES_LOADED, arg=2, timeout=600_000)
    seconds = time.perf_counter() - t0
    page.get_by_text("Decode + predict").first.wait_for(timeout=60_000)
    m = SPLIT.search(page.inner_text("body"))
    return {
        "seconds": seconds,
        "predict_s": float(m.group(1)) if m else None,
        "cam_s": float(m.group(3)) if m else None,
    }


def switch_cam_size(page: Any, label: str) -> dict[str, Any]:
    """Pick another "CAM input size"; seconds until the new overlay is shown."""
    before = SPLIT.search(page.inner_text("body"))
    t0 = time.perf_counter()
    page.locator('[data-testid="stSelectbox"]').filter(has_text="CAM input size").click()
    page.get_by_role("option", name=label).click()
    page.wait_for_function(
        "old => { const m = document.body.innerText.match(/Decode \\+ predict [0-9.]+ s, \\S+ "
        "([0-9.]+) s\\./); return m && m[0] !== old; }",
        arg=before.group(0) if before else "",
        timeout=600_000,
    )
    page.wait_for_function(IMAGES_LOADED, arg=2, timeout=600_000)
    seconds = time.perf_counter() - t0
    m = SPLIT.search(page.inner_text("body"))
    return {"seconds": seconds, "cam_s": float(m.group(3)) if m else None}


def chest_dicom() -> Path:
    """The shared SIIM chest CR (1024², JPEG baseline) when present, else NEMA RG1 (1955x1841)."""
    from pydicom.data import get_testdata_file

    shared = Path(os.environ.get("XRAYCLS_SHARED_DATA") or REPO.parent / "shared" / "data")
    siim = sorted((shared / "dicom" / "chest_cr").glob("siim_1.2.*.dcm"))
    return siim[0] if siim else Path(str(get_testdata_file("RG1_UNCI.dcm")))


def bench_bundle(
    browser: Any,
    run: Path,
    image: Path,
    *,
    rounds: int,
    tmp: Path,
    full_cam: str | None,
    threads: int,
) -> dict[str, Any]:
    """Start the viewer on ``run`` alone and time ``rounds`` fresh-session uploads."""
    runs = tmp / f"runs-{run.name}-{threads}"
    runs.mkdir()
    (runs / run.name).symlink_to(run.resolve())
    proc, url = start_app(runs, tmp / f"{run.name}-{threads}.log", threads=threads)
    try:
        page, first_load = open_page(browser, url)  # loads and warms up the model
        page.close()
        results, full = [], {}
        for i in range(rounds):
            page, _ = open_page(browser, url)
            results.append(upload_to_overlay(page, image))
            if full_cam and i == rounds - 1:
                full = switch_cam_size(page, full_cam)
            page.close()
    finally:
        stop(proc)
    secs = [r["seconds"] for r in results]
    out: dict[str, Any] = {
        "bundle": run.name,
        "threads": threads or "torch default",
        "image": image.name,
        "first_page_load_s (model load + warm-up)": round(first_load, 2),
        "upload_to_overlay_s": [round(s, 3) for s in secs],
        "median_s": round(statistics.median(secs), 3),
        "app_split_last": {"predict_s": results[-1]["predict_s"], "cam_s": results[-1]["cam_s"]},
    }
    if full_cam:
        out["switch_to_full_cam"] = {k: round(v, 3) for k, v in full.items() if v is not None}
    return out


def screenshot(browser: Any, run: Path, image: Path, path: Path, tmp: Path) -> None:
    """A full-height screenshot of the viewer after an upload (for the README)."""
    runs = tmp / "runs-shot"
    runs.mkdir()
    (runs / run.name).symlink_to(run.resolve())
    proc, url = start_app(runs, tmp / "shot.log")
    try:
        page, _ = open_page(browser, url, height=1700)
        upload_to_overlay(page, image)
        page.mouse.move(0, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
    finally:
        stop(proc)


def main() -> None:
    """Build the bundles, run the rounds, print and write the results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "bench_app.json")
    ap.add_argument("--screenshot", type=Path, default=REPO / "docs" / "app_screenshot.png")
    ap.add_argument("--screenshot-run", type=Path, default=None, help="Bundle for the screenshot.")
    ap.add_argument("--skip-1024", action="store_true", help="Only the demo bundle.")
    ap.add_argument(
        "--threads",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[0, 1],
        help="Torch thread settings to compare, e.g. 0,1 (0: torch's default).",
    )
    args = ap.parse_args()

    import torch
    from playwright.sync_api import sync_playwright

    image = chest_dicom()
    with tempfile.TemporaryDirectory(prefix="bench_app-") as d:
        tmp = Path(d)
        bundles = [(make_bundle(tmp / "demo", model="swin_test", image_size=224, folds=5,
                                refit=True), None)]  # fmt: skip
        if not args.skip_1024:
            bundles.append(
                (make_bundle(tmp / "swin_tiny_1024", model="swin_tiny", image_size=1024,
                             folds=0, refit=True), "1024 px (full)")
            )  # fmt: skip
        results = []
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
            )
            for run, full in bundles:
                for threads in args.threads:
                    r = bench_bundle(
                        browser,
                        run,
                        image,
                        rounds=args.rounds,
                        tmp=tmp,
                        full_cam=full,
                        threads=threads,
                    )
                    print(json.dumps(r), flush=True)
                    results.append(r)
            if args.screenshot:
                screenshot(
                    browser, args.screenshot_run or bundles[0][0], image, args.screenshot, tmp
                )
            browser.close()
    report = {
        "what": "seconds from set_input_files (upload) to both images loaded in the page",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": os.getloadavg(),
        },
        "cam_input_size_default": "model size on CUDA; at most 512 px on CPU",
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"-> {args.json}" + (f", {args.screenshot}" if args.screenshot else ""))


if __name__ == "__main__":
    main()
