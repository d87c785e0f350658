"""Fuzzing ``read_image``: seeded mutants, each read in an isolated decoder process.

Asserts 0 escapes (only ``ImageReadError`` subclasses or a finite 2-D float32 image in [0, 1]),
0 hangs (no file reaches the per-file time limit) and bounded memory (each decoder's peak RSS
under its cap). A decoder that dies is counted and must be attributed to its file
(``DecoderCrashed``), never stop the run. The fast run (240 mutants of pydicom's bundled files)
runs everywhere; the slow run (2,400 mutants) uses the shared DICOM corpus when present.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from fuzz_dicom import bundled_corpus, mutants, probe, shared_corpus

from xraycls.errors import DecoderCrashed, DecoderTimeout, ImageReadError
from xraycls.io.isolate import DecodeLimits, DecoderPool

sys.path.insert(0, str(Path(__file__).parent))

MEMORY_MB = 3072
TIMEOUT_S = 60.0


def run_fuzz(corpus: list[Path], n: int, seed: int, tmp: Path) -> dict:
    files = []
    for m in mutants(corpus, n, seed):
        p = tmp / f"{m.index:05d}_{m.mutation}_{m.source.name}"
        p.write_bytes(m.data)
        files.append((p, m))
    outcomes: Counter[str] = Counter()
    escapes, crashes, timeouts, codes = [], [], [], Counter()
    peak_kib = 0
    t0 = time.perf_counter()
    limits = DecodeLimits(timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    # The decoder processes import ``fuzz_dicom.probe`` from this folder.
    here = Path(__file__).resolve()
    path = os.pathsep.join([str(here.parent), str(here.parents[1])])
    with DecoderPool(min(2, os.cpu_count() or 1), limits, env={"PYTHONPATH": path}) as pool:
        for i, out in pool.imap_unordered(probe, [str(p) for p, _ in files]):
            path, m = files[i]
            if isinstance(out, DecoderTimeout):
                timeouts.append((path.name, out.reason))
                outcomes["timeout"] += 1
            elif isinstance(out, DecoderCrashed):
                crashes.append((path.name, out.reason))
                outcomes["crashed"] += 1
            elif isinstance(out, ImageReadError):  # raised by the worker around probe itself
                escapes.append((path.name, f"worker: {out}"))
                outcomes["escape"] += 1
            else:
                kind, detail, rss = out
                outcomes[kind] += 1
                peak_kib = max(peak_kib, rss)
                if kind == "escape":
                    escapes.append((path.name, detail))
                elif kind == "error":
                    codes[detail] += 1
    return {
        "n": n,
        "outcomes": outcomes,
        "codes": codes,
        "escapes": escapes,
        "crashes": crashes,
        "timeouts": timeouts,
        "peak_mib": peak_kib / 1024,
        "seconds": time.perf_counter() - t0,
    }


def _check(res: dict) -> None:
    print(
        f"\n{res['n']} mutants in {res['seconds']:.1f} s: {dict(res['outcomes'])}; "
        f"errors {dict(res['codes'])}; peak decoder RSS {res['peak_mib']:.0f} MiB; "
        f"crashes {res['crashes'][:3]}"
    )
    assert sum(res["outcomes"].values()) == res["n"]  # every mutant got exactly one outcome
    assert res["escapes"] == [], res["escapes"][:10]
    assert res["timeouts"] == [], res["timeouts"][:10]
    assert res["peak_mib"] < MEMORY_MB
    assert res["outcomes"]["ok"] > 0 and res["outcomes"]["error"] > 0  # the harness bites


def test_fuzz_fast(tmp_path: Path) -> None:
    corpus = bundled_corpus()
    assert len(corpus) >= 8, "pydicom's bundled test files are missing"
    res = run_fuzz(corpus, 240, seed=15, tmp=tmp_path)
    _check(res)
    assert len(res["codes"]) >= 4  # truncated, dicom_error, invalid_image, ... all reached


@pytest.mark.slow
def test_fuzz_long(tmp_path: Path, shared_data: Path) -> None:
    corpus = shared_corpus(shared_data) + bundled_corpus()
    _check(run_fuzz(corpus, 2400, seed=1515, tmp=tmp_path))


def test_mutants_are_reproducible() -> None:
    corpus = bundled_corpus()
    a = mutants(corpus, 30, seed=7)
    b = mutants(corpus, 30, seed=7)
    assert [m.data for m in a] == [m.data for m in b]
    assert len({m.mutation for m in a}) >= 8


# --------------------------------------------------------------------------- property test

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_DS_FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from(["NaN", "inf", "-inf", "1e308", "0", "-1"]),
)


@st.composite
def native_datasets(draw: st.DrawFn) -> bytes:
    """Uncompressed DICOM data sets with arbitrary geometry, rescale, window and pixel bytes."""
    import io

    import pydicom
    from pydicom import config
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    rows, cols = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    bits = draw(st.sampled_from([1, 8, 12, 16, 32]))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = draw(st.sampled_from([1, 1, 1, 3]))
    ds.PhotometricInterpretation = draw(
        st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR"])
    )
    ds.BitsAllocated = bits
    ds.BitsStored = draw(st.integers(1, max(1, bits)))
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = draw(st.integers(0, 1))
    if draw(st.booleans()):
        ds.RescaleSlope, ds.RescaleIntercept = draw(_DS_FLOATS), draw(_DS_FLOATS)
    if draw(st.booleans()):
        ds.WindowCenter, ds.WindowWidth = draw(_DS_FLOATS), draw(_DS_FLOATS)
    if draw(st.booleans()):
        ds.NumberOfFrames = draw(st.integers(0, 3))
    expected = rows * cols * ds.SamplesPerPixel * max(1, bits // 8)
    n = draw(st.sampled_from([expected, expected, max(0, expected - 7), expected + 9, 0]))
    ds.PixelData = draw(st.binary(min_size=n, max_size=n))
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = old
    return buf.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(native_datasets())
def test_read_image_keeps_its_contract_on_generated_datasets(data: bytes) -> None:
    """Native (uncompressed) data sets only: safe to decode in this process."""
    import math

    import numpy as np

    from xraycls.io.read import read_image

    try:
        img = read_image("generated.dcm", data=data)
    except ImageReadError:
        return
    px = img.pixels
    assert isinstance(px, np.ndarray) and px.ndim == 2 and px.dtype == np.float32
    assert math.isfinite(float(px.sum(dtype=np.float64)))
    assert float(px.min()) >= 0.0 and float(px.max()) <= 1.0
