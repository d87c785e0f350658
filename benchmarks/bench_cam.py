"""Grad-CAM cost per backbone, input size and method: seconds per CAM and peak memory.

For each configuration, in its own process (so that the peak RSS is that configuration's own):
build the model (random init, eval mode, 2 classes), time one no-grad forward (the cost of a
prediction, for scale), then ``CamExplainer.explain`` on one image: the first call and the
median of ``--repeats`` more. Peak RSS is the process's ``ru_maxrss``; ``model_rss_mb`` is the
RSS once the model is built, so ``peak - model`` is roughly what the CAM adds. On CUDA the
peak allocated GPU memory is reported as well.

ScoreCAM runs one forward per channel of the target layer (768-2048 for the real backbones), so
it is left out unless named with ``--methods``.

Usage: python benchmarks/bench_cam.py [--backbones resnet50_test swin_tiny ...]
       [--sizes 224 1024] [--methods gradcam eigencam ...] [--repeats 2] [--device cpu]
       [--timeout 900] [--out docs/bench_cam.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BACKBONES = ["resnet50_test", "swin_tiny", "maxvit_tiny", "vit_base_patch16", "resnet50"]
DEFAULT_METHODS = ["gradcam", "gradcam++", "hirescam", "eigencam"]


def one_config(name: str, size: int, method: str, repeats: int, device: str) -> dict:
    """Run in a child process: time the forward and the CAM, report peak memory."""
    import resource

    import torch

    from xraycls.inference.cam import CamExplainer
    from xraycls.models import create_model

    dev = torch.device(device)
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, image_size=size).to(dev).eval()
    x = torch.randn(1, 3, size, size, device=dev)
    model_rss = _rss_mb()

    def timed(fn: object) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.no_grad():
        forward_s = statistics.median(timed(lambda: model(x)) for _ in range(max(repeats, 1)))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with CamExplainer([model], method=method) as cam:
        first = timed(lambda: cam.explain(x, [1]))
        rest = [timed(lambda: cam.explain(x, [1])) for _ in range(repeats)]
    row = {
        "backbone": name,
        "size": size,
        "method": method,
        "cam_s": statistics.median(rest) if rest else first,
        "first_cam_s": first,
        "cam_runs_s": rest,
        "forward_s": forward_s,
        "model_rss_mb": model_rss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    if dev.type == "cuda":
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return row


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_all(args: argparse.Namespace) -> list[dict]:
    rows = []
    print(f"{'backbone':18s} {'size':>5s} {'method':10s} {'cam s':>8s} {'first s':>8s} "
          f"{'fwd s':>7s} {'model MB':>9s} {'peak MB':>8s}")  # fmt: skip
    for size in args.sizes:
        for name in args.backbones:
            for method in args.methods:
                spec = json.dumps([name, size, method, args.repeats, args.device])
                cmd = [sys.executable, __file__, "--child", spec]
                base = {"backbone": name, "size": size, "method": method}
                try:
                    out = subprocess.run(
                        cmd, capture_output=True, text=True, timeout=args.timeout, check=True
                    )
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                except subprocess.TimeoutExpired:
                    row = {**base, "cam_s": None, "note": f"over {args.timeout:.0f} s"}
                except subprocess.CalledProcessError as e:
                    last = (e.stderr.strip().splitlines() or ["failed"])[-1]
                    row = {**base, "cam_s": None, "note": last[:160]}
                rows.append(row)
                if row["cam_s"] is None:
                    print(f"{name:18s} {size:5d} {method:10s} {row['note']}", flush=True)
                else:
                    print(
                        f"{name:18s} {size:5d} {method:10s} {row['cam_s']:8.2f} "
                        f"{row['first_cam_s']:8.2f} {row['forward_s']:7.2f} "
                        f"{row['model_rss_mb']:9.0f} {row['peak_rss_mb']:8.0f}",
                        flush=True,
                    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--backbones", nargs="+", default=BACKBONES)
    ap.add_argument("--sizes", nargs="+", type=int, default=[224])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--repeats", type=int, default=2, help="timed CAMs after the first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()

    if args.child:
        print(json.dumps(one_config(*json.loads(args.child))))
        return

    import torch

    from xraycls.inference.cam import CAM_METHODS
    from xraycls.models import list_backbones

    unknown = [m for m in args.methods if m not in CAM_METHODS]
    unknown += [b for b in args.backbones if b not in list_backbones()]
    if unknown:
        ap.error(f"unknown {unknown}; methods: {CAM_METHODS}; backbones: {list_backbones()}")
    rows = run_all(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "machine": platform.machine(),
            "processor": platform.processor() or None,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "repeats": args.repeats,
            "load_average": os.getloadavg(),
        }
        args.out.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
