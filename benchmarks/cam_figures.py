"""One Grad-CAM figure per backbone family for docs/cam/: original | overlay, per run bundle.

Usage (after docs/comparison/run.sh has trained the binary runs):

    .venv/bin/python benchmarks/cam_figures.py runs/comparison/label/{resnet50_test,swin_test,maxvit_test,vit_test} \
        --image ../shared/data/cxr-pneumonia-224/PNEUMONIA/<file>.jpeg --image ../shared/data/dicom/chest_cr/<siim>.dcm \
        --out docs/cam

Each figure explains the run's decision on each image with Grad-CAM, the heatmap mapped back
through the letterbox onto the windowed original (``xraycls.inference.cam``), titled with the calibrated
probability. The models are the tiny from-scratch comparison runs: the figures show that the
maps land on the radiograph for every family, not what a clinically useful model looks at.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--image", action="append", type=Path, required=True)
    ap.add_argument("--method", default="gradcam")
    ap.add_argument("--out", type=Path, default=Path("docs/cam"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xraycls.inference.cam import explain_pixels, overlay
    from xraycls.inference.predictor import Predictor
    from xraycls.io.preprocess import preprocess_file
    from xraycls.io.read import read_image

    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.runs:
        predictor = Predictor.from_run(run)
        fig, axes = plt.subplots(
            len(args.image), 2, figsize=(8, 4 * len(args.image)), squeeze=False
        )
        for row, path in zip(axes, args.image, strict=True):
            pre = preprocess_file(path, predictor.prep)
            pred = predictor.predict([pre.pixels])[0]
            t0 = time.perf_counter()
            cam = explain_pixels(predictor, [pre.pixels], method=args.method)[0]
            seconds = time.perf_counter() - t0
            original = read_image(path, window=predictor.prep.window).pixels
            heat = cam.to_original(pre.letterbox)
            probs = ", ".join(
                f"P({c}) {p:.2f}" for c, p in zip(predictor.classes, pred.probs, strict=True)
            )
            row[0].imshow(original, cmap="gray")
            row[0].set_title(f"{path.name[:40]}\n{probs}", fontsize=8)
            row[1].imshow(overlay(original, heat, alpha=0.4))
            row[1].set_title(
                f"{args.method} for {cam.target} ({seconds:.1f} s, {len(predictor.models)} members)",
                fontsize=8,
            )
            for ax in row:
                ax.axis("off")
        model = json.loads((run / "bundle.json").read_text())["model"]
        fig.suptitle(f"{run.name}: {model}, {predictor.prep.image_size} px", fontsize=10)
        fig.tight_layout()
        target = args.out / f"{run.name}.png"
        fig.savefig(target, dpi=80)
        plt.close(fig)
        print(target)


if __name__ == "__main__":
    main()
