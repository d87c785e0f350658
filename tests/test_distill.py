"""Distillation: the loss functions against hand-computed values, and `xraycls distill` end to
end on a generated set (a valid, scorable bundle; teacher logits cached; clear errors)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tests.conftest import write_square_dataset
from xraycls.cli import app
from xraycls.training.distill import (
    DistillLoss,
    LogitCache,
    distill_loss_sigmoid,
    distill_loss_softmax,
)

REPO = Path(__file__).resolve().parents[1]
LN3 = math.log(3.0)

# ------------------------------------------------------------------- softmax loss


def test_softmax_loss_matches_hand_computed_value() -> None:
    # Teacher logits (ln 3, 0) at T=1 give p_t = (0.75, 0.25); the student's (0, 0) give
    # (0.5, 0.5). KL(p_t || p_s) = 0.75 ln 1.5 + 0.25 ln 0.5; CE(s, y) = ln 2 for any y.
    s = torch.zeros(1, 2)
    t = torch.tensor([[LN3, 0.0]])
    y = torch.tensor([1])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got = distill_loss_softmax(s, t, y, T=1.0, alpha=0.25)
    assert float(got) == pytest.approx(0.25 * kl + 0.75 * math.log(2.0), rel=1e-6)
    # At T=2: p_t = softmax(ln3/2, 0) = (sqrt3, 1)/(sqrt3 + 1); the soft term is T^2 = 4 x KL.
    a = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
    kl2 = a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a))
    got2 = distill_loss_softmax(s, t, y, T=2.0, alpha=1.0)
    assert float(got2) == pytest.approx(4.0 * kl2, rel=1e-6)


def test_softmax_limits_alpha_zero_and_identical_logits() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.tensor([0.5, 1.0, 2.0])
    plain = F.cross_entropy(s, y, weight=w, label_smoothing=0.1)
    got = distill_loss_softmax(s, t, y, T=3.0, alpha=0.0, weight=w, label_smoothing=0.1)
    assert torch.equal(got, plain)
    # Identical logits: the soft term vanishes at any temperature.
    assert float(distill_loss_softmax(s, s.clone(), y, T=4.0, alpha=1.0)) == pytest.approx(
        0.0, abs=1e-6
    )
    # The module form wraps the run's hard loss the same way.
    module = DistillLoss(torch.nn.CrossEntropyLoss(weight=w), temperature=3.0, alpha=0.6)
    assert torch.allclose(
        module(s, y, t), distill_loss_softmax(s, t, y, T=3.0, alpha=0.6, weight=w)
    )


def _grad(fn, s: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    s = s.clone().requires_grad_(True)
    fn(s).backward()
    assert s.grad is not None
    return s.grad


def test_softmax_gradient_keeps_its_scale_across_temperatures() -> None:
    # d/ds [T^2 KL] = T (p_s - p_t) / N -> (s - t - mean(s - t)) / (C N) for large T: the T^2
    # factor makes the soft gradient independent of T (without it, it would shrink as 1/T).
    s = torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]])
    t = torch.tensor([[1.0, 0.0, -1.0], [-0.5, 0.2, 0.6]])
    y = torch.tensor([0, 1])
    d = s - t
    limit = (d - d.mean(dim=1, keepdim=True)) / (3 * 2)
    for T in (20.0, 50.0):
        grad = _grad(lambda x: distill_loss_softmax(x, t, y, T=T, alpha=1.0), s)  # noqa: B023
        assert torch.allclose(grad, limit, atol=0.02 * float(limit.abs().max()))
    g10 = _grad(lambda x: distill_loss_softmax(x, t, y, T=10.0, alpha=1.0), s)
    g40 = _grad(lambda x: distill_loss_softmax(x, t, y, T=40.0, alpha=1.0), s)
    assert float(g10.norm() / g40.norm()) == pytest.approx(1.0, abs=0.05)
    # No gradient flows into the teacher.
    tt = t.clone().requires_grad_(True)
    distill_loss_softmax(s.clone().requires_grad_(True), tt, y, T=2.0, alpha=0.5).backward()
    assert tt.grad is None


# ------------------------------------------------------------------- sigmoid loss


def test_sigmoid_loss_matches_hand_computed_value_and_masks_uncertain_labels() -> None:
    # One image, two findings; student logits 0 (p = 0.5), teacher (ln 3, 0) (p = 0.75, 0.5).
    s = torch.zeros(1, 2)
    t = torch.tensor([[LN3, 0.0]])
    y = torch.tensor([[1.0, -1.0]])  # second finding uncertain (CheXpert's -1)
    mask = torch.tensor([[1.0, 0.0]])
    binary_kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    soft = (binary_kl + 0.0) / 2  # mean over both findings; the second matches exactly
    hard = math.log(2.0)  # BCE(0, 1) on the one known label only
    got = distill_loss_sigmoid(s, t, y, mask, T=1.0, alpha=0.4)
    assert float(got) == pytest.approx(0.4 * soft + 0.6 * hard, rel=1e-6)
    # alpha=0 is the plain masked BCE; the masked entry's target does not matter.
    other = torch.tensor([[1.0, 1.0]])
    assert float(distill_loss_sigmoid(s, t, other, mask, T=1.0, alpha=0.0)) == pytest.approx(hard)
    g = _grad(lambda x: distill_loss_sigmoid(x, t, y, mask, T=1.0, alpha=0.0), s)
    assert float(g[0, 1]) == 0.0 and float(g[0, 0]) == pytest.approx(-0.5)
    # pos_weight scales the positive term of the hard loss, as in BCEWithLogits.
    pw = torch.tensor([3.0, 1.0])
    got_pw = distill_loss_sigmoid(s, t, y, mask, T=1.0, alpha=0.0, pos_weight=pw)
    assert float(got_pw) == pytest.approx(3.0 * hard)


def test_sigmoid_limits_identical_logits_and_gradient_scale() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 5, generator=g)
    y = (torch.rand(4, 5, generator=g) > 0.5).float()
    assert float(distill_loss_sigmoid(s, s.clone(), y, None, T=3.0, alpha=1.0)) == pytest.approx(
        0.0, abs=1e-6
    )
    plain = F.binary_cross_entropy_with_logits(s, y)
    assert float(distill_loss_sigmoid(s, s + 1, y, None, T=3.0, alpha=0.0)) == pytest.approx(
        float(plain), rel=1e-6
    )
    # d/ds [T^2 KL_binary] = T (sigmoid(s/T) - sigmoid(t/T)) / (N K) -> (s - t) / (4 N K).
    t = torch.randn(4, 5, generator=g)
    limit = (s - t) / (4 * 20)
    grad = _grad(lambda x: distill_loss_sigmoid(x, t, y, None, T=50.0, alpha=1.0), s)
    assert torch.allclose(grad, limit, atol=0.01 * float(limit.abs().max()))


# ------------------------------------------------------------------- cache


def test_logit_cache_round_trip_and_unreadable_file(tmp_path: Path) -> None:
    cache = LogitCache(tmp_path / "c", "k")
    assert cache.load() == {}
    rows = {"a" * 64: np.array([1.0, -1.0], np.float32), "b" * 64: np.array([0.5, 2.0])}
    cache.save(rows)
    back = cache.load()
    assert sorted(back) == sorted(rows)
    assert np.allclose(back["b" * 64], [0.5, 2.0])
    cache.path.write_bytes(b"not an npz")
    assert cache.load() == {}  # recomputed, not a crash


# ------------------------------------------------------------------- end to end

runner = CliRunner()
TINY = [
    "model.image_size=64",
    "data.limit=null",
    "cv.folds=2",
    "train.batch_size=8",
    "train.stages=[{epochs: 1, train: all, lr: 0.002}]",
]


@pytest.fixture(scope="module")
def square_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_square_dataset(tmp_path_factory.mktemp("squares"), n=32, size=64)


@pytest.fixture(scope="module")
def teacher(square_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    args = ["train", "--config", str(REPO / "configs" / "smoke.yaml"), "--out", str(out)]
    overrides = [f"data.labels={square_set}", "model.name=maxvit_test", *TINY]
    result = runner.invoke(app, args + [a for o in overrides for a in ("--set", o)])
    assert result.exit_code == 0, result.output
    return out


def _distill(teacher: Path, labels: Path, out: Path, *extra: str) -> object:
    overrides = [
        f"data.labels={labels}",
        "model.name=resnet50_test",
        *TINY,
        "model.image_size=32",  # the student works at half the teacher's input size
        *extra,
    ]
    args = ["distill", "--teacher", str(teacher), "--config", str(REPO / "configs" / "smoke.yaml")]
    return runner.invoke(
        app, args + ["--out", str(out)] + [a for o in overrides for a in ("--set", o)]
    )


def test_distill_end_to_end_bundle_is_scorable_and_teacher_logits_are_cached(
    teacher: Path, square_set: Path, tmp_path: Path
) -> None:
    student = tmp_path / "student"
    result = _distill(teacher, square_set, student)
    assert result.exit_code == 0, result.output
    metrics = json.loads((student / "metrics.json").read_text())
    d = metrics["distillation"]
    assert d["teacher_model"] == "maxvit_test" and d["teacher_image_size"] == 64
    assert d["out_of_fold_honest"] is True and d["alpha"] == 0.7
    computed = {k: v["computed"] for k, v in d["teacher_logits"].items()}
    assert set(computed) == {"fold0", "fold1"} and all(n > 0 for n in computed.values())
    bundle = json.loads((student / "bundle.json").read_text())
    assert (bundle["model"], bundle["image_size"]) == ("resnet50_test", 32)
    assert "## Distillation" in (student / "MODEL_CARD.md").read_text()
    assert (student / "calibration.json").exists()
    # Each student fold learned from the teacher's model of the same fold: the cache holds one
    # file per teacher fold model, with exactly that fold's training images.
    folds = {r["path"]: r["fold"] for r in csv.DictReader((teacher / "folds.csv").open())}
    caches = sorted((teacher / "teacher_logits").glob("*.npz"))
    assert [c.name.split("-")[0] for c in caches] == ["fold0", "fold1"]
    for k, c in enumerate(caches):
        assert len(np.load(c)["files"]) == sum(f not in (str(k), "holdout") for f in folds.values())
    mtimes = [c.stat().st_mtime_ns for c in caches]

    # `xraycls predict` scores images with the student bundle.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for image in sorted(square_set.parent.glob("img00*.png"))[:4]:
        shutil.copy(image, inputs / image.name)
    scored = tmp_path / "scored.csv"
    args = ["predict", str(inputs), "--run", str(student), "--out", str(scored), "--workers", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(scored.open()))
    assert len(rows) == 4
    assert all(0.0 <= float(r["prob_square"]) <= 1.0 for r in rows)

    # A second student of the same teacher: every teacher logit comes from the cache.
    again = tmp_path / "student2"
    result = _distill(teacher, square_set, again, "distill.alpha=0.5", "distill.temperature=2")
    assert result.exit_code == 0, result.output
    d2 = json.loads((again / "metrics.json").read_text())["distillation"]
    assert all(v["computed"] == 0 and v["cached"] > 0 for v in d2["teacher_logits"].values())
    assert [c.stat().st_mtime_ns for c in caches] == mtimes


def _said(result: object, text: str) -> bool:
    """Whether the command's output says ``text`` (rich wraps long lines)."""
    return text in " ".join(result.output.split())  # type: ignore[attr-defined]


def test_distill_refuses_incompatible_teachers(
    teacher: Path, square_set: Path, tmp_path: Path
) -> None:
    result = _distill(tmp_path / "nowhere", square_set, tmp_path / "s0")
    assert result.exit_code == 2 and _said(result, "no such run folder")
    # Different classes: the same images, relabelled.
    relabelled = square_set.parent / "relabelled.csv"
    text = square_set.read_text().replace(",square,", ",dot,")
    relabelled.write_text(text)
    result = _distill(teacher, relabelled, tmp_path / "s1")
    assert result.exit_code == 2 and _said(result, "classes") and _said(result, "differ")
    # A different seed draws other folds (and another holdout, which trained the teacher).
    result = _distill(teacher, square_set, tmp_path / "s2", "seed=5")
    assert result.exit_code == 2 and _said(result, "trained the teacher")
    result = _distill(teacher, square_set, tmp_path / "s3", "cv.folds=3")
    assert result.exit_code == 2 and _said(result, "the teacher has 2 folds")
    # A teacher whose recorded fold assignment disagrees with the student's for one image.
    moved = tmp_path / "moved"
    shutil.copytree(teacher, moved, ignore=shutil.ignore_patterns("teacher_logits"))
    rows = list(csv.DictReader((moved / "folds.csv").open()))
    first = next(r for r in rows if r["fold"] == "0")
    first["fold"] = "1"
    with (moved / "folds.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "patient_id", "fold"])
        w.writeheader()
        w.writerows(rows)
    result = _distill(moved, square_set, tmp_path / "s4")
    assert result.exit_code == 2 and _said(result, "fold assignment differs for 1 of")
    # ensemble mode accepts it (no fold pairing), and says its OOF metrics are optimistic.
    result = _distill(moved, square_set, tmp_path / "s5", "distill.teacher_model=ensemble")
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / "s5" / "metrics.json").read_text())["distillation"]
    assert d["out_of_fold_honest"] is False


# ------------------------------------------------------------------- multi-label (sigmoid form)


def test_multilabel_student_learns_from_a_multilabel_teacher(tmp_path: Path) -> None:
    """The sigmoid form end to end: a multi-label teacher teaches a smaller multi-label student
    fold by fold; the student is an ordinary multi-label bundle; a one-class teacher is refused."""
    from tests.conftest import multilabel_overrides, write_findings_dataset

    labels = write_findings_dataset(tmp_path / "findings")
    smoke = str(REPO / "configs" / "smoke.yaml")
    base = [*multilabel_overrides(labels), "train.stages=[{epochs: 1, train: all, lr: 3.0e-3}]"]

    def sets(overrides: list[str]) -> list[str]:
        return [a for o in overrides for a in ("--set", o)]

    teacher = tmp_path / "teacher"
    result = runner.invoke(app, ["train", "--config", smoke, "--out", str(teacher), *sets(base)])
    assert result.exit_code == 0, result.output
    student = tmp_path / "student"
    args = ["distill", "--teacher", str(teacher), "--config", smoke, "--out", str(student)]
    result = runner.invoke(app, [*args, *sets([*base, "model.image_size=32"])])
    assert result.exit_code == 0, result.output
    metrics = json.loads((student / "metrics.json").read_text())
    d = metrics["distillation"]
    assert d["out_of_fold_honest"] is True
    assert all(v["computed"] > 0 for v in d["teacher_logits"].values())
    labels_json = json.loads((student / "labels.json").read_text())
    assert labels_json.get("task") == "multilabel"
    # Teacher logits are per finding: one column per finding in every cached file.
    for cache in (teacher / "teacher_logits").glob("*.npz"):
        assert np.load(cache)["logits"].shape[1] == len(labels_json["classes"])

    # A one-class student cannot learn from a multi-label teacher: refused before training.
    square = write_square_dataset(tmp_path / "squares", n=32, size=64)
    args = ["distill", "--teacher", str(teacher), "--config", smoke, "--out", str(tmp_path / "x")]
    result = runner.invoke(app, [*args, *sets([f"data.labels={square}", *TINY])])
    assert result.exit_code == 2
    assert _said(result, "multi-label") or _said(result, "classes")
