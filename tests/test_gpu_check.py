"""benchmarks/gpu_check.{sh,py}: refuses to start without a GPU, and its Python part runs every
check end to end on the CPU (tiny variants, 64 px, one step) so it cannot rot unnoticed."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _finite_numbers(obj: Any) -> None:
    if isinstance(obj, dict):
        for v in obj.values():
            _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            _finite_numbers(v)
    elif isinstance(obj, float):
        assert math.isfinite(obj)


def _dry_run(tmp_path: Path, recipes: str, shared_data: Path) -> dict[str, Any]:
    out = tmp_path / "gpu_check.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--recipes", recipes,
         "--dicom", str(shared_data / "dicom")],
        capture_output=True, text=True, timeout=900, env=_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["failures"] == [] and report["dry_run"]
    _finite_numbers(report)
    return report


def test_dry_run_exercises_every_part_on_the_cpu(tmp_path: Path, shared_data: Path) -> None:
    report = _dry_run(tmp_path, "resnet50_1024", shared_data)
    recipe = report["recipes"]["resnet50_1024"]
    assert recipe["model"] == "resnet50_test" and recipe["micro_batch"] == 2
    for mode, amp in (
        ("bf16", "bf16 autocast (cpu)"),
        ("fp16", "fp16 autocast (cpu) + GradScaler"),
    ):
        r = recipe[mode]
        assert r["amp"] == amp and r["finite"] and r["steps"] == 1 and r["images_per_s"] > 0
    assert recipe["fp16"]["grad_scale"] > 0
    speed = report["swin_t_speedup"]
    assert speed["fp32"]["amp"] == "fp32" and speed["speedup_bf16_over_fp32"] > 0
    assert report["cam"]["resnet50_test"]["finite"]
    pr = report["predict"]
    # chest_cr (6 radiographs) + not_dicom (an HTML page named .dcm): one row per file.
    assert pr["files"] == 7 and pr["ok"] == 6 and pr["errors_by_code"] == {"not_dicom": 1}


@pytest.mark.slow
def test_dry_run_of_every_recipe(tmp_path: Path, shared_data: Path) -> None:
    report = _dry_run(tmp_path, "*", shared_data)
    assert set(report["recipes"]) == {p.stem for p in (REPO / "configs").glob("*_1024.yaml")}
    assert len(report["cam"]) == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_both_entry_points_refuse_with_a_clear_message(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert res.returncode == 2 and "no CUDA device" in res.stderr
    assert not (tmp_path / "x.json").exists()
    if shutil.which("nvidia-smi") is None:
        res = subprocess.run(
            ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "y.json")],
            capture_output=True, text=True, timeout=60, env=_env(),
        )  # fmt: skip
        assert res.returncode == 2 and "no NVIDIA GPU here" in res.stderr
