"""ONNX export: every family exports with a dynamic batch and onnxruntime reproduces PyTorch; a
bundle's export serves predict and the Predictor with the bundle's calibration; stale or foreign
exports are refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from xraycls.bundle.format import Bundle
from xraycls.inference.export import (
    ExportError,
    OnnxRunner,
    default_export_path,
    export_onnx,
    export_run,
    generated_images,
    sidecar_path,
)
from xraycls.inference.predictor import Predictor
from xraycls.models import create_model
from xraycls.models.weights import load_weights, normalization_for, save_weights, to_model_input

FAMILIES = ["swin_test", "maxvit_test", "vit_test", "resnet50_test"]


def _export_and_compare(name: str, tmp_path: Path, exporter: str) -> str:
    torch.manual_seed(0)
    members = [create_model(name, num_classes=3, image_size=64).eval() for _ in range(2)]
    path = tmp_path / f"{name}.onnx"
    used, opset, _ = export_onnx(
        members, path, image_size=64, opset=18, metadata={"xraycls_model": name},
        exporter=exporter,  # type: ignore[arg-type]
    )  # fmt: skip
    assert opset == 18
    proto = onnx.load(str(path))
    assert {p.key: p.value for p in proto.metadata_props}["xraycls_model"] == name
    runner = OnnxRunner(path)
    images = np.stack(generated_images(64, 5, seed=1))
    x = to_model_input(images, normalization_for(name))
    with torch.no_grad():
        expected = np.stack([m(x).numpy() for m in members])
    for n in (1, 5):  # batch sizes other than the example's (2): the batch axis is dynamic
        got = runner(x[:n].numpy())
        assert got.shape == (2, n, 3)
        np.testing.assert_allclose(got, expected[:, :n], atol=1e-4, rtol=1e-4)
    return used


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_with_a_dynamic_batch_and_matches_pytorch(
    name: str, tmp_path: Path
) -> None:
    # The TorchScript exporter: seconds per model. The dynamo exporter (the default, tried first)
    # takes ~30-80 s per tiny model on 2 shared cores: its test is marked slow.
    assert _export_and_compare(name, tmp_path, "torchscript") == "torchscript"


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_exports_with_the_dynamo_exporter(name: str, tmp_path: Path) -> None:
    assert _export_and_compare(name, tmp_path, "auto") == "dynamo"


class _Eig(torch.nn.Module):
    """Complex eigenvalues: no ONNX operator computes them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x.mean(1)[:, :4, :4]).abs()


def test_an_unexportable_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as e:
        export_onnx([_Eig()], tmp_path / "eig.onnx", image_size=32, exporter="torchscript")
    msg = str(e.value)
    assert "_Eig cannot be exported to ONNX (opset 18)" in msg and "linalg_eigvals" in msg
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_an_unexportable_model_names_why_each_exporter_failed(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as e:
        export_onnx([_Eig()], tmp_path / "eig.onnx", image_size=32)
    msg = str(e.value)
    assert "dynamo: " in msg and "No ONNX function found" in msg and "linalg_eig" in msg
    assert "torchscript: UnsupportedOperatorError" in msg and "\x1b[" not in msg


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(tiny_run, run)
    export_run(run, members="folds", exporter="torchscript")
    return run


def test_export_records_identity_opset_exporter_and_verification(exported: Path) -> None:
    path = exported / "export" / "folds.onnx"
    side = json.loads(sidecar_path(path).read_text())
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    for key in ("xraycls_bundle_id", "xraycls_weights_sha256", "xraycls_configuration"):
        assert meta[key] == side["metadata"][key] and meta[key]
    assert meta["xraycls_configuration"] == "folds" and meta["xraycls_members"] == "2"
    assert side["opset"] == 18 and side["exporter"] == "torchscript"
    v = side["verification"]
    # The tiny run's holdout images exist on disk, so real files were verified on too.
    assert v["n_real_images"] >= 1 and v["n_images"] == 4 + v["n_real_images"]
    assert v["decisions_equal"] and v["max_abs_logit_diff"] < 1e-4
    assert side["input"]["shape"][0] == "batch" and side["output"]["shape"][1] == 2


def test_onnx_predictor_gives_the_pytorch_predictions_with_the_bundle_calibration(
    exported: Path,
) -> None:
    ref = Predictor.from_run(exported, device="cpu")
    onx = Predictor.from_run(exported, device="cpu", backend="onnx")
    assert onx.backend == "onnx" and onx._models is None  # no PyTorch weights loaded yet
    assert onx.calibrated and onx.threshold == ref.threshold
    assert onx.describe()["backend"] == "onnx" and "backend" not in ref.describe()
    pixels = generated_images(ref.prep.image_size, 6, seed=3)
    for a, b in zip(ref.predict(pixels), onx.predict(pixels), strict=True):
        np.testing.assert_allclose(b.probs, a.probs, atol=1e-5)
        np.testing.assert_allclose(b.member_probs, a.member_probs, atol=1e-5)
        assert a.predicted == b.predicted
    # Grad-CAM stays PyTorch: asking for it loads the weights.
    from xraycls.inference.cam import explain_pixels

    cam = explain_pixels(onx, pixels[:1], target=0)
    assert onx._models is not None and len(onx.models) == 2
    assert cam[0].heatmap.shape == (ref.prep.image_size, ref.prep.image_size)


def test_an_export_of_other_weights_or_a_missing_one_is_refused(
    exported: Path, tmp_path: Path
) -> None:
    run = tmp_path / "retrained"
    shutil.copytree(exported, run)
    with pytest.raises(
        ExportError, match=r"no ONNX export of the refit configuration.*xraycls export"
    ):
        Predictor.from_run(run, members="refit", backend="onnx")
    fold0 = run / "fold0" / "weights.safetensors"
    state = load_weights(fold0)
    state["head.bias"] = state["head.bias"] + 1.0
    save_weights(fold0, state)
    with pytest.raises(ExportError, match=r"another weights sha256.*re-export"):
        Predictor.from_run(run, members="folds", backend="onnx")


def test_export_options_are_checked(exported: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--format 'tflite'"):
        export_run(exported, fmt="tflite")
    with pytest.raises(ExportError, match=r"--out .*must end in \.onnx"):
        export_run(exported, out=tmp_path / "model.bin")
    with pytest.raises(ExportError, match="--verify-on: no such file"):
        export_run(exported, out=tmp_path / "m.onnx", verify_on=[tmp_path / "nope.png"])
    with pytest.raises(ExportError, match="--opset 99"):
        export_run(exported, out=tmp_path / "m.onnx", opset=99)


def test_cli_export_then_predict_with_the_onnx_backend_matches_torch(
    tiny_run: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from xraycls.cli import app

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "export", ignore_errors=True)
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["export", str(run), "--format", "onnx", "--members", "refit", "--exporter", "torchscript"],
    )
    assert res.exit_code == 0, res.output
    assert "opset 18" in res.output and "decisions identical" in res.output
    assert default_export_path(Bundle.read(run), "refit").is_file()
    with (run / "oof_predictions.csv").open() as f:
        images = [Path(r["path"]) for _, r in zip(range(6), csv.DictReader(f), strict=False)]
    src = tmp_path / "src"
    src.mkdir()
    for p in images:
        shutil.copy(p, src / p.name)
    rows = {}
    for backend in ("torch", "onnx"):
        out = tmp_path / f"{backend}.csv"
        res = runner.invoke(
            app,
            ["predict", str(src), "--run", str(run), "--out", str(out), "--members", "refit",
             "--backend", backend, "--workers", "0", "--device", "cpu"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        with out.open() as f:
            rows[backend] = {r["path"]: r for r in csv.DictReader(f)}
    assert rows["torch"].keys() == rows["onnx"].keys() and len(rows["torch"]) == len(images)
    for path, a in rows["torch"].items():
        b = rows["onnx"][path]
        assert a["status"] == b["status"] == "ok" and a["predicted"] == b["predicted"]
        for col in (c for c in a if c.startswith("prob_")):
            assert abs(float(a[col]) - float(b[col])) < 1e-5
    bad = runner.invoke(
        app, ["predict", str(src), "--run", str(run), "--out", str(tmp_path / "x.csv"),
              "--backend", "onnx", "--members", "folds"],
    )  # fmt: skip
    assert bad.exit_code == 2 and "xraycls export" in bad.output


def test_verified_on_real_radiographs(exported: Path, tmp_path: Path) -> None:
    from tests.conftest import shared_data_dir

    labels = shared_data_dir() / "cxr-pneumonia-224" / "labels.csv"
    if not labels.is_file():
        pytest.skip(f"shared pediatric CXR set not found at {labels.parent} (XRAYCLS_SHARED_DATA)")
    with labels.open() as f:
        files = [
            labels.parent / r["path"] for _, r in zip(range(8), csv.DictReader(f), strict=False)
        ]
    result = export_run(
        exported, out=tmp_path / "real.onnx", verify_on=files, n_real=0, exporter="torchscript"
    )
    v = result.verification
    assert v.n_real_images == 8 and v.decisions_equal and v.max_abs_logit_diff < 1e-4


def test_viewer_offers_the_onnx_export_and_still_explains_with_pytorch(
    exported: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    import streamlit as st
    from PIL import Image
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("XRAYCLS_RUNS", str(exported.parent))
    monkeypatch.setenv("XRAYCLS_DEVICE", "cpu")
    monkeypatch.setattr("sys.argv", ["streamlit_app.py"])
    st.cache_resource.clear()
    st.cache_data.clear()
    repo = Path(__file__).resolve().parents[1]
    at = AppTest.from_file(str(repo / "app" / "streamlit_app.py"), default_timeout=120).run()
    assert not at.exception
    radio = at.radio(key=f"backend::{exported}::folds")
    assert radio.options == ["PyTorch", "ONNX export (onnxruntime, CPU)"]
    radio.set_value("onnx").run()
    buf = io.BytesIO()
    Image.fromarray((generated_images(64, 1)[0] * 255).astype(np.uint8)).save(buf, "PNG")
    at.file_uploader(key="uploads").set_value([("g.png", buf.getvalue(), "image/png")]).run()
    assert not at.exception
    assert any("Grad-CAM from the PyTorch weights" in c.value for c in at.sidebar.caption)
    report = json.loads(at.json[0].value)
    assert report["model"]["backend"] == "onnx"
    assert any(c.startswith("Grad-CAM overlay") for img in at.image for c in img.captions)
