"""A bad file is one error row, never a stopped batch (issue 15).

Decoder isolation (crash, panic, hang, memory blow-up cost one file; workers die with their
parent), the ``read_image`` contract (only ``ImageReadError``; only finite 2-D float32 in [0, 1];
truncation named as such), and the end-to-end run: a folder mixing good files with crashing,
panicking, hanging and NaN mutants is scored in one run, one row per file, and a re-run changes
nothing. Faults are injected in the decoder processes by ``tests/faults.py`` (see its docstring).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import pkg_file, write_square_dataset

from xraycls.errors import (
    DecoderCrashed,
    DecoderTimeout,
    ImageReadError,
    ImageTooLargeError,
    InvalidImageError,
    PixelDecodeError,
    TruncatedDicomError,
)
from xraycls.io.image import ImageMeta, RawImage, check_values
from xraycls.io.isolate import FAULT_HOOK_ENV, DecodeLimits, DecoderPool
from xraycls.io.read import load_image, read_bytes, read_image

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoder processes started from now on run ``faults.inject`` before each file."""
    monkeypatch.setenv(FAULT_HOOK_ENV, "faults:inject")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), str(REPO)]))


def _edited(src: str, **values: object) -> bytes:
    from pydicom import config

    ds = pydicom.dcmread(src)
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for k, v in values.items():
            setattr(ds, k, v)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
    finally:
        config.settings.writing_validation_mode = old
    return buf.getvalue()


# --------------------------------------------------------------------------- the contract


def test_nan_rescale_is_an_error_not_a_nan_image(tmp_path: Path) -> None:
    p = tmp_path / "nan.dcm"
    p.write_bytes(_edited(pkg_file("CT_small.dcm"), RescaleSlope="NaN"))
    with pytest.raises(InvalidImageError, match="NaN or infinite") as e:
        read_image(p)
    assert e.value.code == "invalid_image" and str(p) in str(e.value)


def test_absurd_window_is_ignored_and_the_image_stays_finite(tmp_path: Path) -> None:
    p = tmp_path / "wide.dcm"
    p.write_bytes(_edited(pkg_file("CT_small.dcm"), WindowCenter=40, WindowWidth="1e308"))
    img = read_image(p)
    assert np.isfinite(img.pixels).all() and img.pixels.dtype == np.float32
    assert "1e+308" not in img.meta.window_applied  # not the header's window
    with pytest.raises(InvalidImageError, match="window"):
        read_image(p, window=(40.0, 1e308))  # an explicit window that overflows float32


def test_non_2d_values_are_an_error() -> None:
    meta = ImageMeta(path="x.dcm", format="dicom", original_shape=(4, 4))
    with pytest.raises(InvalidImageError, match="not a 2-D image"):
        check_values(RawImage(values=np.zeros((2, 4, 4), np.float32), meta=meta))


def test_a_panic_inside_the_codec_is_an_image_read_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pydicom.pixels

    class PanicException(BaseException):  # pyo3's panic type derives from BaseException
        pass

    def panic(*a: object, **k: object) -> object:
        raise PanicException("index out of bounds: the len is 3 but the index is 7")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", panic)
    with pytest.raises(PixelDecodeError, match="index out of bounds"):
        read_image(pkg_file("MR_small_RLE.dcm"))


def test_a_malformed_voi_lut_is_an_image_read_error(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(pkg_file("CT_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [2, -5, 8]  # first value mapped 8 bits, but 4096 entries used
    item.add_new((0x0028, 0x3006), "US", [0, 1])  # LUT Data
    ds.VOILUTSequence = [item]
    p = tmp_path / "lut.dcm"
    ds.save_as(p)
    try:
        img = read_image(p)
    except ImageReadError:
        return
    assert np.isfinite(img.pixels).all()


def test_truncated_before_the_pixel_data_is_truncated_not_no_pixel_data(tmp_path: Path) -> None:
    data = Path(pkg_file("CT_small.dcm")).read_bytes()
    cut = data.rfind(b"\xe0\x7f\x10\x00")  # just before the Pixel Data element
    p = tmp_path / "cut.dcm"
    for end in (cut, cut - 40, cut + 6):
        p.write_bytes(data[:end])
        with pytest.raises(TruncatedDicomError):
            read_image(p)


def test_a_fifo_is_refused_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with pytest.raises(ImageReadError, match="FIFO"):
        read_bytes(fifo)
    assert time.perf_counter() - t0 < 1.0


def test_image_read_errors_pickle_with_their_fields() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(DecoderCrashed("/x/y.dcm", "died (SIGABRT)")))
    assert type(e) is DecoderCrashed and e.path == "/x/y.dcm" and e.code == "decoder_crashed"
    assert str(e) == "/x/y.dcm: died (SIGABRT)"


# --------------------------------------------------------------------------- the pool


def test_pool_survives_abort_segv_panic_oom_and_hang(tmp_path: Path, faults: None) -> None:
    good = pkg_file("CT_small.dcm")
    bad = {}
    for kind in ("ABORT", "SEGV", "PANIC", "OOM", "HANG"):
        bad[kind] = tmp_path / f"XRAYCLS-FAULT-{kind}.dcm"
        shutil.copy(good, bad[kind])
    paths = [str(bad["ABORT"]), good, str(bad["SEGV"]), good, str(bad["PANIC"])]
    paths += [str(bad["OOM"]), str(bad["HANG"]), good]
    limits = DecodeLimits(timeout_s=5.0, memory_mb=1536)
    t0 = time.perf_counter()
    with DecoderPool(2, limits) as pool:
        out = dict(pool.imap_unordered(read_image, paths))
        assert pool.crashed == 2 and pool.timed_out == 1
        assert pool.run(read_image, good).pixels.shape == (128, 128)  # replaced, still working
    assert time.perf_counter() - t0 < 60
    assert isinstance(out[0], DecoderCrashed) and "SIGABRT" in out[0].reason
    assert isinstance(out[2], DecoderCrashed) and "SIGSEGV" in out[2].reason
    assert isinstance(out[4], PixelDecodeError) and "FakePanic" in out[4].reason
    assert isinstance(out[5], ImageTooLargeError) and "1536 MiB" in out[5].reason
    assert isinstance(out[6], DecoderTimeout) and "5 s" in out[6].reason
    for i in (1, 3, 7):
        assert out[i].pixels.shape == (128, 128)


def test_raw_images_cross_the_process_boundary_with_their_voi() -> None:
    src = pkg_file("CT_small.dcm")
    with DecoderPool(1) as pool:
        raw = pool.run(load_image, src)
    from xraycls.io.image import render

    assert np.array_equal(render(raw).pixels, read_image(src).pixels)


def _processes_with(token: str) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if token.encode() in (d / "environ").read_bytes():
                found.append(int(d.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("delay", [0.3, 4.0])
def test_workers_never_outlive_their_parent(delay: float, tmp_path: Path) -> None:
    """kill -9 of the parent at start-up (workers still importing) and mid-decode."""
    token = f"XRAYCLS_TEST_TOKEN={uuid.uuid4().hex}"
    hang = tmp_path / "XRAYCLS-FAULT-HANG.dcm"
    shutil.copy(pkg_file("CT_small.dcm"), hang)
    child = (
        "from xraycls.io.isolate import DecoderPool\n"
        "from xraycls.io.read import read_image\n"
        "import time\n"
        "pool = DecoderPool(3)\n"
        f"for _ in range(3): pool.submit(read_image, {str(hang)!r})\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ)
    env[token.split("=")[0]] = token.split("=")[1]
    env[FAULT_HOOK_ENV] = "faults:inject"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO)])
    proc = subprocess.Popen([sys.executable, "-c", child], env=env)
    time.sleep(delay)
    others = [p for p in _processes_with(token) if p != proc.pid]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(token) == []
    if delay > 1:
        assert len(others) == 3  # the workers were running, and died with the parent


# --------------------------------------------------------------------------- end to end


def _read(out: Path) -> list[dict[str, str]]:
    with out.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _predict(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xraycls", "predict", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _mixed_folder(root: Path) -> tuple[Path, dict[str, str], int]:
    """Good PNGs and DICOMs beside crashing, panicking, hanging, NaN and truncated files.

    Returns the folder, the expected error code of each bad file, and the number of files.
    """
    src = root / "src"
    write_square_dataset(src / "png", n=3)
    (src / "png" / "labels.csv").unlink()
    (src / "dcm").mkdir()
    for name, f in {"ct.dcm": "CT_small.dcm", "rle.dcm": "MR_small_RLE.dcm"}.items():
        shutil.copy(pkg_file(f), src / "dcm" / name)
    (src / "dcm" / "wide-window.dcm").write_bytes(
        _edited(pkg_file("CT_small.dcm"), WindowWidth="1e308")
    )
    bad = src / "bad"
    bad.mkdir()
    for kind in ("ABORT", "PANIC", "HANG"):
        shutil.copy(pkg_file("MR_small.dcm"), bad / f"XRAYCLS-FAULT-{kind}.dcm")
    (bad / "nan-slope.dcm").write_bytes(_edited(pkg_file("CT_small.dcm"), RescaleSlope="NaN"))
    data = Path(pkg_file("CT_small.dcm")).read_bytes()
    (bad / "truncated.dcm").write_bytes(data[: len(data) // 2])
    expected = {
        "XRAYCLS-FAULT-ABORT.dcm": "decoder_crashed",
        "XRAYCLS-FAULT-PANIC.dcm": "decode_failed",
        "XRAYCLS-FAULT-HANG.dcm": "decoder_timeout",
        "nan-slope.dcm": "invalid_image",
        "truncated.dcm": "truncated",
    }
    return src, expected, 3 + 3 + 5


def _check_rows(rows: list[dict[str, str]], expected: dict[str, str], n: int) -> None:
    by_name = {Path(r["path"]).name: r for r in rows}
    assert len(rows) == len(by_name) == n  # one row per file
    for name, code in expected.items():
        assert by_name[name]["status"] == "error", by_name[name]
        assert by_name[name]["error_code"] == code, by_name[name]
    for name, r in by_name.items():
        if name not in expected:
            assert r["status"] == "ok", r
            assert all(np.isfinite(float(r[k])) for k in r if k.startswith("prob_"))
    assert "SIGABRT" in by_name["XRAYCLS-FAULT-ABORT.dcm"]["error"]
    assert "PanicException" in by_name["XRAYCLS-FAULT-PANIC.dcm"]["error"] or (
        "FakePanic" in by_name["XRAYCLS-FAULT-PANIC.dcm"]["error"]
    )


def test_mixed_folder_is_scored_and_a_rescore_changes_nothing(
    tmp_path: Path, tiny_run: Path, faults: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xraycls.inference.predictor import Predictor
    from xraycls.inference.scoring import score

    monkeypatch.setenv("XRAYCLS_DECODE_TIMEOUT_S", "4")
    src, expected, n = _mixed_folder(tmp_path)
    predictor = Predictor.from_run(tiny_run, device="cpu")
    out = tmp_path / "res.csv"
    s = score(src, out, run=predictor, workers=1, batch_size=4)
    assert (s.ok, s.error) == (n - len(expected), len(expected))
    _check_rows(_read(out), expected, n)
    before = out.read_bytes()
    again = score(src, out, run=predictor, workers=1, batch_size=4)
    assert (again.ok, again.error, again.skipped) == (0, 0, n)  # nothing is retried
    assert out.read_bytes() == before


@pytest.mark.slow
def test_cli_scores_a_mixed_folder_in_one_run_and_a_rerun_changes_nothing(
    tmp_path: Path, tiny_run: Path
) -> None:
    """The issue's acceptance run, through the real CLI in a child process."""
    src, expected, n = _mixed_folder(tmp_path)
    env = dict(os.environ)
    env |= {
        FAULT_HOOK_ENV: "faults:inject",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
        "XRAYCLS_DECODE_TIMEOUT_S": "4",
    }
    out = tmp_path / "res.csv"
    args = [str(src), "--run", str(tiny_run), "--out", str(out), "--workers", "2"]
    first = _predict([*args, "--device", "cpu"], env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    _check_rows(_read(out), expected, n)
    before = out.read_bytes()
    second = _predict([*args, "--device", "cpu"], env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert out.read_bytes() == before  # crashed and timed-out files are not retried
    assert f"{n} skipped" in second.stdout + second.stderr


# --------------------------------------------------------------------------- other faces


def test_ingest_records_a_crashing_file_and_a_rerun_keeps_it(tmp_path: Path, faults: None) -> None:
    from xraycls.io.ingest import ingest
    from xraycls.io.preprocess import Preprocessing

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(pkg_file("CT_small.dcm"), src / "ct.dcm")
    shutil.copy(pkg_file("CT_small.dcm"), src / "XRAYCLS-FAULT-ABORT.dcm")
    shutil.copy(pkg_file("MR_small.dcm"), src / "mr.dcm")
    out = tmp_path / "out"
    s = ingest(src, out, prep=Preprocessing(image_size=32), workers=1)
    assert (s.ok, s.error, dict(s.errors_by_code)) == (2, 1, {"decoder_crashed": 1})
    rows = {Path(r["path"]).name: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert "SIGABRT" in rows["XRAYCLS-FAULT-ABORT.dcm"]["error"]
    again = ingest(src, out, prep=Preprocessing(image_size=32), workers=1)
    assert (again.reused, again.ok, again.error) == (3, 2, 1)


def test_training_preflight_excludes_a_crashing_file(tmp_path: Path, faults: None) -> None:
    from xraycls.io.preprocess import Preprocessing
    from xraycls.training.data import Table, preflight

    paths = []
    for name in ("a.dcm", "XRAYCLS-FAULT-SEGV.dcm", "b.dcm"):
        shutil.copy(pkg_file("CT_small.dcm"), tmp_path / name)
        paths.append(str(tmp_path / name))
    table = Table(paths, np.array([0, 1, 0]), np.array(["p1", "p2", "p3"]), ["x", "y"])
    kept, excluded = preflight(table, Preprocessing(image_size=32), None, workers=1)
    assert kept.paths == [paths[0], paths[2]]
    assert [e["path"] for e in excluded] == [paths[1]]
    assert excluded[0]["error"].startswith("decoder_crashed:") and "SIGSEGV" in excluded[0]["error"]


def test_viewer_upload_that_crashes_its_decoder_is_an_error_and_the_server_lives(
    faults: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xraycls.io.isolate as isolate
    from xraycls.inference.analysis import decode_upload

    monkeypatch.setattr(isolate, "_SHARED", None)  # a pool whose workers see the fault hook
    data = Path(pkg_file("CT_small.dcm")).read_bytes()
    try:
        with pytest.raises(DecoderCrashed, match="SIGABRT"):
            decode_upload("XRAYCLS-FAULT-ABORT.dcm", data)
        raw = decode_upload("upload.dcm", data)  # the next upload is decoded by a new worker
        assert raw.values.shape == (128, 128) and raw.meta.path == "upload.dcm"
    finally:
        isolate.shared_pool().close()


def test_in_process_decoding_journals_the_file_that_killed_the_run(tmp_path: Path) -> None:
    """``--workers 0``: the process itself dies on a file; the re-run decodes that file isolated
    (where it crashes only its decoder: ``decoder_crashed``) and finishes the others."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.dcm", "b-XRAYCLS-FAULT-ABORT.dcm", "c.dcm"):
        shutil.copy(pkg_file("CT_small.dcm"), src / name)
    out = tmp_path / "out"
    child = (
        "import os, sys\n"
        "import xraycls.io.ingest as ing\n"
        "from xraycls.io.preprocess import Preprocessing\n"
        "real = ing.preprocess_file\n"
        "def dying(path, *a, **k):\n"
        "    if 'XRAYCLS-FAULT-ABORT' in str(path): os.abort()  # a codec abort, in-process\n"
        "    return real(path, *a, **k)\n"
        "ing.preprocess_file = dying\n"
        f"s = ing.ingest({str(src)!r}, {str(out)!r}, prep=Preprocessing(image_size=32), workers=0)\n"
        "print(s.line())\n"
    )
    env = dict(os.environ)
    env |= {FAULT_HOOK_ENV: "faults:inject", "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    first = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
    assert first.returncode == -signal.SIGABRT  # the whole run died, as before isolation
    assert (out / ".decoding").exists()
    second = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 ok, 1 error (1 decoder_crashed)" in second.stdout
    assert not (out / ".decoding").exists()


def test_a_decoder_that_cannot_start_fails_the_run_instead_of_every_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broken installation must not turn a whole archive into ``decoder_crashed`` rows."""
    monkeypatch.setenv(FAULT_HOOK_ENV, "no_such_module_xyz:inject")  # the worker dies at start
    with DecoderPool(1) as pool, pytest.raises(RuntimeError, match="could not start"):
        pool.run(read_image, pkg_file("CT_small.dcm"))


def test_a_task_the_decoder_cannot_import_fails_the_run_not_the_file() -> None:
    """A setup error (the task's function not importable in the worker) is not a crash of the
    file: it must stop the run instead of marking every file ``decoder_crashed``."""
    from faults import with_marker  # importable here (tests/ is on sys.path), not in the worker

    pool = DecoderPool(1, env={"PYTHONPATH": str(REPO)})
    with pool, pytest.raises(RuntimeError, match="cannot load the task"):
        pool.run(with_marker, b"x", "abort")
