"""CPU throughput of a distillation teacher and its student, against the seed's claim.

The seed's distillation result: a ViT-S student kept 97% of its ViT-L teacher's accuracy at 3.2x
the speed. This script measures the same two ratios for run bundles trained here:

- **speed**: images per second of each bundle's served model (its fold ensemble, the default
  of ``xraycls predict``) on CPU, from preprocessed pixels to logits, batch ``--batch``, and of
  one fold model alone; preprocessing (file -> pixels at the bundle's own input size) is timed
  separately. Teacher and student alternate within each round (A/B), so both see the same load;
  medians over rounds, and the ratio of medians.
- **quality retained**: the student's pooled out-of-fold AUROC and accuracy (cross-fitted
  operating point of ``metrics.json``) as a fraction of the teacher's, with the same student
  trained without the teacher when ``--alone`` is given. Paired intervals: ``xraycls compare``.

Usage: python benchmarks/bench_distill.py --teacher RUN --student RUN [--alone RUN]
       [--images 64] [--batch 16] [--rounds 5] [--threads 1] [--json docs/bench_distill.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

SEED_CLAIM = {"quality_retained": 0.97, "speedup": 3.2}


def _images(run: Path, n: int) -> list[str]:
    """The first ``n`` development images of a run (from its ``folds.csv``)."""
    from xraycls.io.manifest import read_table

    return [r["path"] for r in read_table(run / "folds.csv")][:n]


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(runs: dict[str, Path], *, n: int, batch: int, rounds: int) -> dict[str, dict[str, Any]]:
    import torch

    from xraycls.inference.predictor import Predictor
    from xraycls.io.preprocess import preprocess_file

    files = _images(next(iter(runs.values())), n)
    pred = {k: Predictor.from_run(r, members="folds", device="cpu") for k, r in runs.items()}

    def prep(k: str) -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [preprocess_file(f, pred[k].prep).pixels for f in files]

    pixels = {k: prep(k) for k in runs}
    tensors = {k: pred[k].to_tensor(pixels[k]) for k in runs}

    def ensemble(k: str) -> None:
        for i in range(0, n, batch):
            pred[k].logits(tensors[k][i : i + batch])

    def single(k: str) -> None:
        model = pred[k].models[0]
        with torch.no_grad():
            for i in range(0, n, batch):
                model(tensors[k][i : i + batch])

    for k in runs:  # warm-up: one-off allocations and kernel selection
        ensemble(k)
    times: dict[str, dict[str, list[float]]] = {
        k: {"ensemble": [], "single": [], "preprocess": []} for k in runs
    }
    for _ in range(rounds):
        for k in runs:  # A/B within the round
            times[k]["ensemble"].append(_timed(lambda k=k: ensemble(k)))
            times[k]["single"].append(_timed(lambda k=k: single(k)))
            times[k]["preprocess"].append(_timed(lambda k=k: prep(k)))
    out: dict[str, dict[str, Any]] = {}
    for k, run in runs.items():
        metrics = json.loads((run / "metrics.json").read_text())
        pooled = metrics["pooled_oof"]
        p = pred[k]
        params = sum(q.numel() for q in p.models[0].parameters())
        out[k] = {
            "run": str(run),
            "model": json.loads((run / "bundle.json").read_text())["model"],
            "input": p.prep.image_size,
            "fold_models": len(p.models),
            "params_per_model": params,
            "images_per_s_ensemble": n / statistics.median(times[k]["ensemble"]),
            "images_per_s_one_model": n / statistics.median(times[k]["single"]),
            "images_per_s_preprocess": n / statistics.median(times[k]["preprocess"]),
            "oof_auroc": pooled["auroc"],
            "oof_accuracy": pooled["accuracy"],
            "floor_auroc": metrics["floor_logreg_32px"]["auroc"],
            "distilled": "distillation" in metrics,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--student", type=Path, required=True)
    ap.add_argument("--alone", type=Path, help="The same student trained without the teacher.")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    runs = {"teacher": args.teacher, "student (distilled)": args.student}
    if args.alone:
        runs["student (alone)"] = args.alone
    rows = measure(runs, n=args.images, batch=args.batch, rounds=args.rounds)
    teacher = rows["teacher"]
    for r in rows.values():
        r["speedup_ensemble"] = r["images_per_s_ensemble"] / teacher["images_per_s_ensemble"]
        r["speedup_one_model"] = r["images_per_s_one_model"] / teacher["images_per_s_one_model"]
        r["auroc_retained"] = r["oof_auroc"] / teacher["oof_auroc"]
        r["accuracy_retained"] = r["oof_accuracy"] / teacher["oof_accuracy"]

    head = (
        f"{'model':<22} {'backbone':<14} {'input':>5} {'params':>7} {'img/s ens':>10} "
        f"{'img/s 1':>8} {'speedup':>8} {'OOF AUROC':>9} {'kept':>6} {'accuracy':>8} {'kept':>6}"
    )
    print(head)
    for name, r in rows.items():
        print(
            f"{name:<22} {r['model']:<14} {r['input']:>5} {r['params_per_model'] / 1e3:>6.0f}k "
            f"{r['images_per_s_ensemble']:>10.1f} {r['images_per_s_one_model']:>8.1f} "
            f"{r['speedup_ensemble']:>7.2f}x {r['oof_auroc']:>9.4f} {r['auroc_retained']:>6.1%} "
            f"{r['oof_accuracy']:>8.4f} {r['accuracy_retained']:>6.1%}"
        )
    print(
        f"seed's claim: {SEED_CLAIM['quality_retained']:.0%} of the teacher's accuracy at "
        f"{SEED_CLAIM['speedup']}x the speed; floor (LR on 32x32 pixels, same folds) AUROC "
        f"{teacher['floor_auroc']:.4f}"
    )
    if args.json:
        import os
        import platform

        result = {
            "rows": rows,
            "seed_claim": SEED_CLAIM,
            "settings": {
                "images": args.images,
                "batch": args.batch,
                "rounds": args.rounds,
                "threads": args.threads,
                "cpu": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
