"""One preprocessing path: training, batch scoring and the viewer give bit-identical model
inputs for the same file, whether it is decoded afresh or read from a cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pkg_file

from xraycls.bundle import Bundle
from xraycls.inference.analysis import analyse
from xraycls.inference.predictor import Predictor
from xraycls.inference.rows import load_item
from xraycls.io.ingest import ingest
from xraycls.io.preprocess import ImageCache, Preprocessing, preprocess_file
from xraycls.training.config import DataConfig
from xraycls.training.data import Table, XrayDataset, load_table


@pytest.fixture(scope="module")
def predictor(tiny_run: Path) -> Predictor:
    return Predictor.from_run(tiny_run, device="cpu")


def _inputs(path: Path, predictor: Predictor, tmp_path: Path) -> dict[str, torch.Tensor]:
    prep = predictor.prep
    norm = predictor.normalization
    table = Table([str(path)], np.array([0]), np.array(["p"]), ["a", "b"])
    cache = ImageCache(tmp_path / "cache")
    preprocess_file(path, prep, cache=cache)  # fill the cache
    item = load_item(path, prep, keep_original=True)
    return {
        "training": XrayDataset(table, prep, normalization=norm)[0]["image"],
        "training, cached": XrayDataset(table, prep, cache=cache, normalization=norm)[0]["image"],
        "scoring": predictor.to_tensor([item["pixels"]])[0],
        "viewer": predictor.to_tensor(
            [analyse(predictor, path.name, path.read_bytes()).model_input]
        )[0],
    }


@pytest.mark.parametrize(
    "name",
    ["RG1_UNCI.dcm", "MR_small.dcm", "SC_rgb_small_odd.dcm"],  # 16-bit CR, signed MR, colour
)
def test_dicom_model_inputs_are_identical(name: str, predictor: Predictor, tmp_path: Path) -> None:
    inputs = _inputs(Path(pkg_file(name)), predictor, tmp_path)
    reference = inputs.pop("training")
    assert reference.shape == (3, predictor.prep.image_size, predictor.prep.image_size)
    for caller, x in inputs.items():
        assert torch.equal(x, reference), f"{caller} differs from training for {name}"


def test_png_and_ingest_manifest_inputs_are_identical(predictor: Predictor, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    png = tmp_path / "src" / "x.png"
    png.parent.mkdir()
    Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8)).save(png)
    inputs = _inputs(png, predictor, tmp_path)
    reference = inputs.pop("training")
    for caller, x in inputs.items():
        assert torch.equal(x, reference), f"{caller} differs from training"

    # Training from an ingest manifest reads the ingest cache: the same input again.
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(png.parent / "y.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,patient_id\nsrc/x.png,a,p1\nsrc/y.png,b,p2\n")
    ingest(png.parent, tmp_path / "ingested", prep=predictor.prep, labels=labels, workers=1)
    table = load_table(DataConfig(labels=tmp_path / "ingested" / "manifest.csv"), predictor.prep)
    assert table.cached and all(table.cached)  # the trainer will read the ingest cache
    row = table.paths.index(str(png))
    dataset = XrayDataset(table, predictor.prep, normalization=predictor.normalization)
    assert torch.equal(dataset[row]["image"], reference)


def test_the_bundle_decides_the_preprocessing(tiny_run: Path, predictor: Predictor) -> None:
    bundle = Bundle.read(tiny_run)
    assert predictor.prep == bundle.preprocessing
    assert predictor.normalization == bundle.normalization
    assert isinstance(bundle.preprocessing, Preprocessing)
