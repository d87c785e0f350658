"""Fault injection for decoder processes (tests only).

Activated by ``XRAYCLS_DECODER_FAULT_HOOK=faults:inject`` with this folder on ``PYTHONPATH``;
:mod:`xraycls.io.isolate` calls :func:`inject` in the decoder process with each task's path,
before the file is decoded. A file whose name or content holds a marker then misbehaves the way
real codecs were seen to: a native abort (SIGABRT, as python-gdcm's C++ exceptions do), a
segfault, a hang, an allocation past the memory cap, or a Rust-style panic (a ``BaseException``
that is not an ``Exception``, like pyo3's ``PanicException``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

MARKERS = {
    "abort": b"XRAYCLS-FAULT-ABORT",
    "segv": b"XRAYCLS-FAULT-SEGV",
    "hang": b"XRAYCLS-FAULT-HANG",
    "oom": b"XRAYCLS-FAULT-OOM",
    "panic": b"XRAYCLS-FAULT-PANIC",
}


class FakePanic(BaseException):
    """Stands in for ``pyo3_runtime.PanicException`` (derives from BaseException)."""


def _marked(path: str) -> str | None:
    p = Path(path)
    content = b""
    try:
        if p.is_file():
            content = p.read_bytes()
    except OSError:
        pass
    for kind, marker in MARKERS.items():
        if marker in content or marker.decode() in p.name:
            return kind
    return None


def inject(path: str) -> None:
    kind = _marked(path)
    if kind == "abort":
        os.abort()
    if kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "hang":
        time.sleep(3600)
    if kind == "oom":
        _ = bytearray(64 * 1024**3)  # past any sane cap: MemoryError under RLIMIT_AS
    if kind == "panic":  # inside the codec, as pylibjpeg-rle's panics are: once, then restored
        import pydicom.pixels

        original = pydicom.pixels.pixel_array

        def panicking(*args: object, **kwargs: object) -> object:
            pydicom.pixels.pixel_array = original
            raise FakePanic("called `Option::unwrap()` on a `None` value")

        pydicom.pixels.pixel_array = panicking


def with_marker(data: bytes, kind: str) -> bytes:
    """``data`` with a fault marker appended (after the data set: pydicom ignores trailing bytes
    of a file it has parsed, so the file stays a valid image in an unhooked process)."""
    return data + MARKERS[kind]
