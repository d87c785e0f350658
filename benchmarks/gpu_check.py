"""The prepared GPU check: do the 1024² recipes run on a GPU, how fast, in how much memory.

Run it through ``benchmarks/gpu_check.sh`` (which refuses to start without CUDA and bounds the
time). One JSON holds every figure:

1. **recipes**: each ``configs/*_1024.yaml`` family (its backbone, input size, micro-batch,
   activation checkpointing, channels-last rule), random-init, for a few optimizer steps through
   the training engine's own ``train_one_epoch``, in bf16 autocast and in fp16 autocast with a
   GradScaler: images/s after a warm-up step, peak GPU memory, and whether every loss and weight
   stayed finite;
2. **swin_t_speedup**: Swin-T at 1024², the same steps in fp32 and in bf16 (the speed-up);
3. **cam**: Grad-CAM of each family at 1024² on CUDA (seconds, peak memory, finite map);
4. **predict**: ``xraycls predict`` (the scoring engine, DataLoader decoding workers, the GPU
   model) over the shared DICOM corpus with a random-init Swin-B 1024² bundle: files/s and the
   ok / error counts (every file yields a row).

``--dry-run`` runs every part on the CPU with the tiny ``*_test`` variants at 64 px and one step,
so a CPU test proves the script does not rot (tests/test_gpu_check.py). Nothing is downloaded:
the models are randomly initialised (speed and memory do not depend on the weights).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402

TINY = {"swin": "swin_test", "maxvit": "maxvit_test", "vit": "vit_test", "resnet": "resnet50_test"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "gpu_check.json")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --dry-run)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per recipe and mode")
    p.add_argument("--dry-run", action="store_true", help="tiny variants, 64 px, 1 step, on CPU")
    p.add_argument("--dicom", type=Path, default=None, help="DICOM folder for predict")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what would start later")
    p.add_argument(
        "--recipes", default="*", help="which configs/<NAME>.yaml recipes (a glob; default all)"
    )
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.steps = "cpu", 1
    global RECIPES
    RECIPES = args.recipes
    if not _recipes():
        print(
            f"gpu_check: no configs/*_1024.yaml matches --recipes {args.recipes}", file=sys.stderr
        )
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to torch; nothing to check", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    report: dict[str, Any] = {"environment": _environment(device), "dry_run": args.dry_run}
    failures: list[str] = []

    def part(name: str, fn: Callable[[], Any]) -> None:
        if time.perf_counter() > deadline:
            report[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            failures.append(f"{name}: skipped (time budget)")
            return
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            report[name] = fn()
        except Exception as e:  # one failed part must not hide the others' figures
            report[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            failures.append(f"{name}: {type(e).__name__}: {e}")

    part("recipes", lambda: check_recipes(device, args.steps, args.dry_run, failures, deadline))
    part("swin_t_speedup", lambda: check_swin_speedup(device, args.steps, args.dry_run))
    part("cam", lambda: check_cam(device, args.dry_run, failures))
    part("predict", lambda: check_predict(device, args.dicom, args.dry_run, failures))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["failures"] = failures
    report["ok"] = not failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    _print_table(report)
    print(f"gpu_check: {'OK' if not failures else 'FAILED'} in {report['seconds']} s -> {args.out}")
    for f in failures:
        print(f"  - {f}", file=sys.stderr)
    return 0 if not failures else 1


# --------------------------------------------------------------------------- parts


RECIPES = "*"


def _recipes() -> list[Path]:
    found = sorted((REPO / "configs").glob("*_1024.yaml"))
    return [p for p in found if fnmatch.fnmatch(p.stem, RECIPES)]


def check_recipes(
    device: torch.device, steps: int, dry: bool, failures: list[str], deadline: float
) -> dict[str, Any]:
    """Each 1024² recipe for a few steps in bf16 and in fp16 + GradScaler."""
    from xraycls.models.registry import get_spec
    from xraycls.training.config import load_config

    out: dict[str, Any] = {}
    for path in _recipes():
        cfg = load_config(path, [])
        family = get_spec(cfg.model.name).family
        name = TINY[family] if dry else cfg.model.name
        size = 64 if dry else cfg.model.image_size
        batch = 2 if dry else cfg.train.batch_size
        entry: dict[str, Any] = {
            "config": path.name,
            "model": name,
            "image_size": size,
            "micro_batch": batch,
            "grad_checkpointing": cfg.model.grad_checkpointing,
        }
        for mode in ("bf16", "fp16"):
            if time.perf_counter() > deadline:
                entry[mode] = {"skipped": "time budget spent"}
                failures.append(f"{path.name} {mode}: skipped (time budget)")
                continue
            r = train_steps(
                name,
                size=size,
                batch=batch,
                steps=steps,
                mode=mode,
                device=device,
                grad_checkpointing=cfg.model.grad_checkpointing,
                channels_last=cfg.train.channels_last,
                lr=cfg.train.stages[-1].lr,
            )
            entry[mode] = r
            if not r["finite"]:
                failures.append(f"{path.name} {mode}: non-finite loss or weights")
        out[path.stem] = entry
    return out


def train_steps(
    name: str,
    *,
    size: int,
    batch: int,
    steps: int,
    mode: str,
    device: torch.device,
    grad_checkpointing: bool = False,
    channels_last: str = "auto",
    lr: float = 1e-4,
) -> dict[str, Any]:
    """Warm-up step plus ``steps`` timed optimizer steps through ``train_one_epoch``."""
    from xraycls.models import create_model
    from xraycls.models.runtime import Amp, resolve_amp
    from xraycls.training.config import StageConfig
    from xraycls.training.engine import build_optimizer, set_trainable, train_one_epoch

    torch.manual_seed(0)
    model = create_model(
        name, num_classes=2, image_size=size, grad_checkpointing=grad_checkpointing
    ).to(device)
    cl = channels_last == "on" or (channels_last == "auto" and model.channels_last_preferred)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    stage = StageConfig(epochs=1, train="all", lr=lr)
    set_trainable(model, stage.train)
    optimizer = build_optimizer(model, stage)
    if device.type == "cuda":
        amp = resolve_amp(mode, device) if mode != "fp32" else resolve_amp("off", device)
    else:  # dry run: the same code paths on the CPU (fp16 autocast + GradScaler included)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        amp = Amp(dtype, mode == "fp16", "cpu")
    scaler = torch.amp.GradScaler(device.type, enabled=amp.use_scaler)
    g = torch.Generator().manual_seed(0)
    data = [
        {
            "image": torch.randn(batch, 3, size, size, generator=g),
            "label": torch.randint(0, 2, (batch,), generator=g),
        }
        for _ in range(steps)
    ]
    loss_fn = torch.nn.CrossEntropyLoss()
    kw = {"loss_fn": loss_fn, "amp": amp, "scaler": scaler, "device": device, "channels_last": cl}
    train_one_epoch(model, data[:1], optimizer, **kw)  # warm-up: kernels, allocator, cudnn
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    stats = train_one_epoch(model, data, optimizer, **kw)
    _sync(device)
    seconds = time.perf_counter() - t
    finite = math.isfinite(stats["loss"]) and all(
        bool(torch.isfinite(p).all()) for p in model.parameters()
    )
    result = {
        "amp": amp.describe(),
        "steps": int(stats["steps"]),
        "images_per_s": round(stats["images"] / seconds, 2),
        "seconds_per_step": round(seconds / max(1, stats["steps"]), 4),
        "loss": round(stats["loss"], 4),
        "finite": finite,
        "grad_scale": float(scaler.get_scale()) if amp.use_scaler else None,
        "peak_memory_gib": _peak_gib(device),
    }
    del model, optimizer
    _free(device)
    return result


def check_swin_speedup(device: torch.device, steps: int, dry: bool) -> dict[str, Any]:
    """Swin-T at 1024²: fp32 vs bf16 autocast, same steps, same micro-batch."""
    name, size, batch = ("swin_test", 64, 2) if dry else ("swin_tiny", 1024, 4)
    fp32 = train_steps(name, size=size, batch=batch, steps=steps, mode="fp32", device=device)
    bf16 = train_steps(name, size=size, batch=batch, steps=steps, mode="bf16", device=device)
    return {
        "model": name,
        "image_size": size,
        "micro_batch": batch,
        "fp32": fp32,
        "bf16": bf16,
        "speedup_bf16_over_fp32": round(bf16["images_per_s"] / fp32["images_per_s"], 2),
        "memory_ratio_bf16_over_fp32": _ratio(bf16["peak_memory_gib"], fp32["peak_memory_gib"]),
    }


def check_cam(device: torch.device, dry: bool, failures: list[str]) -> dict[str, Any]:
    """Grad-CAM of each recipe's family at 1024² on the device (one image, the model's size)."""
    from xraycls.inference.cam import explain_pixels
    from xraycls.inference.predictor import Predictor
    from xraycls.io.preprocess import Preprocessing
    from xraycls.models import create_model
    from xraycls.models.registry import get_spec
    from xraycls.models.weights import normalization_for
    from xraycls.training.config import load_config

    out: dict[str, Any] = {}
    for path in _recipes():
        cfg = load_config(path, [])
        name = TINY[get_spec(cfg.model.name).family] if dry else cfg.model.name
        size = 64 if dry else cfg.model.image_size
        torch.manual_seed(0)
        model = create_model(name, num_classes=2, image_size=size).to(device).eval()
        predictor = Predictor(
            [model],
            classes=["NORMAL", "PNEUMONIA"],
            prep=Preprocessing(image_size=size),
            normalization=normalization_for(name),
            calibrator=None,
            threshold=None,
            device=device,
        )
        pixels = [np.random.default_rng(0).random((size, size), dtype=np.float32)]
        explain_pixels(predictor, pixels, target=1)  # warm-up
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        (cam,) = explain_pixels(predictor, pixels, target=1)
        _sync(device)
        finite = bool(np.isfinite(cam.heatmap).all()) and cam.heatmap.shape == (size, size)
        out[name] = {
            "image_size": size,
            "seconds": round(time.perf_counter() - t, 3),
            "peak_memory_gib": _peak_gib(device),
            "finite": finite,
        }
        if not finite:
            failures.append(f"cam {name}: non-finite or mis-shaped heatmap")
        del model, predictor
        _free(device)
    return out


def check_predict(
    device: torch.device, dicom: Path | None, dry: bool, failures: list[str]
) -> dict[str, Any]:
    """``xraycls predict`` over the shared DICOM corpus with a random-init 1024² bundle."""
    from xraycls.inference.scoring import score

    source = dicom or _shared() / "dicom"
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: no DICOM corpus (set XRAYCLS_SHARED_DATA or --dicom)")
    name, size = ("swin_test", 64) if dry else ("swin_base", 1024)
    work = Path(tempfile.mkdtemp(prefix="xraycls-gpu-check-"))
    try:
        if dry:  # a few files are enough to prove the path
            src = work / "dicom"
            shutil.copytree(source / "chest_cr", src / "chest_cr")
            shutil.copytree(source / "not_dicom", src / "not_dicom")
            source = src
        run = _random_bundle(work / "run", name, size)
        t = time.perf_counter()
        summary = score(
            source,
            work / "results.csv",
            run=run,
            device=str(device),
            workers=0 if dry else min(8, os.cpu_count() or 1),
            batch_size=2 if dry else 16,
        )
        seconds = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = summary.ok + summary.error
    if summary.ok == 0:
        failures.append("predict: no file scored")
    return {
        "source": str(source if not dry else dicom or _shared() / "dicom"),
        "model": name,
        "image_size": size,
        "files": files,
        "ok": summary.ok,
        "error": summary.error,
        "errors_by_code": dict(summary.errors_by_code),
        "seconds": round(seconds, 2),
        "files_per_s": round(files / seconds, 2),
    }


# --------------------------------------------------------------------------- helpers


def _random_bundle(run: Path, name: str, size: int) -> Path:
    """A minimal bundle (one randomly initialised model, no calibration) that predict serves."""
    from xraycls.bundle.format import REFIT_WEIGHTS, write_bundle_meta
    from xraycls.io.preprocess import Preprocessing
    from xraycls.models import create_model
    from xraycls.models.weights import normalization_for, save_weights

    torch.manual_seed(0)
    model = create_model(name, num_classes=2, image_size=size)
    run.mkdir(parents=True)
    save_weights(run / "fold0" / REFIT_WEIGHTS, model.state_dict())
    write_bundle_meta(
        run,
        model=name,
        image_size=size,
        classes=["NORMAL", "PNEUMONIA"],
        label_column="label",
        normalization=normalization_for(name),
        prep=Preprocessing(image_size=size),
        folds=1,
        refit=False,
    )
    (run / "config.yaml").write_text(f"# gpu_check: random-init {name}\nmodel: {{name: {name}}}\n")
    return run


def _shared() -> Path:
    return Path(os.environ.get("XRAYCLS_SHARED_DATA") or REPO.parent / "shared" / "data")


def _environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "gpu_count": torch.cuda.device_count(),
        }
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _print_table(report: dict[str, Any]) -> None:
    recipes = report.get("recipes", {})
    if isinstance(recipes, dict) and "error" not in recipes:
        print(f"{'recipe':<18} {'model':<16} {'mode':<5} {'img/s':>8} {'peak GiB':>9} finite")
        for key, e in recipes.items():
            for mode in ("bf16", "fp16"):
                r = e.get(mode, {})
                if "images_per_s" in r:
                    print(
                        f"{key:<18} {e['model']:<16} {mode:<5} {r['images_per_s']:>8} "
                        f"{r['peak_memory_gib'] if r['peak_memory_gib'] is not None else '-':>9} "
                        f"{r['finite']}"
                    )
    s = report.get("swin_t_speedup", {})
    if "speedup_bf16_over_fp32" in s:
        print(f"Swin-T {s['image_size']}px bf16 / fp32 speed-up: {s['speedup_bf16_over_fp32']}x")
    for name, c in (report.get("cam") or {}).items():
        if isinstance(c, dict) and "seconds" in c:
            print(
                f"CAM {name} {c['image_size']}px: {c['seconds']} s, peak {c['peak_memory_gib']} GiB"
            )
    pr = report.get("predict", {})
    if "files_per_s" in pr:
        print(
            f"predict: {pr['files']} files ({pr['ok']} ok, {pr['error']} error), {pr['files_per_s']} files/s"
        )


if __name__ == "__main__":
    raise SystemExit(main())
