"""``xraycls predict --dicomweb URL``: score new chest studies straight from a DICOMweb archive.

QIDO-RS finds studies with a CR or DX series (one query per modality: archives such as Orthanc
do not all accept a list in ``ModalitiesInStudy``) since a date, WADO-RS retrieves each instance
not scored yet (in its stored transfer syntax, ``*``), the batch scorer scores it into the state
folder (:mod:`xraycls.inference.pacs`), and STOW-RS stores the SR and overlay Secondary Capture
back into the archive, in the image's study. Results the archive did not accept stay in the outbox
and are sent first by the next run; instances already scored are not retrieved again.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xraycls.errors import ConfigError
from xraycls.inference.pacs import (
    DeliveryError,
    Forwarder,
    PacsScorer,
    PacsStats,
    deliver_with_retries,
    instance_key,
)
from xraycls.io.dicom_results import IMAGE_MODALITIES
from xraycls.io.files import write_bytes_atomic

if TYPE_CHECKING:
    from xraycls.inference.predictor import Predictor

log = logging.getLogger("xraycls.dicomweb")

_SOP = "00080018"
_SERIES = "0020000E"
_STUDY = "0020000D"


@dataclass
class DicomwebSummary:
    """What a DICOMweb run did."""

    studies: int
    instances: int
    already: int
    stats: PacsStats
    stored: int
    out: Path

    def line(self) -> str:
        s = self.stats
        codes = ", ".join(f"{n} {c}" for c, n in sorted(s.errors_by_code.items()))
        return (
            f"{self.studies} studies, {self.instances} CR/DX instances: {s.scored} scored, "
            f"{s.errors} error{f' ({codes})' if codes else ''}, {self.already} already scored; "
            f"{self.stored} result objects stored -> {self.out}"
        )


def normalise_url(url: str) -> str:
    """``dicomweb://host:port/path`` -> ``http://host:port/path`` (``dicomwebs://`` -> https).

    Raises:
        ConfigError: Not an http(s) or dicomweb(s) URL.
    """
    m = re.fullmatch(r"(dicomwebs?|https?)://(.+)", url.strip())
    if not m:
        raise ConfigError(f"--dicomweb {url!r}: expected http(s)://HOST[:PORT]/PATH")
    scheme = {"dicomweb": "http", "dicomwebs": "https"}.get(m.group(1), m.group(1))
    return f"{scheme}://{m.group(2).rstrip('/')}"


def _value(record: dict[str, Any], tag: str) -> str:
    values = record.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _since(since: str | None) -> dict[str, str]:
    if since is None:
        return {}
    if not re.fullmatch(r"\d{8}", since):
        raise ConfigError(f"--since {since!r}: expected a date as YYYYMMDD")
    return {"StudyDate": f"{since}-"}


def score_dicomweb(
    url: str,
    out: str | Path,
    *,
    run: str | Path | Predictor,
    since: str | None = None,
    modalities: tuple[str, ...] = tuple(sorted(IMAGE_MODALITIES)),
    batch_size: int = 8,
    cam_method: str = "gradcam",
    device: str = "auto",
    store: bool = True,
    attempts: int = 4,
    client: Any = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DicomwebSummary:
    """Find, retrieve, score and store back the archive's new chest images.

    Args:
        url: The DICOMweb service root (``http://host:8042/dicom-web`` or ``dicomweb://...``).
        out: The state folder (results.csv, received images, outbox).
        run: A run bundle folder or a loaded :class:`Predictor`.
        since: Only studies from this date on (YYYYMMDD).
        modalities: Which series to score.
        batch_size: Images per model batch.
        cam_method: The overlay's CAM method.
        device: ``auto``, ``cpu``, ``cuda``, ...
        store: STOW the results back (else they wait in the outbox).
        attempts: STOW attempts (with backoff) before giving up for this run.
        client: A ``dicomweb_client.DICOMwebClient`` (default: one for ``url``).
        on_progress: Called with (done, total) instances.

    Raises:
        ConfigError: Bad URL or date.
        ScoreError, BundleError: The state folder or the bundle cannot be used.
        DeliveryError: The archive cannot be queried, or did not accept the results after
            ``attempts`` (they stay in the outbox).
    """
    import pydicom
    from requests import RequestException

    from xraycls.inference.predictor import Predictor

    filters = _since(since)
    if client is None:
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(normalise_url(url))
    predictor = run if isinstance(run, Predictor) else Predictor.from_run(run, device=device)
    scorer = PacsScorer(predictor, out, cam_method=cam_method, retention_s=0.0)
    forwarder = Forwarder(
        scorer.pending_results,
        _stow_sender(client),
        describe=f"STOW-RS {url}",
        on_delivered=lambda n: setattr(scorer.stats, "delivered", scorer.stats.delivered + n),
    )
    try:
        if store and scorer.pending_results():
            deliver_with_retries(forwarder, attempts=attempts)  # an earlier run's results first
        try:
            todo, studies, already = _find(client, modalities, filters, scorer)
        except RequestException as e:
            raise DeliveryError(f"{url}: QIDO-RS query failed: {e}") from e
        done = 0
        if on_progress:
            on_progress(done, len(todo))
        for start in range(0, len(todo), batch_size):
            paths = []
            for study, series, sop in todo[start : start + batch_size]:
                try:
                    ds = client.retrieve_instance(
                        study, series, sop, media_types=(("application/dicom", "*"),)
                    )
                except RequestException as e:
                    raise DeliveryError(f"{url}: WADO-RS retrieval failed: {e}") from e
                buf = io.BytesIO()
                pydicom.dcmwrite(buf, ds, enforce_file_format=True)
                paths.append(write_bytes_atomic(scorer.received_path(sop), buf.getvalue()))
            scorer.score(paths)
            done += len(paths)
            if on_progress:
                on_progress(done, len(todo))
            if store:
                forwarder.deliver_once()  # failures are retried below
        if store:
            deliver_with_retries(forwarder, attempts=attempts)
        return DicomwebSummary(
            studies=studies,
            instances=len(todo) + already,
            already=already,
            stats=scorer.stats,
            stored=scorer.stats.delivered,
            out=scorer.state,
        )
    finally:
        scorer.close()


PAGE = 500


def _query(search: Callable[..., list[dict[str, Any]]], key: str, **kw: Any) -> list[dict]:
    """All records of a QIDO search, page by page. Not ``get_remaining``: an archive that ignores
    ``offset`` (Orthanc's plugin 1.7 does) would make it loop forever; a page that brings nothing
    new ends the paging here."""
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    offset = 0
    while True:
        page = search(limit=PAGE, offset=offset, **kw)
        new = [r for r in page if _value(r, key) not in seen]
        for r in new:
            seen.add(_value(r, key))
        records.extend(new)
        if len(page) < PAGE or not new:
            return records
        offset += len(page)


def _find(
    client: Any, modalities: tuple[str, ...], filters: dict[str, str], scorer: PacsScorer
) -> tuple[list[tuple[str, str, str]], int, int]:
    """(study, series, sop) of the instances to score, the number of studies and of instances
    already scored."""
    studies: list[str] = []
    for m in modalities:  # one query per modality (see the module docstring)
        for rec in _query(
            client.search_for_studies, _STUDY, search_filters={"ModalitiesInStudy": m, **filters}
        ):
            uid = _value(rec, _STUDY)
            if uid and uid not in studies:
                studies.append(uid)
    todo: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    already = 0
    for study in studies:
        for m in modalities:
            for series_rec in _query(
                client.search_for_series,
                _SERIES,
                study_instance_uid=study,
                search_filters={"Modality": m},
            ):
                series = _value(series_rec, _SERIES)
                for rec in _query(
                    client.search_for_instances,
                    _SOP,
                    study_instance_uid=study,
                    series_instance_uid=series,
                ):
                    sop = _value(rec, _SOP)
                    if not sop or sop in seen:
                        continue
                    seen.add(sop)
                    if scorer.is_scored(sop):
                        already += 1
                    else:
                        todo.append((study, series, sop))
    log.info(
        "%d studies, %d instances to score, %d already scored", len(studies), len(todo), already
    )
    return todo, len(studies), already


def _stow_sender(client: Any) -> Callable[[list[Path]], int]:
    def send(files: list[Path]) -> int:
        import pydicom
        from requests import RequestException

        by_study: dict[str, list[tuple[Path, Any]]] = {}
        for f in files:
            ds = pydicom.dcmread(f)
            by_study.setdefault(str(ds.StudyInstanceUID), []).append((f, ds))
        sent = 0
        for study, entries in by_study.items():
            try:
                client.store_instances([ds for _, ds in entries], study_instance_uid=study)
            except RequestException as e:
                raise DeliveryError(f"STOW-RS failed for study {instance_key(study)}: {e}") from e
            for f, _ in entries:
                f.unlink(missing_ok=True)
                sent += 1
        return sent

    return send
