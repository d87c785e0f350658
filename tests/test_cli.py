"""The command line's surface: flags are flags, closed choices are enums, every command's help
renders, and ``xraycls models`` lists the registry."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from xraycls.cli import app

runner = CliRunner()
COMMANDS = [
    "ingest", "train", "distill", "calibrate", "evaluate", "models", "compare", "app", "predict",
    "export", "listen",
]  # fmt: skip


def _help(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_boolean_options_render_as_flags(command: str) -> None:
    text = _help(command)
    assert "<bool>" not in text, f"`xraycls {command} --help` shows a flag as taking a value"


def test_closed_choices_are_enums() -> None:
    predict = _help("predict")
    assert re.search(
        r"--cam-method\s+<gradcam\|gradcam\+\+\|hirescam\|eigencam\|scorecam>", predict
    )
    assert "<auto|refit|folds>" in predict and "<local|ray>" in predict
    assert "<sensitivity|specificity|youden>" in _help("calibrate")
    bad = runner.invoke(app, ["calibrate", "run", "--target", "accuracy"])
    assert bad.exit_code == 2 and "accuracy" in bad.output


def test_evaluate_exposes_what_a_user_needs() -> None:
    text = _help("evaluate")
    for option in ("--label-column", "--members", "--batch-size", "--device", "--n-boot"):
        assert option in text


def test_a_flag_takes_no_value(tmp_path: pytest.TempPathFactory) -> None:
    # --parquet must not swallow the next token: "--parquet --workers 0" parses both.
    result = runner.invoke(
        app,
        ["predict", "missing-input", "--run", "r", "--out", "o.csv", "--parquet", "--workers", "0"],
    )
    assert result.exit_code == 2 and "missing-input: no such file or folder" in result.output


def test_models_lists_the_registry_with_parameters() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.output.splitlines()[1:] if line.strip()}
    assert {"swin_tiny", "maxvit_tiny", "vit_base_patch16", "resnet50"} <= rows.keys()
    assert "swin_test" not in rows  # the tiny variants only with --all
    assert re.search(r"resnet\s+23\.51M\s+1024x1024\s+timm/resnet50", rows["resnet50"])
    everything = runner.invoke(app, ["models", "--all"]).output
    assert "swin_test" in everything


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "xraycls", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and re.fullmatch(r"\d+\.\d+\.\d+\s*", out.stdout)
