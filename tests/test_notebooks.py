"""The notebooks in notebooks/ run from top to bottom (tiny settings) and are committed clean.

Each notebook is executed with nbclient in a fresh kernel, from the notebooks/ folder (as a user
opens it), with ``XRAYCLS_NOTEBOOK_SMOKE=1`` (a few dozen images, 64 px, seconds of training) and
its outputs written to a temporary folder. A failing cell fails the test with the cell's error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_the_three_notebooks() -> None:
    assert [p.stem for p in NOTEBOOKS] == [
        "01_reading_dicom",
        "02_training_run",
        "03_compare_and_gradcam",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: strip them"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
    assert "widgets" not in nb.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_tiny_settings(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    # The kernel is a child process of this interpreter (jupyter_client runs the "python3"
    # kernel with sys.executable) and inherits the environment: PYTHONPATH puts this checkout's
    # xraycls first.
    monkeypatch.setenv("XRAYCLS_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("XRAYCLS_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    try:
        client.execute()
    except CellExecutionError as e:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # IPython colours its tracebacks
        pytest.fail(f"{path.name}: {plain[-3000:]}")
    nbformat.write(nb, tmp_path / path.name)  # the executed copy, for a look after a failure
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    images = sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert images >= 2, f"{path.name}: expected figures in the outputs, found {images}"
