"""Batch scoring throughput: ``xraycls predict`` end to end against the model's forward-only limit.

For each (model, size): a run bundle (``--run``, or a random-init bundle built here: the weights'
values do not change the cost), scored end to end over real chest DICOMs (the shared corpus's
``chest_cr`` files, repeated through symlinks up to ``--images``; decoding, windowing, resizing
in DataLoader workers, model, CSV writes) versus the same predictor's ``logits`` on pre-loaded,
pre-normalised batches of the same size (the limit: model only). Reports images/s of both and
their ratio (target >= 0.9 where the model is the bottleneck, i.e. on a GPU or for big models at
1024). ``end_to_end`` counts the whole scoring loop (worker start-up included); ``steady`` counts
from the first batch's row to the last (start-up excluded). ``--ray`` adds the Ray Data engine on
a local Ray instance (actor start-up and model loading are inside its loop time).

Usage: python benchmarks/bench_predict.py [--run RUN_DIR] [--tiny resnet50_test]
       [--models swin_tiny,resnet50] [--sizes 224,1024] [--images 48] [--batch-size 8]
       [--workers N] [--ray] [--out docs/bench_predict.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xraycls.inference.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]


def shared_dicom() -> Path:
    root = Path(os.environ.get("XRAYCLS_SHARED_DATA") or REPO.parent / "shared" / "data")
    return root / "dicom"


def build_bundle(out: Path, name: str, size: int) -> Path:
    """A random-init run bundle (refit weights, two classes, no calibration)."""
    import torch

    from xraycls.io.files import write_json_atomic, write_text_atomic
    from xraycls.io.preprocess import Preprocessing
    from xraycls.models import create_model
    from xraycls.models.weights import normalization_for, save_weights
    from xraycls.training.config import load_config

    torch.manual_seed(0)
    cfg = load_config(
        REPO / "configs" / "smoke.yaml", [f"model.name={name}", f"model.image_size={size}"]
    )
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", cfg.to_yaml())
    classes = ["NORMAL", "PNEUMONIA"]
    write_json_atomic(out / "labels.json", {"classes": classes, "positive": classes[-1]})
    mean, std = normalization_for(name)
    write_json_atomic(
        out / "bundle.json",
        {
            "format": 1,
            "model": name,
            "image_size": size,
            "num_classes": 2,
            "normalization": {"mean": mean, "std": std},
            "preprocessing": json.loads(Preprocessing(image_size=size).fingerprint()),
            "weights": "weights.safetensors",
            "fold_weights": [],
        },
    )
    model = create_model(name, num_classes=2, image_size=size)
    save_weights(out / "weights.safetensors", model.state_dict())
    return out


def input_folder(out: Path, n: int) -> Path:
    """``n`` symlinks cycling over the real chest radiographs (distinct paths, real decoding)."""
    chest = sorted((shared_dicom() / "chest_cr").glob("*.dcm"))
    if not chest:
        raise SystemExit(f"no chest DICOMs under {shared_dicom()} (set XRAYCLS_SHARED_DATA)")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        src = chest[i % len(chest)]
        (out / f"{i:04d}_{src.name}").symlink_to(src)
    return out


def forward_limit(
    predictor: Predictor, files: list[Path], batch_size: int, rounds: int = 2
) -> float:
    """images/s of ``predictor.logits`` on pre-loaded, normalised batches (model only)."""
    import torch

    from xraycls.io.preprocess import preprocess_file

    distinct = {p.resolve(): preprocess_file(p, predictor.prep).pixels for p in files[:6]}
    pixels = [distinct[p.resolve()] for p in files]
    batches = [
        predictor.to_tensor(pixels[i : i + batch_size]).to(predictor.device)
        for i in range(0, len(pixels), batch_size)
    ]
    predictor.logits(batches[0])  # warm-up: kernel selection, allocations
    times = []
    for _ in range(rounds):
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in batches:
            predictor.logits(b)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return len(pixels) / statistics.median(times)


def end_to_end(
    src: Path, out_csv: Path, run: Path, *, engine: str, batch_size: int, workers: int | None
) -> dict[str, float]:
    """images/s of ``score`` over ``src`` (a fresh results file), whole loop and steady state."""
    from xraycls.inference.scoring import score

    marks: list[tuple[float, int]] = []
    s = score(
        src,
        out_csv,
        run=run,
        engine=engine,  # type: ignore[arg-type]
        batch_size=batch_size,
        workers=workers,
        on_progress=lambda done, total: marks.append((time.perf_counter(), done)),
    )
    steady = None
    if len(marks) >= 3:  # marks[0] is the start (0 done), marks[1] the first batch
        (t1, d1), (t2, d2) = marks[1], marks[-1]
        steady = (d2 - d1) / (t2 - t1) if t2 > t1 else None
    return {
        "images": s.ok + s.error,
        "errors": s.error,
        "end_to_end_images_per_s": s.images_per_s,
        "steady_images_per_s": steady,
        "loop_seconds": s.seconds,
    }


def bench_one(
    label: str,
    run: Path,
    src: Path,
    tmp: Path,
    *,
    batch_size: int,
    workers: int | None,
    with_ray: bool,
) -> dict:
    from xraycls.inference.predictor import Predictor

    predictor = Predictor.from_run(run)
    files = sorted(src.iterdir())
    limit = forward_limit(predictor, files, batch_size)
    row: dict = {
        "model": label,
        "size": predictor.prep.image_size,
        "batch": batch_size,
        "device": str(predictor.device),
        "forward_images_per_s": limit,
    }
    del predictor
    local = end_to_end(
        src,
        tmp / f"{run.name}-local.csv",
        run,
        engine="local",
        batch_size=batch_size,
        workers=workers,
    )
    row |= {f"local_{k}": v for k, v in local.items()}
    row["ratio_end_to_end"] = local["end_to_end_images_per_s"] / limit
    if local["steady_images_per_s"]:
        row["ratio_steady"] = local["steady_images_per_s"] / limit
    if with_ray:
        remote = end_to_end(
            src, tmp / f"{run.name}-ray.csv", run, engine="ray", batch_size=batch_size, workers=None
        )
        row |= {f"ray_{k}": v for k, v in remote.items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="Bench this bundle instead of a random tiny one.")
    ap.add_argument("--tiny", default="resnet50_test", help="Tiny backbone (at 224) without --run.")
    ap.add_argument("--models", default="swin_tiny,resnet50", help="Real backbones, random init.")
    ap.add_argument("--sizes", default="224,1024", help="Sizes for the real backbones.")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--ray", action="store_true", help="Also time --engine ray (local Ray).")
    ap.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = ap.parse_args()

    import torch

    if args.ray:
        import ray

        ray.init(include_dashboard=False, log_to_driver=False)
    from xraycls.io.dicom import installation_salt

    installation_salt()
    result: dict = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "images": args.images,
        "inputs": "shared dicom/chest_cr (CR 1955x1841 J2K/raw, SIIM 1024x1024 JPEG), symlinked",
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as d:
        tmp = Path(d)
        src = input_folder(tmp / "inputs", args.images)
        plan: list[tuple[str, Path]] = []
        if args.run:
            plan.append((args.run.name, args.run))
        elif args.tiny:
            plan.append((f"{args.tiny}", build_bundle(tmp / "tiny", args.tiny, 224)))
        for size in [int(s) for s in args.sizes.split(",") if s]:
            for name in [m for m in args.models.split(",") if m]:
                plan.append((f"{name}", build_bundle(tmp / f"{name}-{size}", name, size)))
        for label, run in plan:
            row = bench_one(
                label,
                run,
                src,
                tmp,
                batch_size=args.batch_size,
                workers=args.workers,
                with_ray=args.ray,
            )
            result["rows"].append(row)
            ray_s = f", ray {row['ray_end_to_end_images_per_s']:.1f}" if args.ray else ""
            print(
                f"  {label} {row['size']}px: forward {row['forward_images_per_s']:.1f}/s, "
                f"local {row['local_end_to_end_images_per_s']:.1f}/s "
                f"(steady {row.get('local_steady_images_per_s') or 0:.1f}/s){ray_s}",
                flush=True,
            )

    print(
        "\n| model | size | device | forward img/s | predict img/s (steady) | ratio (steady) |"
        + (" ray img/s |" if args.ray else "")
    )
    print("|---|---|---|---|---|---|" + ("---|" if args.ray else ""))
    for r in result["rows"]:
        line = (
            f"| {r['model']} | {r['size']} | {r['device']} | {r['forward_images_per_s']:.1f} | "
            f"{r['local_end_to_end_images_per_s']:.1f} ({r.get('local_steady_images_per_s') or 0:.1f}) | "
            f"{r['ratio_end_to_end']:.2f} ({r.get('ratio_steady', 0):.2f}) |"
        )
        if args.ray:
            line += f" {r['ray_end_to_end_images_per_s']:.1f} |"
        print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
