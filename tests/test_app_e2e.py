"""End to end: ``xraycls app`` serving on 127.0.0.1, driven by headless Chromium (Playwright).

Uploads a real chest DICOM (the shared SIIM CR when present, else pydicom-data's NEMA RG1 CR),
waits for the prediction and the Grad-CAM overlay, checks them, and writes a screenshot and the
upload-to-overlay time under the test's tmp dir. Skips, saying why, without Playwright or
Chromium (``pip install playwright``; ``apt-get install -y chromium``: Playwright's own browser
download is not used).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import pkg_file, shared_data_dir

CHROMIUM = Path(os.environ.get("XRAYCLS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
IMAGES_LOADED = """n => [...document.querySelectorAll('[data-testid="stImage"] img')]
    .filter(i => i.complete && i.naturalWidth > 0).length >= n"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], *, timeout: float = 60) -> None:
    """Poll Streamlit's health endpoint until it answers ``ok``.

    Raises:
        RuntimeError: The server exited or did not come up in time.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the viewer exited with code {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                if r.read() == b"ok":
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the viewer did not answer on {url} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or XRAYCLS_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(
    browser: Any, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``xraycls app`` on a free port of 127.0.0.1, serving the tiny bundle.

    Depends on ``browser`` and asks for the session's ``tiny_run`` only then, so that a missing
    browser skips before the bundle is trained.
    """
    tiny_run: Path = request.getfixturevalue("tiny_run")
    root = tmp_path_factory.mktemp("e2e")
    (root / "runs").mkdir()
    (root / "runs" / "tiny").symlink_to(tiny_run)
    port = free_port()
    env = dict(os.environ, XRAYCLS_SALT="e2e-salt")
    with (root / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xraycls.cli", "app", "--runs", str(root / "runs"),
             "--port", str(port), "--device", "cpu"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def chest_dicom() -> tuple[Path, tuple[int, int]]:
    """A real chest CR and its (width, height)."""
    siim = sorted((shared_data_dir() / "dicom" / "chest_cr").glob("siim_1.2.*.dcm"))
    if siim:
        return siim[0], (1024, 1024)
    return Path(pkg_file("RG1_UNCI.dcm")), (1841, 1955)


def test_upload_dicom_shows_prediction_and_overlay(
    browser: Any, server: str, tmp_path: Path
) -> None:
    dicom, (width, height) = chest_dicom()
    page = browser.new_page(viewport={"width": 1600, "height": 1400})
    page.goto(server)
    # The first script run imports torch and loads (and warms up) the model.
    page.get_by_text("Research use only").first.wait_for(timeout=120_000)
    uploader = page.locator('input[type="file"]').first
    uploader.wait_for(state="attached", timeout=120_000)

    t0 = time.perf_counter()
    uploader.set_input_files(str(dicom))
    page.get_by_text("Grad-CAM overlay").first.wait_for(timeout=120_000)
    page.wait_for_function(IMAGES_LOADED, arg=2, timeout=60_000)
    seconds = time.perf_counter() - t0

    decision = page.get_by_text("Decision:").first.inner_text()
    assert re.fullmatch(
        r"Decision: (plain|square) — P\(square\) 0\.\d{3} is (at or above|below) the "
        r"95%-sensitivity threshold \(0\.\d{3}\)",
        decision.strip(),
    ), decision
    assert page.get_by_text("P(square), calibrated").count() == 1
    sizes = page.eval_on_selector_all(
        '[data-testid="stImage"] img', "els => els.map(e => [e.naturalWidth, e.naturalHeight])"
    )
    assert sizes == [[width, height], [width, height]]  # full resolution, not downscaled
    body = page.inner_text("body")
    assert "Could not read" not in body and "Traceback" not in body
    assert "Research use only. Not a medical device" in body
    assert "16d7f894-55d7-4d95-8957-d18987f0e981" not in body  # SIIM's PatientName/ID

    page.screenshot(path=str(tmp_path / "app.png"))
    result = {"file": dicom.name, "upload_to_overlay_seconds": round(seconds, 3)}
    (tmp_path / "timing.json").write_text(json.dumps(result, indent=2))
    print(
        f"\nupload -> overlay shown: {seconds:.2f} s ({dicom.name}); screenshot {tmp_path}/app.png"
    )
    assert seconds < 60


@pytest.fixture(scope="module")
def multilabel_server(
    browser: Any, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """``xraycls app`` serving the session's tiny multi-label bundle (synthetic findings)."""
    run: Path = request.getfixturevalue("tiny_multilabel_run")
    root = tmp_path_factory.mktemp("e2e_ml")
    (root / "runs").mkdir()
    (root / "runs" / "findings").symlink_to(run)
    port = free_port()
    env = dict(os.environ, XRAYCLS_SALT="e2e-salt")
    with (root / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xraycls.cli", "app", "--runs", str(root / "runs"),
             "--port", str(port), "--device", "cpu"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_multilabel_upload_shows_ranked_findings_and_a_cam_per_finding(
    browser: Any, multilabel_server: str, tiny_multilabel_run: Path, tmp_path: Path
) -> None:
    from xraycls.training.config import load_config

    images = Path(load_config(tiny_multilabel_run / "config.yaml").data.labels).parent
    page = browser.new_page(viewport={"width": 1600, "height": 1400})
    page.goto(multilabel_server)
    page.get_by_text("Research use only").first.wait_for(timeout=120_000)
    uploader = page.locator('input[type="file"]').first
    uploader.wait_for(state="attached", timeout=120_000)
    uploader.set_input_files(str(images / "img003.png"))
    page.get_by_text("Findings, most probable first").first.wait_for(timeout=120_000)
    page.get_by_text("Grad-CAM overlay").first.wait_for(timeout=120_000)
    page.wait_for_function(IMAGES_LOADED, arg=2, timeout=60_000)

    table = page.locator('[data-testid="stTable"] table').first
    header = [c.strip() for c in table.locator("thead th").all_inner_texts() if c.strip()]
    assert "Finding" in header and "P(finding), calibrated" in header, header
    body = table.locator("tbody tr")
    assert body.count() == 3
    col = header.index("P(finding), calibrated")
    probs, names = [], []
    for i in range(3):
        cells = [c.strip() for c in body.nth(i).locator("td").all_inner_texts()]
        cells = cells[-len(header) :]  # an index column, when shown, comes first
        names.append(cells[header.index("Finding")])
        probs.append(float(cells[col]))
    assert sorted(names) == ["Bar", "Disc", "Square"]
    assert probs == sorted(probs, reverse=True)
    assert page.get_by_text(f"target {names[0]}").count() >= 1

    # A CAM per selected finding: pick the least probable one in the sidebar.
    target = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(
        has_text="Target finding"
    )
    target.click()
    page.get_by_role("option", name=names[-1], exact=True).click()
    page.get_by_text(f"Grad-CAM overlay — gradcam, target {names[-1]}").first.wait_for(
        timeout=120_000
    )
    text = page.inner_text("body")
    assert "Traceback" not in text and "Research use only. Not a medical device" in text
    page.screenshot(path=str(tmp_path / "app_findings.png"))
