"""Reading DICOM/PNG/JPEG, on package test data (runs everywhere)."""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import pkg_file
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

from xraycls.errors import (
    CodecUnavailableError,
    ImageReadError,
    ImageTooLargeError,
    NoPixelDataError,
    NotDicomError,
    TruncatedDicomError,
    UnsupportedFormatError,
    XrayWarning,
)
from xraycls.io.dicom import hash_patient_id
from xraycls.io.image import apply_window, render
from xraycls.io.read import load_image, read_image


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------- chest CR (NEMA WG04)


def test_lossless_j2k_renders_identical_to_uncompressed() -> None:
    unc = read_image(pkg_file("RG1_UNCR.dcm"))
    j2k = read_image(pkg_file("RG1_J2KR.dcm"))
    assert unc.pixels.shape == (1955, 1841)
    assert np.array_equal(unc.pixels, j2k.pixels)


def test_monochrome1_chest_renders_bone_bright_lungs_dark() -> None:
    img = read_image(pkg_file("RG1_UNCR.dcm"))
    assert img.meta.photometric == "MONOCHROME1"
    assert img.meta.window_applied == "window 15000/30000, MONOCHROME1 inverted"
    p = img.pixels
    h, w = p.shape
    right_lung = p[int(0.30 * h) : int(0.45 * h), int(0.20 * w) : int(0.32 * w)].mean()
    left_lung = p[int(0.30 * h) : int(0.45 * h), int(0.68 * w) : int(0.80 * w)].mean()
    spine = p[int(0.30 * h) : int(0.45 * h), int(0.47 * w) : int(0.53 * w)].mean()
    assert right_lung < spine - 0.1
    assert left_lung < spine - 0.1
    assert p.dtype == np.float32 and p.min() >= 0.0 and p.max() <= 1.0


def test_monochrome1_inversion_happens_after_voi() -> None:
    raw = load_image(pkg_file("RG1_UNCR.dcm"))
    c, w = raw.meta.header_window
    expected = 1.0 - apply_window(raw.values, c, w)
    assert np.allclose(render(raw).pixels, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("photometric", "shape", "inverted"),
    [
        ("MONOCHROME2", "INVERSE", True),  # the Presentation LUT inverts the display
        ("MONOCHROME2", "IDENTITY", False),
        ("MONOCHROME1", "INVERSE", True),  # DX's required pairing: one inversion, not two
        ("MONOCHROME1", None, True),
    ],
)
def test_presentation_lut_shape_inverse_is_honoured(
    tmp_path: Path, photometric: str, shape: str | None, inverted: bool
) -> None:
    ds = pydicom.dcmread(pkg_file("CT_small.dcm"))
    ds.PhotometricInterpretation = photometric
    ds.WindowCenter, ds.WindowWidth = 40, 400
    if shape is not None:
        ds.PresentationLUTShape = shape
    path = tmp_path / "x.dcm"
    ds.save_as(path)
    raw = load_image(path)
    c, w = raw.meta.header_window
    windowed = apply_window(raw.values, c, w)
    expected = 1.0 - windowed if inverted else windowed
    assert np.allclose(render(raw).pixels, expected, atol=1e-6)
    assert ("inverted" in render(raw).meta.window_applied) == inverted


# ------------------------------------------------------------------- VOI / modality LUT


def test_voi_lut_sequence_matches_pydicom() -> None:
    path = pkg_file("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    expected = (voi - lut.min()) / (lut.max() - lut.min())
    img = read_image(path)
    assert img.meta.window_applied == "VOI LUT sequence"
    assert np.allclose(img.pixels, expected, atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_matches_pydicom_apply_windowing(function: str) -> None:
    ds = pydicom.dcmread(pkg_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 400, function
    hu = apply_modality_lut(ds.pixel_array, ds)
    theirs = apply_windowing(hu, ds)
    # pydicom's output spans the rescaled signed BitsStored range.
    y_min = -(2 ** (ds.BitsStored - 1)) * ds.RescaleSlope + ds.RescaleIntercept
    y_max = (2 ** (ds.BitsStored - 1) - 1) * ds.RescaleSlope + ds.RescaleIntercept
    ours = apply_window(hu, 40.0, 400.0, function)
    assert np.allclose(ours, (theirs - y_min) / (y_max - y_min), atol=1e-5)


def test_signed_ct_with_rescale_intercept(tmp_path: Path) -> None:
    path = pkg_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PixelRepresentation == 1 and float(ds.RescaleIntercept) == -1024
    raw = load_image(path)
    assert np.array_equal(raw.values, ds.pixel_array.astype(np.float32) - 1024)
    img = render(raw, window=(40.0, 400.0))
    hu = raw.values
    assert np.all(img.pixels[hu <= -160] == 0.0)  # below the window: black
    assert np.all(img.pixels[hu >= 240] == 1.0)  # above it: white
    # With no header VOI, auto falls back to percentile clipping.
    assert read_image(path).meta.window_applied.startswith("percentile")


def test_pixel_padding_is_black_and_excluded_from_statistics(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pkg_file("CT_small.dcm"))
    arr = ds.pixel_array.copy()
    arr[:10, :] = -2000
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = -2000
    img = read_image(_save(ds, tmp_path / "pad.dcm"), window="none")
    assert np.all(img.pixels[:10] == 0.0)
    # min-max ignores the padding: the darkest real pixel maps to 0, not to something above it.
    assert img.pixels[10:].min() == 0.0 and img.pixels[10:].max() == 1.0


def test_values_above_bits_stored_are_masked(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pkg_file("RG1_UNCR.dcm"))
    arr = ds.pixel_array[:64, :64].copy()
    ds.Rows, ds.Columns = 64, 64
    ds.PixelData = (arr | 0x8000).astype(np.uint16).tobytes()  # junk in bit 16 (BitsStored 15)
    # pydicom 3 already masks native data; _fix_bits_stored covers decoders that do not.
    raw = load_image(_save(ds, tmp_path / "highbit.dcm"))
    assert np.array_equal(raw.values, arr.astype(np.float32))


# ------------------------------------------------------------------- frames, colour, rasters


def test_multiframe_uses_first_frame_with_warning() -> None:
    path = pkg_file("emri_small.dcm")
    ds = pydicom.dcmread(path)
    with pytest.warns(XrayWarning, match="multi-frame"):
        img = read_image(path, window="none")
    first = ds.pixel_array[0].astype(np.float32)
    assert img.pixels.shape == first.shape
    assert np.allclose(img.pixels, (first - first.min()) / (first.max() - first.min()), atol=1e-6)


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "OBXXXX1A.dcm"])
def test_colour_converted_to_luminance_with_warning(name: str) -> None:
    with pytest.warns(XrayWarning, match="luminance"):
        img = read_image(pkg_file(name))
    assert img.pixels.ndim == 2


def test_png_8_and_16_bit_and_jpeg(tmp_path: Path) -> None:
    ramp16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    Image.fromarray(ramp16).save(tmp_path / "a16.png")
    img16 = read_image(tmp_path / "a16.png")
    assert img16.meta.format == "png" and img16.meta.bits_stored == 16
    assert np.allclose(img16.pixels, ramp16 / 65535.0, atol=1e-6)

    ramp8 = (ramp16 >> 8).astype(np.uint8)
    Image.fromarray(ramp8).save(tmp_path / "a8.png")
    assert np.allclose(read_image(tmp_path / "a8.png").pixels, ramp8 / 255.0, atol=1e-6)

    # A grey JPEG saved as RGB is not "colour": no warning.
    Image.fromarray(ramp8).convert("RGB").save(tmp_path / "g.jpg", quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error", XrayWarning)
        jpg = read_image(tmp_path / "g.jpg")
    assert jpg.meta.format == "jpeg" and np.abs(jpg.pixels - ramp8 / 255.0).max() < 0.05


def test_dicom_without_extension_is_read(tmp_path: Path) -> None:
    target = tmp_path / "IM0001"
    target.write_bytes(Path(pkg_file("CT_small.dcm")).read_bytes())
    assert read_image(target).meta.format == "dicom"


# ------------------------------------------------------------------- metadata and privacy


def test_metadata_and_patient_pseudonym() -> None:
    path = pkg_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    m = read_image(path).meta
    assert (m.modality, m.body_part, m.view_position) == ("CR", "CHEST", "PA")
    assert m.sop_instance_uid == ds.SOPInstanceUID
    assert m.study_instance_uid == ds.StudyInstanceUID
    assert m.original_shape == (1955, 1841)
    assert m.patient_hash == hash_patient_id(str(ds.PatientID))
    assert m.patient_hash != hash_patient_id(str(ds.PatientID), salt=b"another site")
    text = repr(m)
    assert str(ds.PatientID) not in text and str(ds.PatientName) not in text


# ------------------------------------------------------------------- errors


def test_html_named_dcm_is_not_dicom(tmp_path: Path) -> None:
    page = tmp_path / "study.dcm"
    page.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>" * 10)
    with pytest.raises(NotDicomError, match="HTML") as e:
        read_image(page)
    assert str(page) in str(e.value)


def test_unknown_format(tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(UnsupportedFormatError):
        read_image(p)


def test_no_pixel_data() -> None:
    with pytest.raises(NoPixelDataError, match="RT Plan"):
        read_image(pkg_file("rtplan.dcm"))


def test_truncated_pixel_data() -> None:
    with pytest.raises(TruncatedDicomError, match="shorter"):
        read_image(pkg_file("MR_truncated.dcm"))


def test_truncated_file(tmp_path: Path) -> None:
    data = Path(pkg_file("CT_small.dcm")).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedDicomError):
        read_image(cut)


def test_absurd_dimensions_refused_before_decoding(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pkg_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 60000
    path = _save(ds, tmp_path / "huge.dcm")
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="60000x60000"):
        read_image(path)
    assert time.perf_counter() - t0 < 1.0


def test_absurd_raster_refused(tmp_path: Path) -> None:
    Image.new("L", (400, 400)).save(tmp_path / "big.png")
    with pytest.raises(ImageTooLargeError):
        read_image(tmp_path / "big.png", max_pixels=1000)


def test_codec_unavailable_names_the_transfer_syntax(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pkg_file("JPEG-LL.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no image decoder
    path = _save(ds, tmp_path / "mpeg.dcm")
    with pytest.raises(CodecUnavailableError, match="MPEG2"):
        read_image(path)


def test_every_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "empty.dcm"
    bad.write_bytes(b"")
    with pytest.raises(ImageReadError) as e:
        read_image(bad)
    assert str(bad) in str(e.value) and e.value.code == "not_dicom"
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "missing.dcm")


def test_bytes_argument_avoids_second_read(tmp_path: Path) -> None:
    data = Path(pkg_file("CT_small.dcm")).read_bytes()
    img = read_image(tmp_path / "virtual.dcm", data=data)  # the path need not exist
    assert img.pixels.shape == (128, 128)
    assert io.BytesIO(data).getbuffer().nbytes == len(data)
