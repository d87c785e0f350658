"""``xraycls predict --engine ray``: same rows as the local engine, same resume, on local Ray."""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import pkg_file, write_square_dataset

from xraycls.inference.scoring import score

TESTS = Path(__file__).resolve().parent

ray = pytest.importorskip(
    "ray.data", reason="Ray Data is not installed: pip install 'xraycls[distributed]'"
)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 1024**2,
        # Workers must not create a patient-ID salt file in the user's home (see conftest).
        # The decoder fault hook (tests/faults.py) acts only on files marked for it.
        runtime_env={
            "env_vars": {
                "XRAYCLS_SALT": "test-salt",
                "XRAYCLS_DECODER_FAULT_HOOK": "faults:inject",
                "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)]),
            }
        },
    )
    yield
    ray.shutdown()


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_ray_engine_matches_local_engine_and_resumes_a_local_run(
    tmp_path: Path, tiny_run: Path, local_ray: None
) -> None:
    src = tmp_path / "src"
    write_square_dataset(src, n=8)
    (src / "labels.csv").unlink()
    shutil.copy(pkg_file("CT_small.dcm"), src / "ct.dcm")
    (src / "page.dcm").write_text("<!DOCTYPE html><html>not an image</html>" * 5)

    local = score(src, tmp_path / "local.csv", run=tiny_run, workers=0, batch_size=4)
    remote = score(src, tmp_path / "ray.csv", run=tiny_run, engine="ray", batch_size=3)
    assert (remote.ok, remote.error) == (local.ok, local.error) == (9, 1)
    a, b = _read(tmp_path / "local.csv"), _read(tmp_path / "ray.csv")
    assert [r["path"] for r in a] == [r["path"] for r in b]  # finished file: input order
    probs = [c for c in a[0] if c.startswith("prob_")]
    for x, y in zip(a, b, strict=True):
        same = ("status", "error", "error_code", "sop_instance_uid", "predicted", "threshold")
        assert {k: x[k] for k in same} == {k: y[k] for k in same}
        if x["status"] == "ok":
            np.testing.assert_allclose(
                [float(x[c]) for c in probs], [float(y[c]) for c in probs], atol=1e-5
            )

    # Resume: keep half of the local engine's rows; Ray scores only the rest, each once.
    out = tmp_path / "local.csv"
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:6]))
    again = score(src, out, run=tiny_run, engine="ray", batch_size=3)
    assert (again.skipped, again.ok + again.error) == (5, 5)
    rows = _read(out)
    assert [r["path"] for r in rows] == [r["path"] for r in a]
    assert score(src, out, run=tiny_run, engine="ray").skipped == 10  # nothing left: no Ray job


def test_ray_engine_writes_the_multilabel_schema_of_the_local_engine(
    tmp_path: Path, tiny_multilabel_run: Path, local_ray: None
) -> None:
    from conftest import FINDINGS, write_findings_dataset

    src = tmp_path / "src"
    write_findings_dataset(src, n=6, seed=4)
    (src / "labels.csv").unlink()
    local = score(src, tmp_path / "local.csv", run=tiny_multilabel_run, workers=0, batch_size=4)
    remote = score(src, tmp_path / "ray.csv", run=tiny_multilabel_run, engine="ray", batch_size=4)
    assert local.ok == remote.ok == 6
    a, b = _read(tmp_path / "local.csv"), _read(tmp_path / "ray.csv")
    assert list(a[0]) == list(b[0])  # the same columns, in the same order
    assert [f"dec_{f}" for f in FINDINGS] == [c for c in b[0] if c.startswith("dec_")]
    for x, y in zip(a, b, strict=True):
        assert x["predicted"] == y["predicted"]
        for f in FINDINGS:
            assert x[f"dec_{f}"] == y[f"dec_{f}"] in ("0", "1")
            assert float(x[f"prob_{f}"]) == pytest.approx(float(y[f"prob_{f}"]), abs=1e-5)


def test_ray_engine_survives_a_decoder_that_aborts(
    tmp_path: Path, tiny_run: Path, local_ray: None
) -> None:
    """A file that aborts its decoder is one ``decoder_crashed`` row; the Ray workers live."""
    src = tmp_path / "src"
    write_square_dataset(src, n=3)
    (src / "labels.csv").unlink()
    shutil.copy(pkg_file("CT_small.dcm"), src / "XRAYCLS-FAULT-ABORT.dcm")
    s = score(src, tmp_path / "ray.csv", run=tiny_run, engine="ray", batch_size=2)
    assert (s.ok, s.error, dict(s.errors_by_code)) == (3, 1, {"decoder_crashed": 1})
    again = score(src, tmp_path / "ray.csv", run=tiny_run, engine="ray")
    assert again.skipped == 4
