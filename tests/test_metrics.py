"""Metrics against scikit-learn, hand-computed examples and published reference numbers."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from xraycls.evaluation.metrics import (
    BootstrapSkipWarning,
    binary_metrics_at,
    bootstrap_ci,
    brier,
    classification_metrics,
    delong_test,
    ece,
    nll,
    threshold_for,
)

# Six binary predictions: top-label confidence and whether the argmax is right.
#   p(pos)  label  conf  correct
#   0.90    1      0.90  yes
#   0.80    0      0.80  no
#   0.30    0      0.70  yes
#   0.65    1      0.65  yes
#   0.45    1      0.55  no
#   0.95    1      0.95  yes
P_POS = np.array([0.9, 0.8, 0.3, 0.65, 0.45, 0.95])
Y = np.array([1, 0, 0, 1, 1, 1])
PROBS = np.column_stack([1 - P_POS, P_POS])


def test_ece_equal_width_hand_example() -> None:
    # 5 bins (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]; 0.80 sits in (.6,.8] (right-closed).
    #   (.4,.6]: {.55 wrong}            conf .55,          acc 0    gap .55   weight 1/6
    #   (.6,.8]: {.80 w, .70 c, .65 c}  conf 2.15/3,       acc 2/3  gap .05   weight 3/6
    #   (.8,1]:  {.90 c, .95 c}         conf .925,         acc 1    gap .075  weight 2/6
    # ECE = (.55 + .15 + .15) / 6 = .85 / 6; MCE = .55
    e, m = ece(PROBS, Y, n_bins=5)
    assert e == pytest.approx(0.85 / 6)
    assert m == pytest.approx(0.55)


def test_ece_equal_mass_hand_example() -> None:
    # 2 bins of 3 by sorted confidence:
    #   {.55 w, .65 c, .70 c}: conf 1.9/3,  acc 2/3 -> gap .1/3
    #   {.80 w, .90 c, .95 c}: conf 2.65/3, acc 2/3 -> gap .65/3
    # ECE = (.1/3 + .65/3) / 2 = .125; MCE = .65/3
    e, m = ece(PROBS, Y, n_bins=2, adaptive=True)
    assert e == pytest.approx(0.125)
    assert m == pytest.approx(0.65 / 3)


def test_ece_single_bin_is_the_overall_gap_and_perfect_is_zero() -> None:
    e, m = ece(PROBS, Y, n_bins=1)
    assert e == m == pytest.approx(abs(4 / 6 - PROBS.max(1).mean()))
    onehot = np.eye(3)[[0, 1, 2, 1]]
    assert ece(onehot, np.array([0, 1, 2, 1])) == (0.0, 0.0)


def test_brier_and_nll_match_scikit_learn() -> None:
    assert brier(PROBS, Y) == pytest.approx(brier_score_loss(Y, P_POS))
    assert nll(PROBS, Y) == pytest.approx(log_loss(Y, P_POS))
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=50)
    y = rng.integers(0, 3, 50)
    onehot = np.eye(3)[y]
    assert brier(p, y) == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    assert nll(p, y) == pytest.approx(-np.mean(np.log(p[np.arange(50), y])))
    # A class absent from the labels still keeps its column.
    y01 = y % 2
    assert nll(p, y01) == pytest.approx(-np.mean(np.log(p[np.arange(50), y01])))


def test_classification_metrics_binary_adds_ppv_npv_and_calibration() -> None:
    # Argmax calls positive: 0.9 (TP), 0.8 (FP), 0.65 (TP), 0.95 (TP); negative: 0.3 (TN), 0.45 (FN)
    m = classification_metrics(PROBS, Y, ["NORMAL", "PNEUMONIA"])
    assert m["ppv"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(1 / 2)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["brier"] == pytest.approx(brier_score_loss(Y, P_POS))
    assert m["nll"] == pytest.approx(log_loss(Y, P_POS))
    assert m["ece"] == pytest.approx(ece(PROBS, Y)[0])
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, P_POS))


def test_classification_metrics_float32_softmax_does_not_warn() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (200, 3)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's "do not sum to one" check must pass
        m = classification_metrics(p, rng.integers(0, 3, 200), ["a", "b", "c"])
    assert {"brier", "nll", "ece", "per_class"} <= set(m)


def test_binary_metrics_at_matches_scikit_learn() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p = np.clip(0.3 * y + rng.random(300) * 0.7, 0, 1)
    t = 0.5
    pred = (p >= t).astype(int)
    m = binary_metrics_at(p, y, t)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert m["ppv"] == pytest.approx(precision_score(y, pred))
    assert m["npv"] == pytest.approx(precision_score(y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["tp"] + m["fp"] + m["tn"] + m["fn"] == 300
    # Nothing called positive: PPV is undefined, not 0.
    assert math.isnan(binary_metrics_at(p, y, 2.0)["ppv"])


def test_threshold_for_reaches_the_target_and_is_the_extreme_one() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    p = np.round(1 / (1 + np.exp(-(1.5 * y - 0.75 + rng.normal(0, 1, 400)))), 2)  # ties too
    scores = np.unique(p)
    for value in (0.8, 0.9, 0.95, 1.0):
        t = threshold_for(p, y, target="sensitivity", value=value)
        assert binary_metrics_at(p, y, t)["sensitivity"] >= value
        higher = scores[scores > t]
        if len(higher):  # the next threshold up misses the target
            assert binary_metrics_at(p, y, higher[0])["sensitivity"] < value
    for value in (0.8, 0.9, 0.95):
        t = threshold_for(p, y, target="specificity", value=value)
        assert binary_metrics_at(p, y, t)["specificity"] >= value
        lower = scores[scores < t]
        assert binary_metrics_at(p, y, lower[-1])["specificity"] < value
    t = threshold_for(p, y, target="youden")
    j = [binary_metrics_at(p, y, s) for s in scores]
    best = max(m["sensitivity"] + m["specificity"] for m in j)
    m = binary_metrics_at(p, y, t)
    assert m["sensitivity"] + m["specificity"] == pytest.approx(best)
    with pytest.raises(ValueError, match="value"):
        threshold_for(p, y, target="sensitivity")


def test_bootstrap_ci_contains_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    p = 1 / (1 + np.exp(-(y + rng.normal(0, 1, 300))))

    def auc(probs: np.ndarray, labels: np.ndarray) -> float:
        return roc_auc_score(labels, probs)

    est, lo, hi = bootstrap_ci(auc, p, y, n_boot=200, seed=7)
    assert est == pytest.approx(roc_auc_score(y, p))
    assert lo < est < hi and hi - lo < 0.2
    assert bootstrap_ci(auc, p, y, n_boot=200, seed=7) == (est, lo, hi)
    assert bootstrap_ci(auc, p, y, n_boot=200, seed=8) != (est, lo, hi)
    # Stratified: every resample keeps the number of positives.
    k = float(y.sum())
    assert bootstrap_ci(lambda _p, lab: lab.sum(), p, y, n_boot=50) == (k, k, k)


def test_bootstrap_ci_resamples_patients_whole() -> None:
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 5, 80)  # 1-4 images per patient
    groups = np.repeat([f"p{i}" for i in range(80)], sizes)
    y = np.repeat(rng.integers(0, 2, 80), sizes)
    y[0] = 1 - y[0]  # a patient with mixed labels
    index = np.arange(len(y), dtype=np.float64)
    whole: list[bool] = []

    def record(probs: np.ndarray, labels: np.ndarray) -> float:
        times = np.bincount(probs.astype(int), minlength=len(y))
        # Every image of a patient appears as often as the patient was drawn.
        whole.append(all(len(set(times[groups == g])) == 1 for g in np.unique(groups)))
        return float(labels.mean())

    bootstrap_ci(record, index, y, groups=groups, n_boot=30, seed=0)
    assert len(whole) == 31 and all(whole)


def test_bootstrap_ci_is_wider_when_duplicated_images_are_clustered() -> None:
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 150)
    p = 1 / (1 + np.exp(-(y + rng.normal(0, 1.5, 150))))
    y4, p4, g4 = np.repeat(y, 4), np.repeat(p, 4), np.repeat(np.arange(150), 4)

    def auc(probs: np.ndarray, labels: np.ndarray) -> float:
        return roc_auc_score(labels, probs)

    _, lo_img, hi_img = bootstrap_ci(auc, p4, y4, n_boot=200, seed=0)
    _, lo_pat, hi_pat = bootstrap_ci(auc, p4, y4, groups=g4, n_boot=200, seed=0)
    _, lo_one, hi_one = bootstrap_ci(auc, p, y, n_boot=200, seed=0)
    # Four copies of an image carry the information of one: clustering restores the width
    # the single copies give; treating copies as independent shrinks it by about 2.
    assert hi_pat - lo_pat > 1.5 * (hi_img - lo_img)
    assert hi_pat - lo_pat == pytest.approx(hi_one - lo_one, rel=0.3)


def test_bootstrap_ci_skips_undefined_resamples_and_says_so() -> None:
    y = np.array([0, 1] * 20)
    p = np.linspace(0, 1, 40)

    def sometimes(probs: np.ndarray, labels: np.ndarray) -> float:
        return float("nan") if probs.mean() > 0.5 else float(probs.mean())

    with pytest.warns(BootstrapSkipWarning, match=r"\d+ of 100 bootstrap resamples skipped"):
        _, lo, hi = bootstrap_ci(sometimes, p, y, n_boot=100)
    assert lo <= hi <= 0.5
    with pytest.raises(ValueError, match="undefined on the full data"):
        bootstrap_ci(lambda a, b: float("nan"), p, y, n_boot=10)


# --- DeLong -----------------------------------------------------------------------------------

# pROC's aSAH data set (Turck et al. 2010, Intensive Care Med 36:107-115; shipped with the R
# package pROC): 113 patients with aneurysmal subarachnoid haemorrhage, outcome "Poor" = 1
# (41 patients). wfns is a 5-level ordinal score, so it exercises ties.
ASAH_POOR = [
    0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0,
    0, 0, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0,
    0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0,
    0,
]  # fmt: skip
ASAH_S100B = [
    0.13, 0.14, 0.1, 0.04, 0.13, 0.1, 0.47, 0.16, 0.18, 0.1, 0.12, 0.1, 0.44, 0.71,
    0.04, 0.08, 0.49, 0.04, 0.07, 0.33, 0.09, 0.09, 0.07, 0.11, 0.07, 0.17, 0.07, 0.11,
    0.13, 0.19, 0.05, 0.16, 0.41, 0.14, 0.34, 0.35, 0.48, 0.09, 0.96, 0.25, 0.5, 0.46,
    0.16, 0.07, 0.43, 0.45, 0.11, 0.08, 0.09, 0.86, 0.52, 0.08, 0.06, 0.13, 2.07, 0.1,
    0.14, 0.15, 0.07, 0.06, 0.77, 0.05, 0.09, 0.3, 0.03, 0.09, 0.04, 0.23, 0.7, 0.09,
    0.27, 0.71, 0.08, 0.26, 0.08, 0.16, 0.09, 0.13, 0.1, 0.08, 0.11, 0.33, 0.11, 0.28,
    0.07, 0.1, 0.32, 0.22, 0.07, 0.05, 0.24, 0.38, 0.1, 0.15, 0.08, 0.14, 0.1, 0.07,
    0.04, 0.19, 0.56, 0.14, 0.58, 0.32, 0.82, 0.74, 0.15, 0.47, 0.17, 0.44, 0.15, 0.5,
    0.48,
]  # fmt: skip
ASAH_WFNS = [
    1, 1, 1, 1, 3, 2, 5, 4, 1, 2, 5, 2, 5, 5, 1, 2, 5, 2, 2, 5, 2, 1, 1, 1, 1, 2, 1, 2,
    1, 1, 3, 4, 2, 1, 4, 5, 4, 1, 4, 2, 5, 5, 1, 1, 2, 4, 1, 1, 2, 5, 5, 2, 1, 2, 5, 1,
    2, 2, 2, 1, 5, 1, 1, 2, 5, 2, 1, 4, 5, 2, 4, 4, 1, 4, 1, 2, 1, 4, 2, 1, 2, 3, 2, 4,
    2, 1, 4, 5, 1, 1, 5, 4, 2, 2, 1, 1, 1, 3, 1, 2, 5, 2, 2, 5, 5, 5, 2, 4, 4, 5, 1, 1,
    1,
]  # fmt: skip
ASAH_NDKA = [
    3.01, 8.54, 8.09, 10.42, 17.4, 12.75, 6.0, 13.2, 15.54, 6.01, 15.96, 17.86, 5.18,
    8.9, 13.41, 20.75, 11.6, 16.11, 32.37, 54.82, 32.41, 49.94, 40.34, 9.47, 6.29,
    12.53, 6.54, 6.3, 80.3, 12.8, 9.8, 9.81, 9.85, 18.21, 5.03, 14.04, 21.93, 8.02,
    7.42, 8.38, 6.59, 9.63, 13.12, 7.96, 14.34, 41.43, 7.63, 7.06, 12.59, 13.56, 3.87,
    9.44, 7.66, 12.98, 419.19, 27.19, 22.27, 9.95, 21.22, 11.73, 10.4, 58.83, 6.39,
    11.09, 12.22, 13.67, 17.21, 22.63, 12.9, 9.7, 21.57, 8.23, 72.57, 15.54, 10.51,
    10.6, 14.57, 5.19, 9.63, 4.61, 21.48, 17.3, 12.71, 9.44, 11.07, 19.46, 10.83, 5.37,
    11.97, 7.75, 9.83, 10.55, 28.49, 8.53, 12.57, 12.9, 46.83, 11.68, 12.67, 9.01, 9.57,
    34.06, 11.72, 14.26, 47.61, 11.67, 24.58, 10.33, 13.87, 15.89, 22.43, 6.79, 13.45,
]  # fmt: skip


@pytest.mark.parametrize(
    ("a", "b", "z", "p", "ci"),
    [
        ("wfns", "s100b", 2.20898359144091, 0.0271757822291882, (0.0104061769564846, 0.174214419249478)),
        ("wfns", "ndka", 2.79777591868904, 0.00514557970691098, (0.0634011709339876, 0.3600405634833566)),
        ("ndka", "s100b", -1.39077002573558, 0.164295175223054, (-0.2876917446341914, 0.0488706064228094)),
    ],
)  # fmt: skip
def test_delong_reproduces_proc_on_asah(
    a: str, b: str, z: float, p: float, ci: tuple[float, float]
) -> None:
    """DeLong against R pROC's published results on its own aSAH data.

    Reference: pROC's test suite, ``tests/testthat/test-roc.test.R`` ("roc.test statistic and
    p are as expected with defaults"), github.com/xrobin/pROC: ``roc.test(r.wfns, r.s100b)``
    gives Z = 2.20898359144091, p = 0.0271757822291882 (the Z = -2.209, p = 0.02718 of the
    ``roc.test`` help page, with the curves swapped), 95% CI of the AUC difference
    [0.0104061769564846, 0.174214419249478]; likewise wfns vs ndka and ndka vs s100b. The AUCs
    0.7314 (s100b), 0.8237 (wfns) and 0.6120 (ndka) are pROC's documented ones.
    """
    y = np.array(ASAH_POOR)
    scores = {"s100b": ASAH_S100B, "wfns": ASAH_WFNS, "ndka": ASAH_NDKA}
    assert (len(y), int(y.sum())) == (113, 41) and all(len(s) == 113 for s in scores.values())
    r = delong_test(y, np.array(scores[a], float), np.array(scores[b], float))
    assert r["z"] == pytest.approx(z, rel=1e-9)
    assert r["p_value"] == pytest.approx(p, rel=1e-9)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(ci, rel=1e-9)
    auc = {"s100b": 0.7314, "wfns": 0.8237, "ndka": 0.6120}
    assert (r["auc_a"], r["auc_b"]) == pytest.approx((auc[a], auc[b]), abs=5e-5)


def _slow_delong(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong et al. (1988) directly: psi(x, z) = 1 if x > z, 1/2 if tied, 0 otherwise, over
    all positive-negative pairs; V10 / V01 are its row / column means."""
    v10, v01 = [], []
    for s in (a, b):
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        v10.append(psi.mean(1))
        v01.append(psi.mean(0))
    m, n = int(y.sum()), int((y == 0).sum())
    return np.mean(v10, axis=1), np.cov(v10) / m + np.cov(v01) / n


@pytest.mark.parametrize("seed", [0, 1])
def test_delong_matches_the_direct_pairwise_definition_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 211)
    a = np.round(y * 0.8 + rng.normal(0, 1, 211), 1)  # rounding: ties within and across classes
    b = np.round(0.6 * a + rng.normal(0, 0.8, 211), 1)
    r = delong_test(y, a, b)
    auc, cov = _slow_delong(y, a, b)
    assert (r["auc_a"], r["auc_b"]) == pytest.approx(tuple(auc), abs=1e-12)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert (r["var_a"], r["var_b"], r["cov_ab"]) == pytest.approx(
        (cov[0, 0], cov[1, 1], cov[0, 1]), rel=1e-10
    )
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert r["z"] == pytest.approx((auc[0] - auc[1]) / se, rel=1e-10)


def test_delong_identical_curves() -> None:
    y = np.array(ASAH_POOR)
    r = delong_test(y, np.array(ASAH_WFNS, float), np.array(ASAH_WFNS, float))
    assert (r["z"], r["p_value"], r["diff"]) == (0.0, 1.0, 0.0)


def test_basic_bootstrap_reflects_the_percentile_interval_about_the_estimate() -> None:
    from xraycls.evaluation.metrics import bootstrap_ci, ece

    rng = np.random.default_rng(0)
    p1 = rng.uniform(0.05, 0.95, 300)
    y = (rng.uniform(size=300) < p1).astype(int)
    probs = np.column_stack([1 - p1, p1])
    metric = lambda p, t: ece(p, t)[0]  # noqa: E731
    est, lo, hi = bootstrap_ci(metric, probs, y, n_boot=300, seed=1)
    est_b, lo_b, hi_b = bootstrap_ci(metric, probs, y, n_boot=300, seed=1, basic=True)
    assert est_b == est
    assert hi_b == pytest.approx(2 * est - lo) and lo_b == pytest.approx(max(0.0, 2 * est - hi))
    # Resampling inflates a binned ECE: the percentile interval sits mostly above the estimate.
    assert hi - est > est - lo
