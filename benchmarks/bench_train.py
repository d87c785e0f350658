"""Training-step cost per backbone family, and the engine's overhead against a bare loop.

Part 1 — for each real family at 1024² and at the demo size, batch 1: seconds per fwd+bwd step
(median of the timed steps after one warm-up), peak RSS, in fp32, fp32 + activation
checkpointing and bf16 autocast. Each configuration runs in its own process so that peak RSS
is that configuration's own.

Part 2 — the engine (`xraycls.training.engine.train_one_epoch`: schedule, grad scaler, accumulation
bookkeeping, frozen-stage eval mode) against a bare PyTorch loop (forward, loss, backward,
step) on the same model, batch and in-memory data, alternating A/B rounds; ratio of medians.

Usage: python benchmarks/bench_train.py [--families swin_tiny,maxvit_tiny,vit_base_patch16,resnet50]
       [--sizes 1024,224] [--steps 2] [--json docs/bench_train.json] [--skip-part1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("fp32", "fp32+ckpt", "bf16")


def one_config(name: str, size: int, mode: str, steps: int) -> dict[str, float | str]:
    """Run in a child process: time fwd+bwd steps, report peak RSS (ru_maxrss)."""
    import resource

    import torch

    from xraycls.models import create_model

    torch.manual_seed(0)
    model = create_model(
        name, num_classes=2, image_size=size, grad_checkpointing=mode == "fp32+ckpt"
    )
    model.train()
    if model.channels_last_preferred:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, size, size)
    if model.channels_last_preferred:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step pays one-off allocation and kernel selection
            times.append(time.perf_counter() - t0)
    return {
        "model": name,
        "size": size,
        "mode": mode,
        "step_seconds": statistics.median(times),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def part1(families: list[str], sizes: list[int], steps: int, timeout: float) -> list[dict]:
    rows = []
    for size in sizes:
        for name in families:
            for mode in MODES:
                cmd = [sys.executable, __file__, "--child", f"{name},{size},{mode},{steps}"]
                try:
                    out = subprocess.run(
                        cmd, capture_output=True, text=True, timeout=timeout, check=True
                    )
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                except subprocess.TimeoutExpired:
                    row = {
                        "model": name,
                        "size": size,
                        "mode": mode,
                        "step_seconds": None,
                        "peak_rss_gb": None,
                        "note": f"over {timeout:.0f} s",
                    }
                except subprocess.CalledProcessError as e:
                    row = {
                        "model": name,
                        "size": size,
                        "mode": mode,
                        "step_seconds": None,
                        "peak_rss_gb": None,
                        "note": e.stderr.strip().splitlines()[-1][:120],
                    }
                rows.append(row)
                s = f"{row['step_seconds']:.2f} s" if row["step_seconds"] else row.get("note", "?")
                print(
                    f"  {name:18s} {size:5d} {mode:10s} {s:>10s}  rss {row['peak_rss_gb'] or 0:.1f} GB",
                    flush=True,
                )
    return rows


def part2(name: str, size: int, batch: int, batches: int, rounds: int) -> dict:
    """Engine epoch vs bare loop over the same pre-built batches, A/B alternating."""
    import torch

    from xraycls.models import create_model
    from xraycls.models.runtime import Amp
    from xraycls.training.config import StageConfig
    from xraycls.training.engine import (
        StepSchedule,
        build_optimizer,
        set_trainable,
        train_one_epoch,
    )

    torch.manual_seed(0)
    model = create_model(name, num_classes=2, image_size=size)
    data = [
        {"image": torch.randn(batch, 3, size, size), "label": torch.randint(0, 2, (batch,))}
        for _ in range(batches)
    ]
    loss_fn = torch.nn.CrossEntropyLoss()
    stage = StageConfig(epochs=1, train="all", lr=1e-4)
    set_trainable(model, stage.train)
    opt = build_optimizer(model, stage)
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def engine() -> float:
        t0 = time.perf_counter()
        train_one_epoch(
            model,
            data,
            opt,
            loss_fn=loss_fn,
            amp=Amp(None, False, "cpu"),
            scaler=scaler,
            device=torch.device("cpu"),
            schedule=StepSchedule(opt, total=batches, warmup=0),
        )
        return time.perf_counter() - t0

    def bare() -> float:
        t0 = time.perf_counter()
        model.train()
        for b in data:
            loss = loss_fn(model(b["image"]), b["label"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    engine(), bare()  # warm-up
    te, tb = [], []
    for _ in range(rounds):
        te.append(engine())
        tb.append(bare())
    return {
        "model": name,
        "size": size,
        "batch": batch,
        "batches": batches,
        "engine_s": statistics.median(te),
        "bare_s": statistics.median(tb),
        "engine_speed_vs_bare": statistics.median(tb) / statistics.median(te),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--families", default="swin_tiny,maxvit_tiny,vit_base_patch16,resnet50")
    ap.add_argument("--sizes", default="1024,224")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--skip-part1", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.child:
        name, size, mode, steps = args.child.split(",")
        print(json.dumps(one_config(name, int(size), mode, int(steps))))
        return

    import torch

    result: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if not args.skip_part1:
        print("part 1: fwd+bwd step, batch 1 (median of timed steps after a warm-up)")
        result["steps"] = part1(
            args.families.split(","),
            [int(s) for s in args.sizes.split(",")],
            args.steps,
            args.timeout,
        )
    print("part 2: engine vs bare loop")
    result["engine"] = [
        part2("swin_test", 224, 32, 6, 5),  # the previous demo's model and batch
        part2("resnet50", 224, 8, 3, 3),
    ]
    for r in result["engine"]:
        print(
            f"  {r['model']} {r['size']}px batch {r['batch']}: engine {r['engine_s']:.2f} s, bare {r['bare_s']:.2f} s -> {r['engine_speed_vs_bare']:.3f}x"
        )

    if "steps" in result:
        print(
            "\n| model | size | fp32 s/img | fp32+ckpt s/img | bf16 s/img | peak RSS fp32 / ckpt / bf16 (GB) |"
        )
        print("|---|---|---|---|---|---|")
        by = {(r["model"], r["size"], r["mode"]): r for r in result["steps"]}
        for size in sorted({r["size"] for r in result["steps"]}, reverse=True):
            for name in args.families.split(","):
                cells = [by.get((name, size, m), {}) for m in MODES]
                secs = " | ".join(
                    f"{c['step_seconds']:.2f}" if c.get("step_seconds") else c.get("note", "-")
                    for c in cells
                )
                rss = " / ".join(
                    f"{c['peak_rss_gb']:.1f}" if c.get("peak_rss_gb") else "-" for c in cells
                )
                print(f"| {name} | {size} | {secs} | {rss} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
