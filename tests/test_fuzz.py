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
    with DecoderPool(min(2, os.cpu_count() or 1), limits) as pool:
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
