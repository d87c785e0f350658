"""Multi-label findings on the shared NIH ChestX-ray14 sample: per-finding OOF AUROC vs the floor.

Trains (or reads) a multi-label run and compares, finding by finding, the pooled out-of-fold
AUROC of its fold models with the baseline run in the same folds: the 32x32 logistic-regression
floor (one per finding), which every run fits on its own folds. Reports the paired DeLong
p-value per finding (image level, uncorrected), the macro/micro AUROC with the patient-level
bootstrap interval, and the served fold ensemble's per-finding calibration on the holdout.
A published anchor row is printed beside them, marked as not comparable: CheXNet (DenseNet-121,
ImageNet-pretrained, ~112k images, official split) against 621 images here.

Usage: python benchmarks/bench_multilabel.py --config configs/nih_multilabel.yaml
       --out runs/nih_multilabel [--json docs/bench_multilabel_nih.json] [--set key=value ...]
       (an existing finished --out is read, not retrained; an unfinished one is resumed)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

ANCHORS = [
    {
        "name": "CheXNet (Rajpurkar et al. 2017): DenseNet-121, ImageNet-pretrained",
        "data": "ChestX-ray14 official split, ~112k images (98k training), 1024->224 px",
        "macro_auroc": 0.841,
        "comparable": False,
    },
    {
        "name": "Wang et al. 2017 (ChestX-ray8/14 baseline): ResNet-50, ImageNet-pretrained",
        "data": "ChestX-ray14, ~112k images",
        "macro_auroc": 0.745,
        "comparable": False,
    },
]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "?"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/nih_multilabel.yaml"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=Path("docs/bench_multilabel_nih.json"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    from xraycls.training.config import load_config
    from xraycls.training.crossval import run_training

    t0 = time.perf_counter()
    if not (args.out / "metrics.json").exists():
        run_training(load_config(args.config, args.overrides), args.out)
    wall = time.perf_counter() - t0
    metrics = json.loads((args.out / "metrics.json").read_text())
    cal = json.loads((args.out / "calibration.json").read_text())
    served = cal["configurations"][cal["default"]]
    pooled, floor = metrics["pooled_oof"], metrics["floor_logreg_32px"]

    rows = []
    for f, m in pooled["per_finding"].items():
        fl = floor["per_finding"][f]
        s = served["findings"][f]
        rows.append(
            {
                "finding": f,
                "positives": int(m["positives"]),
                "known": int(m["n"]),
                "oof_auroc": m["auroc"],
                "oof_auroc_ci": m["auroc_ci"],
                "floor_auroc": fl["auroc"],
                "diff": m["vs_floor"]["diff"],
                "delong_p": m["vs_floor"]["p_value"],
                "oof_auprc": m["auprc"],
                "floor_auprc": fl["auprc"],
                "served_auroc_holdout": s["validation"]["auroc"]["value"],
                "served_method": s["method"],
                "served_ece": s["validation"]["per_class"][f]["ece"]["value"],
                "threshold": s["threshold"]["threshold"],
                "sensitivity": s["validation"]["at_threshold"]["sensitivity"]["value"],
                "specificity": s["validation"]["at_threshold"]["specificity"]["value"],
            }
        )
    beats = [r["finding"] for r in rows if r["diff"] > 0 and r["delong_p"] < 0.05]
    loses = [r["finding"] for r in rows if r["diff"] < 0 and r["delong_p"] < 0.05]
    print(
        f"{'finding':20s} {'pos':>4s} {'OOF AUROC [95% CI]':>24s} {'floor':>6s} {'diff':>7s} "
        f"{'p':>6s} {'holdout':>7s} {'ECE':>6s}"
    )
    for r in rows:
        lo, hi = r["oof_auroc_ci"]
        print(
            f"{r['finding']:20s} {r['positives']:4d} {fmt(r['oof_auroc']):>7s} "
            f"[{fmt(lo)}, {fmt(hi)}] {fmt(r['floor_auroc']):>6s} {r['diff']:+7.3f} "
            f"{fmt(r['delong_p']):>6s} {fmt(r['served_auroc_holdout']):>7s} "
            f"{fmt(r['served_ece']):>6s}"
        )
    lo, hi = pooled["auroc_ci"]
    print(
        f"macro AUROC {fmt(pooled['auroc'])} [{fmt(lo)}, {fmt(hi)}] vs floor "
        f"{fmt(floor['auroc'])} (ratio {pooled['auroc'] / floor['auroc']:.3f}); micro "
        f"{fmt(pooled['auroc_micro'])} vs {fmt(floor['auroc_micro'])}; model beats the floor "
        f"(p<0.05) on {len(beats)} of {len(rows)} findings, loses on {len(loses)}"
    )
    for a in ANCHORS:
        print(f"anchor (NOT comparable: {a['data']}): {a['name']}: macro AUROC {a['macro_auroc']}")
    result = {
        "command": "python benchmarks/bench_multilabel.py --config "
        f"{args.config} --out {args.out}" + "".join(f" --set {o}" for o in args.overrides),
        "cpu": cpu_name() + " (shared with other jobs)",
        "run": str(args.out),
        "model": json.loads((args.out / "bundle.json").read_text())["model"],
        "image_size": json.loads((args.out / "bundle.json").read_text())["image_size"],
        "n_images": metrics["n_images"],
        "n_holdout_images": metrics.get("n_holdout_images"),
        "folds": len(metrics["folds"]),
        "run_wall_seconds": metrics.get("wall_seconds"),
        "this_call_seconds": wall,
        "macro_auroc": pooled["auroc"],
        "macro_auroc_ci": pooled["auroc_ci"],
        "micro_auroc": pooled["auroc_micro"],
        "floor_macro_auroc": floor["auroc"],
        "floor_micro_auroc": floor["auroc_micro"],
        "macro_auprc": pooled["auprc"],
        "floor_macro_auprc": floor["auprc"],
        "beats_floor_p05": beats,
        "loses_to_floor_p05": loses,
        "served": {"method": served["method"], "macro": served["validation"]["macro"]},
        "per_finding": rows,
        "anchors_not_comparable": ANCHORS,
    }
    print()
    print(
        "| finding | positives | OOF AUROC [95% CI] | floor AUROC | model - floor (DeLong p) | "
        "OOF AUPRC | floor AUPRC | served: holdout AUROC | calibrator | ECE | threshold | "
        "sensitivity / specificity |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lo, hi = r["oof_auroc_ci"]
        print(
            f"| {r['finding']} | {r['positives']} | {fmt(r['oof_auroc'])} [{fmt(lo)}, {fmt(hi)}] "
            f"| {fmt(r['floor_auroc'])} | {r['diff']:+.3f} ({fmt(r['delong_p'])}) | "
            f"{fmt(r['oof_auprc'])} | {fmt(r['floor_auprc'])} | "
            f"{fmt(r['served_auroc_holdout'])} | {r['served_method']} | {fmt(r['served_ece'])} | "
            f"{fmt(r['threshold'])} | {fmt(r['sensitivity'])} / {fmt(r['specificity'])} |"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
