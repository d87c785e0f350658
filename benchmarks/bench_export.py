"""onnxruntime vs PyTorch on the CPU: images/s per backbone family at 224² and 1024².

For each full-size backbone (random init: speed does not depend on the weights) and input size,
the model is exported with ``xraycls.inference.export.export_onnx`` (the graph a bundle's export
holds, one member) and both backends score the same normalised batches, alternating
PyTorch / onnxruntime per iteration so that load from other jobs hits both alike. Reports the
median seconds per batch, images/s, the ratio onnxruntime / PyTorch, and the largest absolute
logit difference between the two on the timed batches.

    OMP_NUM_THREADS=1 python benchmarks/bench_export.py --json docs/bench_export.json

Both backends get the same number of intra-op threads (torch's; ``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from xraycls.inference.export import export_onnx  # noqa: E402
from xraycls.inference.onnx_backend import OnnxRunner  # noqa: E402
from xraycls.models import create_model  # noqa: E402

DEFAULT_MODELS = "resnet50,swin_tiny,maxvit_tiny,vit_base_patch16"


def bench_one(
    name: str, size: int, batch: int, iters: int, exporter: str, slow_s: float
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, image_size=size).eval()
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        used, opset, fallback = export_onnx(
            [model],
            Path(d) / "m.onnx",
            image_size=size,
            exporter=exporter,  # type: ignore[arg-type]
        )
        export_s = time.perf_counter() - t
        runner = OnnxRunner(Path(d) / "m.onnx")
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
        xn = x.numpy()
        with torch.no_grad():
            t = time.perf_counter()
            ref = model(x).numpy()  # warm-up both
            first = time.perf_counter() - t
        runner(xn)
        n = iters if first < slow_s else 1  # a slow model at 1024² on a shared CPU: one timed run
        pt, ox, diff = [], [], 0.0
        for _ in range(n):
            with torch.no_grad():
                t = time.perf_counter()
                a = model(x).numpy()
                pt.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = runner(xn)[0]
            ox.append(time.perf_counter() - t)
            diff = max(diff, float(np.abs(a - b).max()), float(np.abs(ref - b).max()))
    mp, mo = statistics.median(pt), statistics.median(ox)
    return {
        "model": name,
        "image_size": size,
        "batch": batch,
        "iterations": n,
        "exporter": used,
        "opset": opset,
        "dynamo_failure": fallback,
        "export_seconds": round(export_s, 1),
        "torch_s_per_batch": round(mp, 4),
        "onnxruntime_s_per_batch": round(mo, 4),
        "torch_images_per_s": round(batch / mp, 2),
        "onnxruntime_images_per_s": round(batch / mo, 2),
        "speedup_onnxruntime_over_torch": round(mp / mo, 2),
        "max_abs_logit_diff": diff,
        "torch_runs_s": [round(v, 4) for v in pt],
        "onnxruntime_runs_s": [round(v, 4) for v in ox],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--sizes", default="224,1024")
    p.add_argument("--batches-224", default="1,8", help="batch sizes at sizes below 1024")
    p.add_argument("--batches-1024", default="1", help="batch sizes at 1024 and above")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per backend")
    p.add_argument(
        "--slow-s", type=float, default=10.0, help="above this per batch, time one iteration"
    )
    p.add_argument("--exporter", default="torchscript", choices=["auto", "dynamo", "torchscript"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    import onnxruntime

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def save() -> dict[str, Any]:
        out = {
            "command": " ".join(sys.argv),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "cpu": platform.processor() or platform.machine(),
            "seconds": round(time.perf_counter() - t0, 1),
            "results": rows,
        }
        if args.json:  # after every row: a run stopped early keeps what it measured
            args.json.write_text(json.dumps(out, indent=2) + "\n")
        return out

    for size in [int(s) for s in args.sizes.split(",")]:
        batches = args.batches_1024 if size >= 1024 else args.batches_224
        for name in [m for m in args.models.split(",") if m]:
            for batch in [int(b) for b in batches.split(",")]:
                r = bench_one(name, size, batch, args.iters, args.exporter, args.slow_s)
                rows.append(r)
                print(
                    f"{name:<17} {size:>5} b{batch:<2} torch {r['torch_images_per_s']:>7.2f} img/s"
                    f"  onnxruntime {r['onnxruntime_images_per_s']:>7.2f} img/s"
                    f"  x{r['speedup_onnxruntime_over_torch']:.2f}  |diff| {r['max_abs_logit_diff']:.1e}"
                    f"  ({r['iterations']} it, export {r['export_seconds']} s, {r['exporter']})",
                    flush=True,
                )
                save()
    out = save()
    print(f"{out['seconds']} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
