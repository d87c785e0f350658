"""What ``xraycls listen`` and the DICOMweb path share: a state folder in which every received
image is scored once and its DICOM results reach the destination, across restarts.

The state folder::

    received/<key>.dcm      images as received (atomic writes), until the retention ends
    results.csv             one row per scored image (the batch scorer's schema, fsynced per batch)
    results.settings.json   the model and options the rows were made with
    outbox/<key>.dcm.sr.dcm, outbox/<key>.dcm.cam.dcm   results not yet accepted by the destination

``<key>`` is a hash of the SOP Instance UID: file names carry nothing of the patient, and an image
sent twice maps to the same name, so it is scored once. The life of an image: received (durable
before it is acknowledged) -> scored (its SR/SC written to the outbox, then its row appended) ->
delivered (removed from the outbox once the destination accepted it) -> its received copy removed
when the retention ends. A crash at any point leaves either a received image without a row (scored
again on start) or results in the outbox (sent again on start); result UIDs are derived from the
source UID and the bundle, so neither produces a duplicate in the archive.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from xraycls.inference.outputs import Explainer
from xraycls.inference.results import (
    RETRIED_ERRORS,
    SETTINGS_VERSION,
    ResultsFile,
    check_settings,
    exclusive,
)
from xraycls.inference.rows import load_item, result_columns, score_items

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from xraycls.inference.predictor import Predictor

log = logging.getLogger("xraycls.pacs")


class DeliveryError(Exception):
    """The destination did not accept a result (unreachable, refused, failure status)."""


def instance_key(sop_instance_uid: str) -> str:
    """The file name stem of an instance: a hash, so no identifier appears in names or logs."""
    return hashlib.sha256(sop_instance_uid.strip().encode()).hexdigest()[:24]


def describe_os_error(e: OSError, what: str) -> str:
    """A one-line message for an I/O failure, saying plainly when the disk is full."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}: the disk is full ({e.filename or ''}); free space, nothing was lost"
    return f"{what}: {type(e).__name__}: {e}"


@dataclass
class PacsStats:
    """Counters of a listener or DICOMweb run."""

    received: int = 0
    duplicates: int = 0
    refused: int = 0
    scored: int = 0
    errors: int = 0
    delivered: int = 0
    seconds_scoring: float = 0.0
    errors_by_code: dict[str, int] = field(default_factory=dict)


class PacsScorer:
    """Scores received DICOM files into the state folder (see the module docstring)."""

    def __init__(
        self,
        predictor: Predictor,
        state_dir: str | Path,
        *,
        cam_method: str = "gradcam",
        retention_s: float | None = 0.0,
    ) -> None:
        """Open (or resume) the state folder.

        Args:
            predictor: The loaded bundle.
            state_dir: The state folder (created).
            cam_method: The CAM method of the overlay Secondary Captures.
            retention_s: How long a received image is kept after it was scored: 0 removes it at
                once, None keeps it.

        Raises:
            ScoreError: The folder holds results of another model or other options, or another
                process is using it.
        """
        self.predictor = predictor
        self.state = Path(state_dir).resolve()
        self.received = self.state / "received"
        self.outbox = self.state / "outbox"
        for d in (self.received, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
        self.retention_s = retention_s
        self.stats = PacsStats()
        self._lock = threading.Lock()
        out = self.state / "results.csv"
        self._exclusive: AbstractContextManager[None] = exclusive(out)
        self._exclusive.__enter__()
        try:
            check_settings(
                out,
                {
                    "version": SETTINGS_VERSION,
                    "input": "pacs",
                    "run": str(predictor.run_dir.resolve()) if predictor.run_dir else None,
                    "model": predictor.describe() | {"run": None, "files": predictor.fingerprint()},
                    "preprocessing": predictor.prep.fingerprint(),
                    "cam_method": cam_method,
                },
                out.exists(),
            )
            self.results = ResultsFile(out, result_columns(predictor.classes))
            kept = [
                r for r in self.results.read_existing() if r["error_code"] not in RETRIED_ERRORS
            ]
            self.rows: dict[str, dict[str, str]] = {Path(r["path"]).stem: r for r in kept}
            self.results.start(kept)
        except BaseException:
            self._exclusive.__exit__(None, None, None)
            raise
        self.explain = Explainer(
            predictor, self.received, cam_method, None, self.outbox, strict_io=True
        )

    def received_path(self, sop_instance_uid: str) -> Path:
        """Where an instance is kept once received."""
        return self.received / f"{instance_key(sop_instance_uid)}.dcm"

    def is_scored(self, sop_instance_uid: str) -> bool:
        """Whether the instance already has a result row."""
        with self._lock:
            return instance_key(sop_instance_uid) in self.rows

    def backlog(self) -> list[Path]:
        """Received images without a result row (oldest first): what a restart scores."""
        files = [p for p in self.received.glob("*.dcm") if not p.name.startswith(".")]
        with self._lock:
            todo = [p for p in files if p.stem not in self.rows]
        return sorted(todo, key=lambda p: p.stat().st_mtime_ns)

    def score(self, paths: list[Path]) -> list[dict[str, str]]:
        """Score received files: results to the outbox, then rows appended (fsynced).

        Raises:
            OSError: An output or the results could not be written (e.g. disk full); nothing was
                recorded for the batch and it can be retried as it is.
        """
        t0 = time.perf_counter()
        prep, ood = self.predictor.prep, self.predictor.ood
        items = []
        for p in paths:
            item = load_item(p, prep, keep_original=True, ood=ood)
            st = p.stat()
            item["size_bytes"], item["mtime_ns"] = str(st.st_size), str(st.st_mtime_ns)
            items.append(item)
        rows, preds = score_items(self.predictor, items)
        self.explain(items, preds, rows)
        self.results.append(rows)
        with self._lock:
            for r in rows:
                self.rows[Path(r["path"]).stem] = r
                if r["status"] == "ok":
                    self.stats.scored += 1
                else:
                    self.stats.errors += 1
                    code = r["error_code"] or "unreadable"
                    self.stats.errors_by_code[code] = self.stats.errors_by_code.get(code, 0) + 1
            self.stats.seconds_scoring += time.perf_counter() - t0
        for r in rows:
            key = Path(r["path"]).stem
            detail = "" if r["status"] == "ok" else f" ({r['error_code']})"
            log.info("scored %s: %s%s", key, r["predicted"] or r["status"], detail)
        if self.retention_s == 0:
            for p in paths:
                p.unlink(missing_ok=True)
        return rows

    def sweep(self, now: float | None = None) -> int:
        """Remove scored received images older than the retention; returns how many."""
        if self.retention_s is None:
            return 0
        limit = (time.time() if now is None else now) - self.retention_s
        n = 0
        with self._lock:
            scored = set(self.rows)
        for p in self.received.glob("*.dcm"):
            try:
                if p.stem in scored and p.stat().st_mtime <= limit:
                    p.unlink()
                    n += 1
            except FileNotFoundError:
                continue
        return n

    def pending_results(self) -> list[Path]:
        """Result objects not yet delivered (SR after the SC of the same image)."""
        files = [p for p in self.outbox.glob("*.dcm") if not p.name.startswith(".")]
        return sorted(files, key=lambda p: (p.name.split(".")[0], p.name.endswith(".sr.dcm")))

    def close(self) -> None:
        """Close the results file and release the folder."""
        self.results.close()
        self._exclusive.__exit__(None, None, None)


class Forwarder:
    """Delivers the outbox to a destination in a background thread, retrying with backoff.

    ``send`` delivers files in order and removes each one the destination accepted; it raises
    :class:`DeliveryError` (or ``OSError``) when it cannot go on. Undelivered files stay in the
    outbox, on disk: a dead destination delays results, never loses them.
    """

    def __init__(
        self,
        pending: Callable[[], list[Path]],
        send: Callable[[list[Path]], int],
        *,
        describe: str,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        on_delivered: Callable[[int], None] | None = None,
    ) -> None:
        self.pending = pending
        self._send = send
        self.describe = describe
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._on_delivered = on_delivered
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xraycls-forwarder", daemon=True)
        self.last_error: str = ""
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """New results are in the outbox."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def deliver_once(self) -> bool:
        """Try once to deliver what is pending; False when the destination failed."""
        files = self.pending()
        if not files:
            return True
        try:
            n = self._send(files)
        except (DeliveryError, OSError) as e:
            self.failures += 1
            self.last_error = str(e) or type(e).__name__
            return False
        self.last_error = ""
        if self._on_delivered:
            self._on_delivered(n)
        return True

    def _run(self) -> None:
        delay = self.backoff_s
        while not self._stop.is_set():
            if self.deliver_once():
                delay = self.backoff_s
                if not self.pending():
                    self._wake.wait(5.0)
                    self._wake.clear()
                continue
            waiting = len(self.pending())
            log.error(
                "cannot deliver to %s: %s; %d result file(s) kept in the outbox, retrying in %.0f s",
                self.describe,
                self.last_error,
                waiting,
                delay,
            )
            self._stop.wait(delay)
            delay = min(delay * 2, self.max_backoff_s)


def deliver_with_retries(
    forwarder: Forwarder, *, attempts: int = 4, sleep: Callable[[float], None] = time.sleep
) -> None:
    """Deliver the outbox in the foreground, retrying with backoff.

    Raises:
        DeliveryError: Still undelivered after ``attempts``; the files stay in the outbox and
            the next run sends them first.
    """
    delay = forwarder.backoff_s
    for i in range(attempts):
        if forwarder.deliver_once() and not forwarder.pending():
            return
        if i + 1 < attempts:
            log.warning(
                "delivery to %s failed (%s); retrying", forwarder.describe, forwarder.last_error
            )
            sleep(delay)
            delay = min(delay * 2, forwarder.max_backoff_s)
    n = len(forwarder.pending())
    raise DeliveryError(
        f"{forwarder.describe}: {forwarder.last_error}; {n} result file(s) kept in the outbox "
        "and sent first by the next run"
    )
