"""Tables of images: labels CSVs in, manifests out.

Convention everywhere a labels CSV is read: its ``path`` column is relative to the CSV's own
folder (absolute paths are kept as they are), so a data set folder can be moved with its CSV.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from xraycls.io.files import atomic_open

MANIFEST_COLUMNS = [
    "path",
    "status",
    "error",
    "id",
    "cache_path",
    "label",
    "patient_id",
    "modality",
    "body_part",
    "view_position",
    "photometric",
    "rows",
    "cols",
    "pixel_spacing",
    "window",
    "warnings",
    "sop_instance_uid",
    "study_instance_uid",
    "size_bytes",
    "mtime_ns",
]
"""The columns ``xraycls ingest`` writes first; extra labels-CSV columns (e.g. ``subtype``) follow."""


class LabelsError(ValueError):
    """A labels CSV is malformed; the message names the file (and row) and the problem."""


def read_labels(csv_path: str | Path) -> list[dict[str, str]]:
    """Read a labels CSV (``path,label[,patient_id,...]``) with paths resolved to absolute.

    Raises:
        LabelsError: Missing file or ``path`` column, empty paths, or duplicate paths.
    """
    csv_path = Path(csv_path)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError as e:
        raise LabelsError(f"{csv_path}: labels CSV not found") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LabelsError(f"{csv_path}: cannot read labels CSV: {e}") from e
    if "path" not in fields:
        raise LabelsError(f"{csv_path}: no 'path' column (found: {', '.join(fields) or 'none'})")
    base = csv_path.resolve().parent
    seen: dict[str, int] = {}
    out = []
    for i, row in enumerate(rows, start=2):
        rel = (row.get("path") or "").strip()
        if not rel:
            raise LabelsError(f"{csv_path}:{i}: empty path")
        absolute = str((base / rel).resolve()) if not os.path.isabs(rel) else str(Path(rel))
        if absolute in seen:
            raise LabelsError(f"{csv_path}:{i}: path {rel!r} repeats row {seen[absolute]}")
        seen[absolute] = i
        out.append(
            {k: (v or "").strip() for k, v in row.items() if k is not None} | {"path": absolute}
        )
    return out


def read_table(path: str | Path) -> list[dict[str, str]]:
    """Read a CSV written by :func:`write_table` (tolerating a torn last line from a kill)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        n = len(reader.fieldnames or [])
        return [
            row
            for row in reader
            if None not in row and len(row) == n and all(v is not None for v in row.values())
        ]


def write_table(path: str | Path, rows: Iterable[Mapping[str, object]], columns: list[str]) -> None:
    """Write a CSV atomically: a reader sees the old file or the new one, never half of one."""
    # surrogateescape: non-UTF-8 file names round-trip as their bytes instead of crashing.
    with atomic_open(path, newline="", errors="surrogateescape") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})


_END = "_end"


class Journal:
    """An append-only CSV whose rows survive a ``kill -9`` of the writer (each row is flushed).

    Every row ends with an ``_end`` marker column, so a row torn by a kill is recognised and
    dropped by :meth:`read` on the next run.
    """

    def __init__(self, path: str | Path, columns: list[str]) -> None:
        self.path = Path(path)
        self.columns = [*columns, _END]
        new = not self.path.exists() or self.path.stat().st_size == 0
        if not new:
            self._repair_tail()
        self._f = self.path.open("a", newline="", encoding="utf-8", errors="surrogateescape")
        self._w = csv.DictWriter(self._f, fieldnames=self.columns, extrasaction="ignore")
        if new:
            self._w.writeheader()
            self._f.flush()

    def _repair_tail(self) -> None:
        # A kill can leave the last line without its newline; start the next row on a new line.
        with self.path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")

    def append(self, row: Mapping[str, object]) -> None:
        """Write one row and flush it to the OS."""
        values = {k: "" if row.get(k) is None else row.get(k) for k in self.columns}
        self._w.writerow(values | {_END: "."})
        self._f.flush()

    @staticmethod
    def read(path: str | Path) -> list[dict[str, str]]:
        """The complete rows of a journal (none if it does not exist)."""
        if not Path(path).exists():
            return []
        rows = [r for r in read_table(path) if r.get(_END) == "."]
        for r in rows:
            del r[_END]
        return rows

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
