"""``xraycls compare`` for multi-label runs: per finding, every run beside the floor.

Every number comes from the runs' pooled out-of-fold predictions (uncalibrated sigmoids), with
unknown labels left out of each finding: per-finding AUROC with a 95% patient-level bootstrap
interval, AUPRC and ECE; the macro AUROC with its interval; each run against the baseline and
against its own 32x32 floor, per finding by paired DeLong (image level) and for the macro
AUROC by a paired patient-level bootstrap of the difference. No correction for multiple
comparisons is applied: the report says how many tests it shows.
"""

from __future__ import annotations

import math
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from xraycls.bundle.format import BundleError, OutOfFold
from xraycls.evaluation.metrics import (
    auroc,
    bootstrap_ci,
    delong_test,
    macro_auroc,
    multilabel_bootstrap_ci,
    multilabel_metrics,
    sigmoid,
)
from xraycls.io.files import json_safe, write_json_atomic, write_text_atomic

FLOOR = "floor (LR on 32x32 pixels, per finding)"


def compare_findings(
    runs: list[tuple[str, Path, OutOfFold]],
    out: Path,
    *,
    baseline: str | None = None,
    n_boot: int = 1000,
    log: Any = print,
) -> dict[str, Any]:
    """The multi-label comparison report (``report.md``, ``report.json`` in ``out``).

    Raises:
        BundleError: The runs do not share images, findings and labels.
    """
    _, dir0, first = runs[0]
    for _, d, oof in runs[1:]:
        if oof.classes != first.classes:
            raise BundleError(
                f"{d}: findings {oof.classes} differ from {dir0}'s {first.classes}; "
                "compare runs of the same task only"
            )
        if sorted(oof.paths) != sorted(first.paths):
            raise BundleError(f"{d}: its out-of-fold images differ from {dir0}'s")
    order = sorted(first.paths)
    aligned = [(n, d, o.aligned(order)) for n, d, o in runs]
    ref = aligned[0][2]
    y, groups, findings = ref.labels, ref.groups, ref.classes
    for _, d, o in aligned[1:]:
        if not np.array_equal(o.labels, y, equal_nan=True):
            raise BundleError(f"{d}: same images as {dir0} but different finding labels")
    names = [n for n, _, _ in aligned]
    base = baseline if baseline in names else names[0]
    probs = {n: sigmoid(o.logits) for n, _, o in aligned}
    floors = {n: o.floor for n, _, o in aligned}
    rows = []
    entries = [(n, probs[n], floors[n]) for n in names]
    if floors[base] is not None:
        entries.append((FLOOR, floors[base], None))
    for name, p, floor in entries:
        log(f"compare: {name}")
        m = multilabel_metrics(p, y, findings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v, lo, hi = multilabel_bootstrap_ci(macro_auroc, p, y, groups=groups, n_boot=n_boot)
        row: dict[str, Any] = {
            "name": name,
            "macro_auroc": {"value": v, "low": lo, "high": hi},
            "micro_auroc": m["auroc_micro"],
            "macro_auprc": m["auprc"],
            "macro_ece": m["ece"],
            "per_finding": {f: _finding(p, y, groups, j, n_boot) for j, f in enumerate(findings)},
        }
        if name != FLOOR and name != base:
            row["vs_baseline"] = _paired(p, probs[base], y, groups, n_boot)
        if floor is not None:
            row["vs_floor"] = _paired(p, floor, y, groups, n_boot)
        rows.append(row)
    report = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": "multilabel",
        "findings": findings,
        "n_images": len(y),
        "n_patients": len(np.unique(groups)),
        "positives": {f: int(np.nansum(y[:, j])) for j, f in enumerate(findings)},
        "baseline": base,
        "n_boot": n_boot,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", json_safe(report))
    write_text_atomic(out / "report.md", render_findings(report, [str(d) for _, d, _ in runs]))
    log(f"compare: {len(runs)} multi-label runs + floor -> {out / 'report.md'}")
    return report


def _finding(
    p: np.ndarray, y: np.ndarray, groups: np.ndarray, j: int, n_boot: int
) -> dict[str, float]:
    known = ~np.isnan(y[:, j])
    pj, yj = p[known, j], y[known, j].astype(np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v, lo, hi = bootstrap_ci(auroc, pj, yj, groups=groups[known], n_boot=n_boot)
        except ValueError:
            v, lo, hi = math.nan, math.nan, math.nan
    return {"auroc": v, "low": lo, "high": hi, "positives": int(yj.sum()), "n": len(yj)}


def _paired(
    a: np.ndarray, b: np.ndarray, y: np.ndarray, groups: np.ndarray, n_boot: int
) -> dict[str, Any]:
    """Macro AUROC difference a - b (paired patient bootstrap) and per-finding DeLong."""
    k = a.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d, lo, hi = multilabel_bootstrap_ci(
            lambda pq, yy: macro_auroc(pq[:, :k], yy) - macro_auroc(pq[:, k:], yy),
            np.hstack([a, b]),
            np.hstack([y, y]),
            groups=groups,
            n_boot=n_boot,
        )
    per = {}
    for j in range(k):
        known = ~np.isnan(y[:, j])
        try:
            t = delong_test(y[known, j].astype(int), a[known, j], b[known, j])
            per[j] = {"diff": t["diff"], "p_value": t["p_value"]}
        except ValueError:
            per[j] = {"diff": math.nan, "p_value": math.nan}
    return {"macro_diff": {"value": d, "low": lo, "high": hi}, "per_finding": per}


def _n(v: Any, digits: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not math.isfinite(f) else f"{f:.{digits}f}"


def _ci(d: dict[str, float] | None) -> str:
    if not d:
        return "n/a"
    return f"{_n(d.get('value', d.get('auroc')))} [{_n(d.get('low'))}, {_n(d.get('high'))}]"


def render_findings(report: dict[str, Any], run_dirs: list[str]) -> str:
    """``report.md`` of a multi-label comparison."""
    findings, rows = report["findings"], report["rows"]
    names = [r["name"] for r in rows]
    lines = [
        "# Multi-label comparison (pooled out-of-fold, uncalibrated sigmoids)",
        "",
        f"{report['n_images']} images of {report['n_patients']} patients, "
        f"{len(findings)} findings; baseline `{report['baseline']}`. Runs: "
        + ", ".join(f"`{d}`" for d in run_dirs)
        + f". 95% intervals: patient-level bootstrap ({report['n_boot']}); per-finding p-values:"
        " paired DeLong, image level, uncorrected.",
        "",
        "| run | macro AUROC | micro AUROC | macro AUPRC | macro ECE | vs floor (macro) | "
        "vs baseline (macro) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vf = (r.get("vs_floor") or {}).get("macro_diff")
        vb = (r.get("vs_baseline") or {}).get("macro_diff")
        lines.append(
            f"| {r['name']} | {_ci(r['macro_auroc'])} | {_n(r['micro_auroc'])} | "
            f"{_n(r['macro_auprc'])} | {_n(r['macro_ece'])} | {_ci(vf)} | {_ci(vb)} |"
        )
    lines += [
        "",
        "## AUROC per finding",
        "",
        "| finding | positives | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for j, f in enumerate(findings):
        cells = []
        for r in rows:
            cell = _ci(r["per_finding"][f])
            vs = (r.get("vs_floor") or {}).get("per_finding", {}).get(j) or (
                r.get("vs_floor") or {}
            ).get("per_finding", {}).get(str(j))
            if vs:
                cell += f" (vs floor p {_n(vs['p_value'], 3)})"
            cells.append(cell)
        lines.append(f"| {f} | {report['positives'][f]} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])
