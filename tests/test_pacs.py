"""DICOM results (SR + Secondary Capture), ``xraycls listen`` and the DICOMweb path, against real
servers on loopback: a pynetdicom destination, and Debian's Orthanc (skipped where absent)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from xraycls.inference.listen import (
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    ListenConfig,
    Listener,
    load_listen_config,
)
from xraycls.inference.outputs import algorithm_of
from xraycls.inference.predictor import Predictor
from xraycls.io.dicom_results import (
    CAPTION,
    Algorithm,
    Finding,
    read_sr_findings,
    write_results,
)

pynetdicom = pytest.importorskip("pynetdicom", reason="the pacs extra (pynetdicom) is needed")

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-0042-SECRET"
ACCESSION = "ACC-777-SECRET"
CHEST_FILES = ("RG1_UNCR.dcm", "RG1_J2KI.dcm", "siim_fake_MONOCHROME1.dcm")
"""Three distinct instances in two studies: uncompressed, JPEG 2000 (lossy) and JPEG baseline
(RG1_UNCI shares its SOP Instance UID with RG1_J2KI; RG1_J2KR would only add decoding time)."""


@pytest.fixture(scope="module")
def predictor(tiny_run: Path) -> Predictor:
    return Predictor.from_run(tiny_run, device="cpu")


def make_cr(path: Path, *, seed: int, study: str | None = None, size: int = 96) -> Path:
    """A small synthetic CR image with patient identifiers (to check they never reach logs)."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime = "20250101", "101010"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    img = rng.normal(2000, 300, (size, size)).clip(0, 4095).astype(np.uint16)
    img[size // 4 : size // 2, size // 4 : size // 2] = 3900 * (seed % 2)
    ds.set_pixel_data(img, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _texts(ds: Dataset) -> list[str]:
    found: list[str] = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            found.append(str(item.TextValue))
        found.extend(_texts(item))
    return found


# --------------------------------------------------------------------------- the objects


def test_sr_and_sc_are_valid_standard_objects_in_the_source_study(tmp_path: Path) -> None:
    src = make_cr(tmp_path / "src.dcm", seed=1)
    source = pydicom.dcmread(src)
    algo = Algorithm("xraycls resnet50_test", "9.9.9", "feedc0ffee123456", 0.37, True)
    findings = [Finding("NORMAL", 0.25, False), Finding("PNEUMONIA", 0.75, True)]
    rgb = np.full((source.Rows, source.Columns, 3), 120, dtype=np.uint8)
    objs = write_results(
        src,
        findings,
        algo,
        sr_path=tmp_path / "o.sr.dcm",
        sc_path=tmp_path / "o.sc.dcm",
        overlay=rgb,
        lines=["P(PNEUMONIA)=0.750"],
    )
    assert objs.sc is not None
    sr, sc = pydicom.dcmread(objs.sr), pydicom.dcmread(objs.sc)
    assert (
        sr.SOPClassUID == ComprehensiveSRStorage and sc.SOPClassUID == SecondaryCaptureImageStorage
    )
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.PatientID == PATIENT_ID  # the results belong to the patient's record
    assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
    assert read_sr_findings(sr) == {"NORMAL": (0.25, False), "PNEUMONIA": (0.75, True)}
    texts = " ".join(_texts(sr))
    assert "bundle=feedc0ffee123456" in texts and "threshold=0.37" in texts
    assert "xraycls resnet50_test" in texts and "9.9.9" in texts
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    ref = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sc.BurnedInAnnotation == "YES" and CAPTION.split(" -")[0].lower() in (
        sc.SeriesDescription.lower()
    )
    pixels = sc.pixel_array
    assert pixels.shape == rgb.shape
    band = pixels[:4]
    assert (band == 0).all()  # the caption band is black ...
    top = pixels[: pixels.shape[0] // 3].astype(int)
    yellow = (top[..., 0] > 128) & (top[..., 1] > 128) & (top[..., 2] < 64)
    assert yellow.sum() > 20  # ... with yellow text on it
    np.testing.assert_array_equal(pixels[-10:], rgb[-10:])  # the image below is untouched
    # Same source, same bundle: the same instances (an archive stores them once).
    again = write_results(
        src,
        findings,
        algo,
        sr_path=tmp_path / "b.sr.dcm",
        sc_path=tmp_path / "b.sc.dcm",
        overlay=rgb,
    )
    assert pydicom.dcmread(again.sr).SOPInstanceUID == sr.SOPInstanceUID
    assert pydicom.dcmread(again.sc).SOPInstanceUID == sc.SOPInstanceUID
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian dicom3tools) not installed: objects not validated by it")
    assert dciodvfy_errors(objs.sr) == []
    assert dciodvfy_errors(objs.sc) == []


def test_listen_config_from_yaml_with_overrides_and_clear_errors(tmp_path: Path) -> None:
    from xraycls.errors import ConfigError

    cfg_file = tmp_path / "listen.yaml"
    cfg_file.write_text("listen:\n  ae_title: AI\n  allow: [CT1, CR2]\n  dest: PACS@pacs:104\n")
    cfg = load_listen_config(cfg_file, port=4000)
    assert (cfg.ae_title, cfg.allow, cfg.port, cfg.bind) == (
        "AI",
        ["CT1", "CR2"],
        4000,
        "127.0.0.1",
    )
    cfg_file.write_text("listen:\n  allow: [X]\n  colour: blue\n")
    with pytest.raises(ConfigError, match=r"unknown key.*colour"):
        load_listen_config(cfg_file)
    with pytest.raises(ConfigError, match="at least one calling AE"):
        load_listen_config(None)
    with pytest.raises(ConfigError, match="--dest 'PACS': expected AE@host:port"):
        load_listen_config(None, allow=["X"], dest="PACS")


# --------------------------------------------------------------------------- listen (pynetdicom)


class Sink:
    """A real C-STORE SCP on loopback standing in for the destination PACS."""

    def __init__(self, port: int, ae_title: str = "PACS") -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.received: list[Dataset] = []
        ae = AE(ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        self.received.append(event.dataset)
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


def send(port: int, files: list[Path], *, calling: str = "MODALITY", tls=None) -> list[int]:
    """C-STORE ``files`` (one context per SOP class and transfer syntax); statuses, or [] when
    the association is refused."""
    from pynetdicom import AE

    dss = [pydicom.dcmread(f) for f in files]
    ae = AE(calling)
    for cx in {(d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in dss}:
        ae.add_requested_context(cx[0], [cx[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title="XRAYCLS", tls_args=tls)
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(d).Status) for d in dss]
    finally:
        assoc.release()


def _sr_file(tmp_path: Path) -> Path:
    src = make_cr(tmp_path / "x.dcm", seed=5)
    objs = write_results(
        src, [Finding("a", 0.5, True)], Algorithm("t", "1", "b"), sr_path=tmp_path / "x.sr.dcm"
    )
    return objs.sr


def test_listen_stores_before_ack_scores_and_survives_a_dead_destination_and_restart(
    tmp_path: Path, predictor: Predictor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    images = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i) for i in range(3)]
    dest_port = free_port()  # nothing listens there yet: a dead destination
    cfg = ListenConfig(
        port=0, allow=["MODALITY"], dest=f"PACS@127.0.0.1:{dest_port}", retry_max_s=1.0
    )
    state = tmp_path / "state"
    listener = Listener(predictor, state, cfg)
    listener.start()
    try:
        port = listener.address[1]
        assert send(port, images) == [0, 0, 0]
        assert send(port, [_sr_file(tmp_path)]) == [SOP_CLASS_NOT_SUPPORTED]
        assert send(port, images[:1], calling="INTRUDER") == []  # association rejected
        deadline = time.monotonic() + 60
        while listener.stats.scored < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert listener.stats.scored == 3
        time.sleep(1.5)
        assert listener.forwarder is not None and listener.forwarder.failures >= 1
        assert "cannot deliver to destination PACS@" in caplog.text
        assert len(list((state / "outbox").glob("*.dcm"))) == 6  # 3 SR + 3 SC wait on disk
    finally:
        listener.stop()
    assert list((state / "received").glob("*.dcm")) == []  # retention 0: removed once scored
    rows = (state / "results.csv").read_text().splitlines()
    assert len(rows) == 4

    sink = Sink(dest_port)
    try:
        again = Listener(predictor, state, cfg)
        again.start()
        try:
            assert again.wait_idle(60)
            assert again.stats.scored == 0  # nothing rescored after the restart
            assert send(again.address[1], images[:1]) == [0]  # a resend is acknowledged ...
            assert again.stats.duplicates == 1 and again.stats.scored == 0  # ... not rescored
        finally:
            again.stop()
    finally:
        sink.close()
    kinds = sorted(d.Modality for d in sink.received)
    assert kinds == ["OT", "OT", "OT", "SR", "SR", "SR"]
    expected = {
        pydicom.dcmread(f).SOPInstanceUID: p
        for f, p in zip(images, predictor.predict_files(images), strict=True)
    }
    for d in sink.received:
        if d.Modality == "SR":
            ref = d.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            pred = expected[ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID]
            found = read_sr_findings(d)
            for c, p in zip(predictor.classes, pred.probs, strict=True):
                assert found[c][0] == pytest.approx(float(p), abs=1e-6)
                assert found[c][1] == (c == pred.predicted)
    assert len((state / "results.csv").read_text().splitlines()) == 4  # no duplicate rows
    for secret in (PATIENT_NAME, "Doe", PATIENT_ID, ACCESSION, "19800101"):
        assert secret not in caplog.text


def test_listen_refuses_with_out_of_resources_when_the_queue_is_full(
    tmp_path: Path, predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i) for i in range(3)]
    listener = Listener(
        predictor, tmp_path / "state", ListenConfig(port=0, allow=["MODALITY"], queue_size=1)
    )
    gate = threading.Event()
    real = listener.scorer.score

    def slow_score(paths: list[Path]) -> list[dict[str, str]]:
        gate.wait(30)  # the scorer is busy: the queue fills up
        return real(paths)

    monkeypatch.setattr(listener.scorer, "score", slow_score)
    listener.start()
    try:
        statuses = send(listener.address[1], images)
        assert statuses[0] == 0 and statuses[1:] == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
        gate.set()
        assert listener.wait_idle(60)
        for image in images[1:]:  # room again: accepted (one at a time, the queue holds one)
            assert send(listener.address[1], [image]) == [0]
            assert listener.wait_idle(60)
        assert listener.stats.scored == 3 and listener.stats.refused == 2
    finally:
        gate.set()
        listener.stop()


@pytest.mark.slow  # a fresh interpreter imports torch and loads the bundle: ~1-2 min here
def test_listen_command_scores_and_stops_cleanly_on_sigterm(tmp_path: Path, tiny_run: Path) -> None:
    import os
    import signal
    import sys

    port = free_port()
    image = make_cr(tmp_path / "in.dcm", seed=2)
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xraycls",
            "listen",
            "--run",
            str(tiny_run),
            "--out",
            str(state),
            "--port",
            str(port),
            "--allow",
            "MODALITY",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while send(port, [image]) != [0]:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "listen did not start"
            time.sleep(0.5)
        results = state / "results.csv"
        while not results.exists() or len(results.read_text().splitlines()) < 2:
            assert time.monotonic() < deadline, "not scored"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "listening as XRAYCLS on 127.0.0.1" in err and "scored " in err
    for secret in (PATIENT_NAME, "Doe", PATIENT_ID, ACCESSION):
        assert secret not in err
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "xraycls",
            "listen",
            "--run",
            str(tiny_run),
            "--out",
            str(tmp_path / "s2"),
            "--dest",
            "nonsense",
            "--allow",
            "X",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and "--dest 'nonsense': expected AE@host:port" in bad.stderr


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, to fill up (needs root, else the test skips)."""
    d = tmp_path / "small"
    d.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the file system to the last byte."""
    import os

    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1 << 10, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    return ballast


def test_listen_on_a_full_disk_refuses_then_retries_and_loses_nothing(
    small_disk: Path,
    tmp_path: Path,
    predictor: Predictor,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    images = [make_cr(tmp_path / "in" / f"{i}.dcm", seed=i) for i in range(2)]
    listener = Listener(
        predictor, small_disk / "state", ListenConfig(port=0, allow=["MODALITY"], retry_max_s=0.5)
    )
    gate = threading.Event()
    real = listener.scorer.score

    def gated(paths: list[Path]) -> list[dict[str, str]]:
        gate.wait(30)
        return real(paths)

    monkeypatch.setattr(listener.scorer, "score", gated)
    listener.start()
    try:
        port = listener.address[1]
        assert send(port, images[:1]) == [0]  # on disk, waiting for the scorer
        ballast = _fill(small_disk)
        assert send(port, images[1:]) == [OUT_OF_RESOURCES]  # cannot be stored: refused
        assert "cannot store: the disk is full" in caplog.text
        gate.set()  # the scorer cannot write the results either: it retries
        deadline = time.monotonic() + 30
        while "cannot record results: the disk is full" not in caplog.text:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert listener.stats.scored == 0
        ballast.unlink()
        assert listener.wait_idle(60) and listener.stats.scored == 1
        assert send(port, images[1:]) == [0]  # the sender's retry now succeeds
        assert listener.wait_idle(60) and listener.stats.scored == 2
    finally:
        gate.set()
        listener.stop()
    assert len(list((small_disk / "state" / "outbox").glob("*.dcm"))) == 4  # no destination


def test_received_images_are_kept_for_the_configured_retention_only(
    tmp_path: Path, predictor: Predictor
) -> None:
    from xraycls.inference.pacs import PacsScorer

    scorer = PacsScorer(predictor, tmp_path / "state", retention_s=3600.0)
    try:
        scored = make_cr(scorer.received_path("1.2.3.1"), seed=1)
        waiting = make_cr(scorer.received_path("1.2.3.2"), seed=2)
        scorer.score([scored])
        assert scorer.sweep() == 0 and scored.exists()  # within the hour: kept
        assert scorer.sweep(now=time.time() + 7200) == 1  # past it: removed ...
        assert not scored.exists() and waiting.exists()  # ... but never an unscored image
        assert scorer.backlog() == [waiting]
    finally:
        scorer.close()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    crypto = pytest.importorskip("cryptography", reason="TLS test needs cryptography")
    del crypto
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_listen_over_tls_refuses_plain_associations(tmp_path: Path, predictor: Predictor) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    cfg = ListenConfig(port=0, allow=["MODALITY"], tls_cert=str(cert), tls_key=str(key))
    listener = Listener(predictor, tmp_path / "state", cfg)
    listener.start()
    try:
        image = make_cr(tmp_path / "in.dcm", seed=3)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        assert send(listener.address[1], [image], tls=(client, "localhost")) == [0]
        assert send(listener.address[1], [image]) == []  # no TLS: no association
        assert listener.wait_idle(60) and listener.stats.scored == 1
    finally:
        listener.stop()


# --------------------------------------------------------------------------- Orthanc


def _orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (
        "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None
    )


def _dicomweb_plugin() -> str | None:
    for d in ("/usr/share/orthanc/plugins", "/usr/lib/orthanc"):
        for p in sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else []:
            return str(p)
    return None


def _die_with_parent() -> None:
    """Linux: Orthanc gets SIGTERM when the test process dies, even if it is killed."""
    import ctypes
    import signal

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Orthanc:
    """Debian's Orthanc on loopback with its own storage folder and ports."""

    def __init__(self, root: Path, *, listener_port: int) -> None:
        binary, plugin = _orthanc_binary(), _dicomweb_plugin()
        assert binary and plugin
        self.http, self.dicom = free_port(), free_port()
        storage = root / "storage"
        storage.mkdir(parents=True)
        config = {
            "Name": "xraycls-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"xraycls": ["XRAYCLS", "127.0.0.1", listener_port]},
        }
        cfg = root / "orthanc.json"
        cfg.write_text(json.dumps(config))
        self.log = (root / "orthanc.log").open("w")
        self.proc = subprocess.Popen(
            [binary, str(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                break
            except OSError as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {root / 'orthanc.log'}") from e
                time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def post(self, path: str, data: bytes, content_type: str = "application/dicom") -> object:
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": content_type}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.loads(r.read())

    def upload(self, files: list[Path]) -> list[str]:
        return [str(self.post("/instances", f.read_bytes())["ID"]) for f in files]  # type: ignore[index]

    def results(self) -> dict[str, dict[str, list[Dataset]]]:
        """Study UID -> {modality: [datasets]} of everything stored."""
        out: dict[str, dict[str, list[Dataset]]] = {}
        for iid in self.get("/instances"):  # type: ignore[union-attr]
            ds = pydicom.dcmread(__import__("io").BytesIO(self.get_bytes(f"/instances/{iid}/file")))
            out.setdefault(ds.StudyInstanceUID, {}).setdefault(ds.Modality, []).append(ds)
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def chest_files(shared_data: Path) -> list[Path]:
    files = [shared_data / "dicom" / "chest_cr" / f for f in CHEST_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        pytest.skip(f"shared chest DICOMs missing: {', '.join(missing)}")
    return files


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator:
    if _orthanc_binary() is None or _dicomweb_plugin() is None:
        pytest.skip("Debian's orthanc and orthanc-dicomweb are not installed (see .ci/run)")
    started: list[Orthanc] = []

    def start(listener_port: int = 1) -> Orthanc:
        o = Orthanc(tmp_path / f"orthanc{len(started)}", listener_port=listener_port)
        started.append(o)
        return o

    yield start
    for o in started:
        o.close()


def _expected(files: list[Path], predictor: Predictor, tmp_path: Path) -> dict[str, dict]:
    """SOP Instance UID -> the ``xraycls predict`` row of the same file with the same bundle."""
    import csv

    from xraycls.inference.scoring import score

    folder = tmp_path / "predict_in"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f.name)
    score(folder, tmp_path / "predict.csv", run=predictor, workers=0)
    with (tmp_path / "predict.csv").open() as f:
        return {r["sop_instance_uid"]: r for r in csv.DictReader(f)}


def _check_archive(
    orthanc: Orthanc, files: list[Path], expected: dict[str, dict], predictor: Predictor
) -> None:
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    stored = orthanc.results()
    algo = algorithm_of(predictor)
    for study in {s.StudyInstanceUID for s in sources}:
        in_study = [s for s in sources if s.StudyInstanceUID == study]
        srs, scs = stored[study].get("SR", []), stored[study].get("OT", [])
        assert len(srs) == len(scs) == len(in_study)  # one SR and one SC per image
        image_series = {s.SeriesInstanceUID for s in in_study}
        assert len({d.SeriesInstanceUID for d in srs}) == 1  # one new series per kind
        assert not ({d.SeriesInstanceUID for d in srs + scs} & image_series)
        for sr in srs:
            ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            sop = ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            row = expected[sop]
            found = read_sr_findings(sr)
            for c in predictor.classes:
                assert found[c][0] == pytest.approx(float(row[f"prob_{c}"]), abs=1e-6)
                assert found[c][1] == (row["predicted"] == c)
            assert f"bundle={algo.bundle_id}" in " ".join(_texts(sr))
        for sc in scs:
            src = next(
                s
                for s in in_study
                if s.SOPInstanceUID == sc.SourceImageSequence[0].ReferencedSOPInstanceUID
            )
            assert (sc.Rows, sc.Columns) == (src.Rows, src.Columns)
            assert sc.BurnedInAnnotation == "YES"


def test_orthanc_sends_to_listen_and_holds_an_sr_and_overlay_per_image(
    tmp_path: Path, predictor: Predictor, chest_files: list[Path], orthanc_factory
) -> None:
    listener_port = free_port()
    orthanc = orthanc_factory(listener_port)
    ids = orthanc.upload(chest_files)
    cfg = ListenConfig(
        port=listener_port, allow=["ORTHANC"], dest=f"ORTHANC@127.0.0.1:{orthanc.dicom}"
    )
    listener = Listener(predictor, tmp_path / "state", cfg)
    listener.start()
    try:
        # Orthanc C-STOREs its instances to the listener (as a PACS routing rule would).
        orthanc.post("/modalities/xraycls/store", json.dumps(ids).encode(), "application/json")
        assert listener.wait_idle(300)
        assert listener.stats.scored == len(chest_files) and listener.stats.errors == 0
    finally:
        listener.stop()
    expected = _expected(chest_files, predictor, tmp_path)
    _check_archive(orthanc, chest_files, expected, predictor)
    if shutil.which("dciodvfy"):
        for study in orthanc.results().values():
            for kind in ("SR", "OT"):
                for ds in study[kind]:
                    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
                    ds.save_as(path)
                    assert dciodvfy_errors(path) == [], kind


def test_dicomweb_finds_scores_and_stores_back_once(
    tmp_path: Path, predictor: Predictor, chest_files: list[Path], orthanc_factory
) -> None:
    from typer.testing import CliRunner

    from xraycls.cli import app
    from xraycls.inference.dicomweb import score_dicomweb

    orthanc = orthanc_factory()
    orthanc.upload(chest_files)
    url = f"{orthanc.url}/dicom-web"
    state = tmp_path / "state"
    none = score_dicomweb(url, tmp_path / "later", run=predictor, since="29990101")
    assert none.studies == 0 and none.stats.scored == 0
    res = CliRunner().invoke(
        app,
        [
            "predict",
            "--dicomweb",
            url.replace("http://", "dicomweb://"),
            "--run",
            str(predictor.run_dir),
            "--out",
            str(state),
            "--since",
            "19000101",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "3 CR/DX instances: 3 scored, 0 error" in res.output and "6 result objects" in res.output
    expected = _expected(chest_files, predictor, tmp_path)
    _check_archive(orthanc, chest_files, expected, predictor)
    # A second run finds the same images already scored: nothing retrieved or stored again.
    again = score_dicomweb(url, state, run=predictor)
    assert (again.already, again.stats.scored, again.stored) == (3, 0, 0)
    assert sum(len(v) for s in orthanc.results().values() for v in s.values()) == 3 + 6
