"""Bad input and broken outputs: one-line messages naming the option or file and the fix, and
nothing corrupt when the disk fills up (issue 15, "Faults")."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO, pkg_file, write_square_dataset
from typer.testing import CliRunner

from xraycls.cli import app
from xraycls.errors import OutputError
from xraycls.io.files import prepare_output_dir

runner = CliRunner()


def _one_line_error(res, *needles: str) -> None:  # type: ignore[no-untyped-def]
    text = res.output.strip()
    assert res.exit_code == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    for n in needles:
        assert n in text, text


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A read-only file system (a small tmpfs mounted ro; needs root, else the test skips).

    Root ignores permission bits, so chmod cannot make a folder non-writable for it."""
    d = tmp_path_factory.mktemp("ro")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", str(d)], check=False)


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 512 KiB tmpfs, to fill up (needs root, else the test skips)."""
    d = tmp_path_factory.mktemp("full")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(d)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_output_folder_blocked_by_a_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile is a file, not a folder"):
        prepare_output_dir(tmp_path / "afile" / "out")
    src = tmp_path / "src"
    shutil.copy(pkg_file("CT_small.dcm"), src.mkdir() or src / "ct.dcm")
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tmp_path / "afile" / "o")])
    _one_line_error(res, "--out", "is a file, not a folder")
    res = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(REPO / "configs/smoke.yaml"),
            "--out",
            str(tmp_path / "afile" / "r"),
        ],
    )
    _one_line_error(res, "--out", "is a file, not a folder")


def test_read_only_outputs(tmp_path: Path, read_only_dir: Path, tiny_run: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(pkg_file("CT_small.dcm"), src / "ct.dcm")
    res = runner.invoke(app, ["ingest", str(src), "--out", str(read_only_dir / "o")])
    _one_line_error(res, "--out", "read-only", "choose a writable location")
    res = runner.invoke(
        app,
        ["train", "--config", str(REPO / "configs/smoke.yaml"), "--out", str(read_only_dir / "r")],
    )
    _one_line_error(res, "--out", "read-only")
    res = runner.invoke(
        app, ["predict", str(src), "--run", str(tiny_run), "--out", str(read_only_dir / "r.csv")]
    )
    _one_line_error(res, "--out", "read-only")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_predict_on_cuda_without_cuda_is_one_line(tmp_path: Path, tiny_run: Path) -> None:
    res = runner.invoke(
        app,
        [
            "predict",
            pkg_file("CT_small.dcm"),
            "--run",
            str(tiny_run),
            "--out",
            str(tmp_path / "r.csv"),
            "--device",
            "cuda",
        ],
    )
    _one_line_error(res, "cuda", "--device cpu")


def _train(tmp_path: Path, labels: Path, *sets: str):  # type: ignore[no-untyped-def]
    args = ["train", "--config", str(REPO / "configs/smoke.yaml"), "--out", str(tmp_path / "run")]
    args += ["--set", f"data.labels={labels}", "--set", "model.name=resnet50_test"]
    for s in sets:
        args += ["--set", s]
    return runner.invoke(app, args)


def test_config_is_validated_before_any_data_is_read(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-labels.csv"
    res = _train(tmp_path, missing, "model.name=resnet5O")  # misspelt; the labels do not exist
    assert res.exit_code == 2 and "model.name" in res.output and "resnet5O" in res.output
    labels = write_square_dataset(tmp_path / "d", n=6)
    res = _train(tmp_path, labels, "data.classes=[plain,circle]")
    assert res.exit_code == 2 and "circle" in res.output and "data.classes" in res.output
    assert not (tmp_path / "run" / "folds").exists()  # no epoch ran


def test_empty_labels_are_a_counted_printed_exclusion(tmp_path: Path) -> None:
    labels = write_square_dataset(tmp_path / "d", n=8)
    lines = labels.read_text().splitlines()
    lines[1] = lines[1].replace(",plain,", ",,")  # one row without its label
    labels.write_text("\n".join(lines) + "\n")
    res = _train(tmp_path, labels, "data.limit=null", "cv.folds=2", "augment.enabled=false")
    assert "excluded 1 row(s) with an empty 'label'" in res.output, res.output


def test_ingest_and_train_refuse_each_others_folders(tmp_path: Path, tiny_run: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(pkg_file("CT_small.dcm"), src / "ct.dcm")
    res = runner.invoke(app, ["ingest", str(src), "--out", str(tiny_run), "--workers", "0"])
    _one_line_error(res, "run folder")
    ing = tmp_path / "ing"
    assert (
        runner.invoke(
            app, ["ingest", str(src), "--out", str(ing), "--size", "32", "--workers", "0"]
        ).exit_code
        == 0
    )
    res = runner.invoke(
        app, ["train", "--config", str(REPO / "configs/smoke.yaml"), "--out", str(ing)]
    )
    _one_line_error(res, "ingest")


# --------------------------------------------------------------------------- disk full


def _enospc_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """``os.fsync`` fails with ENOSPC after ``n`` calls: where a full disk surfaces for a
    write-back cache."""
    real = os.fsync
    calls = {"n": 0}

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] > n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_predict_on_a_full_disk_fails_clearly_and_resumes_intact(
    tmp_path: Path, tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xraycls.inference.predictor import Predictor
    from xraycls.inference.scoring import score

    src = tmp_path / "src"
    write_square_dataset(src, n=9)
    (src / "labels.csv").unlink()
    predictor = Predictor.from_run(tiny_run, device="cpu")
    clean = tmp_path / "clean.csv"
    score(src, clean, run=predictor, workers=0, batch_size=2)
    out = tmp_path / "res.csv"
    with monkeypatch.context() as m:
        _enospc_after(m, 6)
        with pytest.raises(OutputError, match=r"res\.csv: cannot write: the disk is full"):
            score(src, out, run=predictor, workers=0, batch_size=2)
    s = score(src, out, run=predictor, workers=0, batch_size=2)  # space is back: resume
    assert s.skipped > 0 and s.ok + s.skipped == 9
    assert out.read_bytes().count(b"\n") == clean.read_bytes().count(b"\n")
    strip = lambda b: [ln.rsplit(b",", 8)[0] for ln in b.splitlines()]  # noqa: E731 (no timings)
    assert strip(out.read_bytes()) == strip(clean.read_bytes())


def test_ingest_on_a_really_full_disk(tmp_path: Path, full_disk: Path) -> None:
    src = tmp_path / "src"
    write_square_dataset(src, n=40, size=256)
    res = runner.invoke(
        app, ["ingest", str(src), "--out", str(full_disk / "o"), "--size", "256", "--workers", "0"]
    )
    _one_line_error(res, "disk is full", "re-run")
    leftovers = [
        p for p in (full_disk / "o").rglob("*") if p.name.startswith(".") and ".tmp" in p.name
    ]
    assert leftovers == []  # no temporary file left behind
    shutil.rmtree(full_disk / "o")
