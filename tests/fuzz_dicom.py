"""A seeded mutation harness for DICOM reading (used by ``tests/test_fuzz.py``).

Each mutant is one real DICOM file changed the way broken or hostile inputs are: truncated, bytes
flipped in the header or the pixel stream, absurd Rows/Columns/BitsAllocated/NumberOfFrames/
SamplesPerPixel, the wrong transfer syntax, NaN/inf/huge rescale, window and LUT values, odd
photometric interpretations, pixel data removed. Mutants are reproducible from ``(seed, index)``.

Each mutant is read by :func:`probe` in an isolated decoder process (``DecoderPool``), which reports
whether ``read_image`` kept its contract: an ``ImageReadError`` subclass, or a finite 2-D float32
image in [0, 1]. Anything else (another exception type, a bad array) is an *escape*.
"""

from __future__ import annotations

import io
import math
import random
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUNDLED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_rle.dcm",
    "JPEG-LL.dcm",
    "JPEG-lossy.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "SC_rgb.dcm",
    "MR_small_jp2klossless.dcm",
    "rtplan.dcm",
    "OBXXXX1A.dcm",
]
"""pydicom's bundled test files (installed with pydicom: the fast run works everywhere)."""


def bundled_corpus() -> list[Path]:
    from pydicom.data import get_testdata_file

    out = []
    for name in BUNDLED:
        p = get_testdata_file(name)
        if p is not None:
            out.append(Path(p))
    return out


def shared_corpus(root: Path) -> list[Path]:
    """Every DICOM-looking file of the shared corpus (``<shared>/dicom``), sorted."""
    files = [p for p in sorted((root / "dicom").rglob("*")) if p.is_file()]
    return [p for p in files if p.suffix.lower() in (".dcm", "") and p.stat().st_size < 32 << 20]


# --------------------------------------------------------------------------- mutations


def _dataset_mutation(edit: Callable[..., None]) -> Callable[[bytes, random.Random], bytes]:
    def mutate(data: bytes, rng: random.Random) -> bytes:
        import pydicom
        from pydicom import config

        old = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
        config.settings.reading_validation_mode = config.IGNORE
        config.settings.writing_validation_mode = config.IGNORE
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            edit(ds, rng)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=False)
            return buf.getvalue()
        finally:
            config.settings.reading_validation_mode, config.settings.writing_validation_mode = old

    mutate.__name__ = edit.__name__
    return mutate


def _pixel_offset(data: bytes) -> int:
    i = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) little-endian
    return i if i > 0 else len(data) // 2


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, max(2, len(data) - 1))]


def flip_header(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    end = max(133, _pixel_offset(data))
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(132, end)] ^= 1 << rng.randrange(8)
    return bytes(b)


def flip_pixels(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    start = min(len(b) - 1, _pixel_offset(data) + 12)
    for _ in range(rng.randint(1, 16)):
        b[rng.randrange(start, len(b))] = rng.randrange(256)
    return bytes(b)


def _set(keyword: str, values: list[object]) -> Callable[[bytes, random.Random], bytes]:
    def edit(ds: object, rng: random.Random) -> None:
        setattr(ds, keyword, rng.choice(values))

    edit.__name__ = f"set_{keyword}"
    return _dataset_mutation(edit)


def _wrong_syntax(ds: object, rng: random.Random) -> None:
    from pydicom import uid

    ds.file_meta.TransferSyntaxUID = rng.choice(  # type: ignore[attr-defined]
        [
            uid.ExplicitVRLittleEndian,
            uid.ImplicitVRLittleEndian,
            uid.ExplicitVRBigEndian,
            uid.JPEGBaseline8Bit,
            uid.JPEG2000Lossless,
            uid.JPEGLSLossless,
            uid.RLELossless,
            uid.JPEGLosslessSV1,
            "1.2.3.4.5.6.7",
        ]
    )


def _remove_pixels(ds: object, rng: random.Random) -> None:
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if kw in ds:  # type: ignore[operator]
            delattr(ds, kw)


def _bad_luts(ds: object, rng: random.Random) -> None:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.LUTDescriptor = rng.choice([[4096, 0, 16], [0, 0, 16], [2, -5, 8], [65535, 0, 99]])
    n = rng.choice([0, 1, 2, 4096])
    item.add_new((0x0028, 0x3006), "US", [rng.randrange(65536) for _ in range(n)])  # LUT Data
    setattr(ds, rng.choice(["VOILUTSequence", "ModalityLUTSequence"]), [item])


_HUGE = ["NaN", "inf", "-inf", "1e308", "-1e308", "0", "1e-320"]

MUTATIONS: list[Callable[[bytes, random.Random], bytes]] = [
    truncate,
    truncate,
    flip_header,
    flip_pixels,
    flip_pixels,
    _set("Rows", [0, 1, 3, 32768, 65535]),
    _set("Columns", [0, 1, 3, 32768, 65535]),
    _set("BitsAllocated", [0, 1, 7, 12, 32, 64, 65535]),
    _set("BitsStored", [0, 1, 17, 64, 65535]),
    _set("NumberOfFrames", [0, 2, 1000, 10**9, "-1", "abc"]),
    _set("SamplesPerPixel", [0, 2, 3, 4, 65535]),
    _set("PixelRepresentation", [1, 2, 65535]),
    _set("PlanarConfiguration", [1, 7]),
    _set("PhotometricInterpretation", ["YBR_FULL_422", "PALETTE COLOR", "RGB", "XYZ", ""]),
    _dataset_mutation(_wrong_syntax),
    _set("RescaleSlope", _HUGE),
    _set("RescaleIntercept", _HUGE),
    _set("WindowWidth", _HUGE),
    _set("WindowCenter", _HUGE),
    _dataset_mutation(_bad_luts),
    _dataset_mutation(_remove_pixels),
]


@dataclass(frozen=True)
class Mutant:
    index: int
    source: Path
    mutation: str
    data: bytes


def mutants(corpus: list[Path], n: int, seed: int) -> list[Mutant]:
    """``n`` reproducible mutants: mutant ``i`` depends only on ``(seed, i)`` and the corpus."""
    sources = {p: p.read_bytes() for p in corpus}
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        src = rng.choice(corpus)
        mutate = rng.choice(MUTATIONS)
        try:
            data = mutate(sources[src], rng)
        except Exception:  # a mutation pydicom cannot write: flip bytes instead
            mutate = flip_header
            data = flip_header(sources[src], rng)
        out.append(Mutant(i, src, mutate.__name__, data))
    return out


# --------------------------------------------------------------------------- probing


def probe(path: str) -> tuple[str, str, int]:
    """Read one file and judge the contract (runs in the decoder process).

    Returns:
        ``(outcome, detail, maxrss_kib)``: ``ok`` (a valid image, detail its shape), ``error``
        (an ``ImageReadError``, detail its code), ``escape`` (anything else: detail says what).
    """
    from xraycls.errors import ImageReadError
    from xraycls.io.read import read_image

    try:
        img = read_image(path)
    except ImageReadError as e:
        result = ("error", e.code)
    except BaseException as e:
        result = ("escape", f"{type(e).__module__}.{type(e).__name__}: {str(e)[:200]}")
    else:
        px = img.pixels
        if not isinstance(px, np.ndarray) or px.ndim != 2 or px.dtype != np.float32:
            result = ("escape", f"not a 2-D float32 array: {getattr(px, 'shape', None)}")
        elif not math.isfinite(float(px.sum(dtype=np.float64))):
            result = ("escape", "non-finite pixels returned as a valid image")
        elif px.size and (float(px.min()) < 0.0 or float(px.max()) > 1.0):
            result = ("escape", f"pixels outside [0, 1]: {px.min()}..{px.max()}")
        else:
            result = ("ok", "x".join(map(str, px.shape)))
    return (*result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
