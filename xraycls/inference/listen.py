"""``xraycls listen``: a DICOM receiver (C-STORE SCP) that scores each chest image as it arrives
and sends the SR and overlay Secondary Capture to a destination AE (C-STORE SCU).

- Only configured calling AE titles may associate; TLS is optional (``tls_cert``/``tls_key``,
  and ``tls_ca`` to require client certificates).
- A received image is written atomically to the state folder *before* it is acknowledged: a
  success status means it is on disk. A refused image (queue full, disk full) gets an
  out-of-resources status (0xA700) and the sender keeps it and retries.
- Images other than chest radiographs (Modality CR/DX with pixel data), such as SRs or our own
  Secondary Captures coming back, are refused with "SOP class not supported" (0x0122).
- One worker thread scores the queue in batches with the batch scorer's rows (per-file errors,
  resumable results); a forwarder thread delivers the outbox with retries and backoff. See
  :mod:`xraycls.inference.pacs` for the state folder and why nothing is lost across a restart.
- Logs name images by a hash of their SOP Instance UID, never by a patient attribute.
"""

from __future__ import annotations

import logging
import queue
import re
import ssl
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xraycls.errors import ConfigError
from xraycls.inference.pacs import (
    DeliveryError,
    Forwarder,
    PacsScorer,
    PacsStats,
    describe_os_error,
    instance_key,
)
from xraycls.io.dicom_results import IMAGE_MODALITIES
from xraycls.io.files import write_bytes_atomic

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from xraycls.inference.predictor import Predictor

log = logging.getLogger("xraycls.listen")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000
_ACCEPTED_STORE = {0x0000, 0xB000, 0xB006, 0xB007}
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, 16 chars at most


@dataclass
class Destination:
    """Where results go: ``AE@host:port``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@host:port``.

        Raises:
            ConfigError: Malformed.
        """
        m = re.fullmatch(r"([^@]+)@(.+):(\d+)", text.strip())
        if not m or not _AE.match(m.group(1)) or not 0 < int(m.group(3)) < 65536:
            raise ConfigError(f"--dest {text!r}: expected AE@host:port, e.g. PACS@10.0.0.5:104")
        return cls(m.group(1), m.group(2), int(m.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass
class ListenConfig:
    """The receiver's settings (a YAML file's ``listen:`` section, or CLI options)."""

    ae_title: str = "XRAYCLS"
    bind: str = "127.0.0.1"
    port: int = 11112
    allow: list[str] = field(default_factory=list)
    """Calling AE titles that may send images; no others are accepted."""
    dest: str | None = None
    """``AE@host:port`` to send the results to; None keeps them in the outbox."""
    queue_size: int = 32
    """Images received but not yet scored; beyond it new images are refused (0xA700)."""
    batch_size: int = 4
    retention_hours: float | None = 0.0
    """How long a received image is kept after scoring: 0 removes it at once, null keeps it."""
    cam_method: str = "gradcam"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    """With a CA file, peers must present a certificate it signed (mutual TLS)."""
    retry_max_s: float = 60.0

    def validate(self) -> None:
        """Raises ConfigError naming the bad setting."""
        if not _AE.match(self.ae_title):
            raise ConfigError(f"ae_title {self.ae_title!r}: 1-16 printable characters")
        if not self.allow:
            raise ConfigError("allow: name at least one calling AE title that may send images")
        for ae in self.allow:
            if not _AE.match(ae):
                raise ConfigError(f"allow {ae!r}: 1-16 printable characters")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port {self.port}: must be 0-65535")
        if self.queue_size < 1 or self.batch_size < 1:
            raise ConfigError("queue_size and batch_size must be at least 1")
        if self.retention_hours is not None and self.retention_hours < 0:
            raise ConfigError("retention_hours must be >= 0 (or null to keep images)")
        if self.dest is not None:
            Destination.parse(self.dest)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ConfigError(f"{name} {value}: no such file")

    @property
    def retention_s(self) -> float | None:
        return None if self.retention_hours is None else self.retention_hours * 3600.0


def load_listen_config(path: str | Path | None, **overrides: Any) -> ListenConfig:
    """The ``listen:`` section of a YAML file (unknown keys are errors), then ``overrides`` that
    are not None, validated.

    Raises:
        ConfigError: Unreadable file, unknown key or bad value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the listen config ({e})") from e
        section = doc.get("listen", doc) if isinstance(doc, dict) else None
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: expected a mapping under 'listen:'")
        values.update(section)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(ListenConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{path or 'listen options'}: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    if isinstance(values.get("allow"), str):
        values["allow"] = [values["allow"]]
    cfg = ListenConfig(**values)
    cfg.validate()
    return cfg


def _server_ssl(cfg: ListenConfig) -> ssl.SSLContext | None:
    if cfg.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    if cfg.tls_ca:
        ctx.load_verify_locations(cfg.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def result_contexts() -> list[str]:
    """SOP classes of the objects xraycls sends."""
    from pydicom.uid import (
        ComprehensiveSRStorage,
        EnhancedSRStorage,
        SecondaryCaptureImageStorage,
    )

    return [ComprehensiveSRStorage, EnhancedSRStorage, SecondaryCaptureImageStorage]


class DimseSender:
    """C-STORE SCU to the destination: one association per delivery round."""

    def __init__(self, calling_ae: str, dest: Destination) -> None:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        self.dest = dest
        self.ae = AE(ae_title=calling_ae)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 30
        for uid in result_contexts():
            self.ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def __call__(self, files: list[Path]) -> int:
        """Send ``files`` in order, removing each accepted one; returns how many were sent.

        Raises:
            DeliveryError: The destination is unreachable, refuses the association or a file.
        """
        import pydicom

        assoc = self.ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "is unreachable"
            raise DeliveryError(f"destination {self.dest} {why}")
        sent = 0
        try:
            for f in files:
                ds = pydicom.dcmread(f)
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code not in _ACCEPTED_STORE:
                    what = "no response" if code is None else f"status 0x{code:04X}"
                    raise DeliveryError(f"destination {self.dest} refused {f.name}: {what}")
                f.unlink(missing_ok=True)
                sent += 1
        finally:
            if assoc.is_established:
                assoc.release()
        return sent


class Listener:
    """The receiver: SCP + scoring worker + forwarder (``start``/``stop``, or ``serve``)."""

    def __init__(self, predictor: Predictor, state_dir: str | Path, config: ListenConfig) -> None:
        config.validate()
        self.config = config
        self.scorer = PacsScorer(
            predictor, state_dir, cam_method=config.cam_method, retention_s=config.retention_s
        )
        self._queue: queue.Queue[Path] = queue.Queue()
        self._pending = 0
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name="xraycls-scorer", daemon=True)
        self._server: Any = None
        self.forwarder: Forwarder | None = None
        if config.dest is not None:
            dest = Destination.parse(config.dest)
            self.forwarder = Forwarder(
                self.scorer.pending_results,
                DimseSender(config.ae_title, dest),
                describe=f"destination {dest}",
                max_backoff_s=config.retry_max_s,
                on_delivered=self._delivered,
            )

    @property
    def stats(self) -> PacsStats:
        return self.scorer.stats

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): with port 0 the system picked one."""
        host, port = self._server.server_address[:2]
        return host, port

    def start(self) -> None:
        """Queue the backlog of an earlier run, then start receiving, scoring and forwarding."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        for p in self.scorer.backlog():
            self._enqueue(p)
        if self._pending:
            log.info("resuming: %d received image(s) still to score", self._pending)
        ae = AE(ae_title=self.config.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(self.config.allow)
        self._ae = ae
        self._worker.start()
        if self.forwarder is not None:
            self.forwarder.start()
        self._server = ae.start_server(
            (self.config.bind, self.config.port),
            block=False,
            ssl_context=_server_ssl(self.config),
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda e: SUCCESS)],
        )
        host, port = self.address
        log.info(
            "listening as %s on %s:%d%s; accepting %s; results to %s",
            self.config.ae_title,
            host,
            port,
            " (TLS)" if self.config.tls_cert else "",
            ", ".join(self.config.allow),
            self.config.dest or "the outbox only (no destination)",
        )

    def serve(self) -> None:
        """Run until interrupted (Ctrl-C or SIGTERM), then stop cleanly."""
        import signal

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.is_set():
                time.sleep(60 if self.config.retention_hours else 1)
                self.scorer.sweep()
        except KeyboardInterrupt:
            log.info("stopping")
        finally:
            self.stop()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop receiving, finish the batch being scored, try to deliver once, and close."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(timeout)
        if self.forwarder is not None:
            self.forwarder.stop()
            self.forwarder.deliver_once()
        self.scorer.close()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every received image is scored and (with a destination) delivered."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                busy = self._pending > 0
            if not busy and (self.forwarder is None or not self.scorer.pending_results()):
                return True
            if self.forwarder is not None:
                self.forwarder.wake()
            time.sleep(0.1)
        return False

    # ------------------------------------------------------------------ receiving

    def _enqueue(self, path: Path) -> bool:
        with self._lock:
            if path.stem in self._queued:
                return False
            self._queued.add(path.stem)
            self._pending += 1
        self._queue.put(path)
        return True

    def _on_store(self, event: Any) -> Any:
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        key = instance_key(sop_uid)
        calling = event.assoc.requestor.ae_title
        try:
            ds = event.dataset
            modality = str(ds.get("Modality", "") or "")
            has_pixels = "PixelData" in ds
        except Exception as e:  # a data set pynetdicom cannot decode
            log.warning("refused %s from %s: cannot decode the data set (%s)", key, calling, e)
            return _status(CANNOT_UNDERSTAND, "cannot decode the data set")
        if modality not in IMAGE_MODALITIES or not has_pixels:
            self.scorer.stats.refused += 1
            log.info(
                "refused %s from %s: not a chest radiograph (Modality %s)",
                key,
                calling,
                modality or "missing",
            )
            return _status(
                SOP_CLASS_NOT_SUPPORTED,
                f"xraycls scores {'/'.join(sorted(IMAGE_MODALITIES))} images only",
            )
        if self.scorer.is_scored(sop_uid):
            self.scorer.stats.duplicates += 1
            log.info("duplicate %s from %s: already scored, not scored again", key, calling)
            return SUCCESS
        path = self.scorer.received_path(sop_uid)
        with self._lock:
            queued = key in self._queued
            full = not queued and self._pending >= self.config.queue_size
        if queued:
            self.scorer.stats.duplicates += 1
            return SUCCESS  # already on disk and waiting for the scorer
        if full:
            self.scorer.stats.refused += 1
            log.warning("refused %s from %s: queue full (%d waiting)", key, calling, self._pending)
            return _status(OUT_OF_RESOURCES, "queue full; send again later")
        try:
            write_bytes_atomic(path, event.encoded_dataset())
        except OSError as e:
            self.scorer.stats.refused += 1
            log.error("refused %s from %s: %s", key, calling, describe_os_error(e, "cannot store"))
            return _status(OUT_OF_RESOURCES, "cannot store the image (disk full?)")
        self.scorer.stats.received += 1
        self._enqueue(path)
        log.info("received %s from %s", key, calling)
        return SUCCESS

    # ------------------------------------------------------------------ scoring

    def _work(self) -> None:
        delay = 1.0
        while True:
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < self.config.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = [p for p in batch if p.exists() or self._forget(p)]
            if not batch:
                continue
            try:
                self.scorer.score(batch)
            except OSError as e:
                log.error(
                    "%s; retrying in %.0f s", describe_os_error(e, "cannot record results"), delay
                )
                for p in batch:
                    self._queue.put(p)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, self.config.retry_max_s)
                continue
            except Exception:
                log.exception(
                    "scoring failed for a batch of %d; they stay queued on disk", len(batch)
                )
                for p in batch:
                    self._forget(p)
                continue
            delay = 1.0
            for p in batch:
                self._forget(p)
            if self.forwarder is not None:
                self.forwarder.wake()

    def _forget(self, path: Path) -> bool:
        with self._lock:
            if path.stem in self._queued:
                self._queued.discard(path.stem)
                self._pending -= 1
        return False

    def _delivered(self, n: int) -> None:
        self.scorer.stats.delivered += n
        log.info("delivered %d result file(s) to %s", n, self.config.dest)


def _status(code: int, comment: str) -> Dataset:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
