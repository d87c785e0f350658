"""Atomic writers leave files with the mode a plain open() gives, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from xraycls.io.manifest import write_table


def test_atomic_outputs_are_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "results.csv"
        write_table(out, [{"path": "a", "status": "ok"}], ["path", "status"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert out.read_text().splitlines()[0] == "path,status"
