"""The results CSV of a scoring run: resumed after a kill, appended per batch, finished atomically.

Resuming: a file is skipped when the CSV already has a row for its path made from a file of the
same size and modification time (``size_bytes``, ``mtime_ns`` columns); a changed file is scored
again and its old row replaced, and rows whose error is ``internal_error`` (a bug, possibly
transient) are retried. What decides a row (input, model files, preprocessing, CAM and DICOM
options) is stored beside the CSV in ``<stem>.settings.json``; resuming with other settings is an
error rather than a silent mix of two models' results in one file.

Torn lines: every record ends with a newline and no field other than ``path`` (the first column)
can hold a newline, so a record torn by a kill is recognised on resume: the file is cut after its
last newline and records with the wrong number of fields are dropped. The kept rows are then
written back atomically (which also drops rows of changed or vanished files), and at the end the
whole file is rewritten atomically in input order: a finished CSV is always clean.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xraycls.inference.rows import ScoreError
from xraycls.io.files import atomic_path, output_error, write_json_atomic
from xraycls.io.manifest import write_table

RETRIED_ERRORS = frozenset({"internal_error"})
SETTINGS_VERSION = 1
_INFO_KEYS = frozenset({"run"})
"""Settings recorded for provenance but not compared on resume: a bundle that moved is the same
model when its files (``model.files``) are the same."""


class ResultsFile:
    """The results CSV: resumed with a torn tail cut off, appended per batch, finished atomically."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path = path
        self.columns = columns
        self._f: io.TextIOWrapper | None = None

    def read_existing(self) -> list[dict[str, str]]:
        """The complete rows of an earlier run's file (none when there is no file).

        Raises:
            ScoreError: The file's header is not this model's results header.
        """
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        # A kill can tear only the last record; every complete record ends with a newline.
        text = data[: data.rfind(b"\n") + 1].decode("utf-8", errors="surrogateescape")
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return []
        if header != self.columns:
            raise ScoreError(
                f"{self.path}: exists with other columns than this model's results "
                f"({', '.join(header[:8])}...); choose another --out"
            )
        n = len(self.columns)
        rows = []
        try:
            for rec in reader:
                if len(rec) == n:
                    rows.append(dict(zip(self.columns, rec, strict=True)))
        except csv.Error:
            pass  # a record torn inside a quoted path: it can only be the last one
        return rows

    def resume(
        self, inputs: list[tuple[str, tuple[str, str]]]
    ) -> tuple[dict[str, dict[str, str]], list[tuple[str, tuple[str, str]]]]:
        """Keep an earlier run's rows that still hold and open the file for appending.

        Args:
            inputs: ``(path, (size_bytes, mtime_ns))`` of every input, in order.

        Returns:
            The kept rows by path, and the inputs still to score.
        """
        previous = {r["path"]: r for r in self.read_existing()}
        rows: dict[str, dict[str, str]] = {}
        todo: list[tuple[str, tuple[str, str]]] = []
        for path, key in inputs:
            old = previous.get(path)
            if (
                old is not None
                and (old["size_bytes"], old["mtime_ns"]) == key
                and old["error_code"] not in RETRIED_ERRORS
            ):
                rows[path] = old
            else:
                todo.append((path, key))
        self.start(rows.values())
        return rows, todo

    def start(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Write ``rows`` atomically (dropping torn or stale records) and open for appending."""
        write_table(self.path, rows, self.columns)
        # surrogateescape: file names that are not UTF-8 (os.walk gives them as surrogates)
        # are written back as their original bytes instead of crashing the run.
        self._f = self.path.open("a", newline="", encoding="utf-8", errors="surrogateescape")

    def append(self, rows: list[dict[str, str]]) -> None:
        """Append whole rows in one write, then flush and fsync."""
        assert self._f is not None, "start() first"
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore").writerows(rows)
        try:
            self._f.write(buf.getvalue())
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # disk full: earlier rows are intact; a torn tail is cut on resume
            raise output_error(self.path, e) from e

    def finish(self, rows: Iterable[Mapping[str, object]]) -> None:
        """Close and rewrite the file atomically with ``rows`` (input order)."""
        self.close()
        write_table(self.path, rows, self.columns)

    def close(self) -> None:
        """Close the append handle."""
        if self._f is not None:
            self._f.close()
            self._f = None


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    lock = out.with_name(f".{out.name}.lock")
    with lock.open("a") as f:
        try:
            # A POSIX record lock, not flock(): forked DataLoader workers do not inherit it, so a
            # killed run's orphaned workers (alive for a few seconds) cannot block the resume.
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise ScoreError(f"{out}: another xraycls predict is writing this file") from e
        yield  # the lock dies with the process, also on kill -9


def settings_path(out: Path) -> Path:
    """Where the settings of a results CSV are stored."""
    return out.with_name(f"{out.stem}.settings.json")


def check_settings(out: Path, settings: dict[str, Any], existing: bool) -> None:
    path = settings_path(out)
    current = json.loads(json.dumps(settings))
    if existing:
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ScoreError(
                f"{out}: exists but was not written by xraycls predict ({path.name} missing or "
                "unreadable); choose another --out"
            ) from e
        differ = sorted(
            k
            for k in current.keys() | stored.keys()
            if k not in _INFO_KEYS and current.get(k) != stored.get(k)
        )
        if differ:
            raise ScoreError(
                f"{out}: was written with other settings ({', '.join(differ)} differ); choose "
                f"another --out, or delete it and {path.name} to score everything again"
            )
    write_json_atomic(path, current)


def require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise ScoreError(
            "--parquet needs pyarrow: pip install pyarrow (or pip install 'xraycls[distributed]')"
        ) from e


def write_parquet(csv_path: Path, columns: list[str]) -> Path:
    """Convert a results CSV to Parquet beside it (atomically): probabilities, threshold and
    seconds as float64 (null on error rows), sizes and mtimes as int64, the rest as strings."""
    require_pyarrow()
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    numeric = {c: pa.float64() for c in columns if c.startswith("prob_")}
    numeric |= {"threshold": pa.float64(), "seconds": pa.float64()}
    numeric |= {"size_bytes": pa.int64(), "mtime_ns": pa.int64()}
    types = {c: numeric.get(c, pa.string()) for c in columns}
    table = pcsv.read_csv(
        csv_path,
        parse_options=pcsv.ParseOptions(newlines_in_values=True),  # paths may hold line breaks
        convert_options=pcsv.ConvertOptions(
            column_types=types,
            null_values=[""],
            strings_can_be_null=False,
            check_utf8=False,  # file names that are not UTF-8 keep their bytes, as in the CSV
        ),
    )
    target = csv_path.with_suffix(".parquet")
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return target
