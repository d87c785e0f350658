"""Ingest throughput against a MONAI pipeline and the decode-only floor, in one run.

For each image set it times, per image and single-process (median over rounds):

* ``decode``: the floor, pydicom ``pixel_array`` (DICOM) or Pillow decode (JPEG);
* ``monai``: ``LoadImage(reader=PydicomReader / PILReader) -> ScaleIntensity -> Resize(1024²)``;
* ``xraycls``: read + VOI + MONOCHROME1 + letterbox resize + uint16 cache write (what ingest does);
* ``cached`` / ``cached_u16``: reading that cache entry back by key, as float32 / as stored
  (what a training epoch does: keys are computed once per data set);

plus the whole ``ingest()`` (2 worker processes) and whether each pipeline renders MONOCHROME1
the right way round (correlation with xraycls' rendering of the same file).

Usage: python benchmarks/bench_ingest.py [--data ../shared/data] [--jpegs 200] [--rounds 3]
       [--json docs/bench_ingest.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xraycls.io.ingest import ingest
from xraycls.io.preprocess import ImageCache, Preprocessing, preprocess_file
from xraycls.io.read import read_image

SIZE = 1024


def _time_each(files: list[Path], fn: Callable[[Path], object], rounds: int) -> float:
    """Median over rounds of the mean seconds per image."""
    per_round = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for f in files:
            fn(f)
        per_round.append((time.perf_counter() - t0) / len(files))
    return statistics.median(per_round)


def _decode_only(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".jpeg", ".jpg", ".png"):
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    import pydicom

    return pydicom.dcmread(path).pixel_array


def _monai_pipeline() -> Callable[[Path], np.ndarray]:
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensity

    def build(reader: str) -> Compose:
        return Compose(
            [
                LoadImage(reader=reader, image_only=True),
                EnsureChannelFirst(),
                ScaleIntensity(),
                Resize((SIZE, SIZE)),
            ]
        )

    dicom, raster = build("PydicomReader"), build("PILReader")

    def run(path: Path) -> np.ndarray:
        pipe = raster if path.suffix.lower() in (".jpeg", ".jpg", ".png") else dicom
        return np.asarray(pipe(str(path)))[0]

    return run


def _orientation_ok(monai_out: np.ndarray, ours: np.ndarray) -> bool:
    """MONAI's PydicomReader returns (cols, rows); compare after transposing back."""
    a = monai_out.T if monai_out.shape == ours.shape[::-1] else monai_out
    return float(np.corrcoef(a.ravel(), ours.ravel())[0, 1]) > 0


def bench_set(
    name: str, files: list[Path], rounds: int, monai_fn: Callable[[Path], np.ndarray]
) -> dict:
    prep = Preprocessing(image_size=SIZE, resize="squash")  # squash: same geometry as MONAI Resize
    with tempfile.TemporaryDirectory() as tmp:
        cache = ImageCache(tmp)

        def ours(p: Path) -> object:
            return preprocess_file(p, prep, cache=cache, reuse=False)

        keys: dict[Path, str] = {}

        def cached(p: Path) -> object:
            # What a training epoch does: keys are computed once, entries are read by key.
            return cache.get(keys[p])

        def cached_u16(p: Path) -> object:
            return cache.get_uint16(keys[p])

        for f in files:  # warm-up: imports, codecs, file-system cache
            _decode_only(f)
            monai_fn(f)
            keys[f] = ImageCache.key(ours(f).content_sha256, prep)
        t = {
            "decode": _time_each(files, _decode_only, rounds),
            "monai": _time_each(files, monai_fn, rounds),
            "xraycls": _time_each(files, ours, rounds),
            "cached": _time_each(files, cached, rounds),
            "cached_u16": _time_each(files, cached_u16, rounds),
        }
    src = Path(tempfile.mkdtemp())
    for i, f in enumerate(files):
        os.symlink(f.resolve(), src / f"{i:05d}{f.suffix}")
    with tempfile.TemporaryDirectory() as out:
        s = ingest(src, out, prep=Preprocessing(image_size=SIZE), workers=2)
        assert s.ok == len(files), s.line()
        t["ingest_2_workers"] = s.seconds / len(files)
    wrong = []
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = read_image(f)
        ours_sq = preprocess_file(f, prep).pixels
        if not _orientation_ok(monai_fn(f), ours_sq):
            wrong.append(f"{f.name} ({img.meta.photometric})")
    return {
        "set": name,
        "images": len(files),
        "seconds_per_image": t,
        "images_per_s": {k: 1.0 / v for k, v in t.items()},
        "xraycls_vs_monai_speed": t["monai"] / t["xraycls"],
        "xraycls_time_vs_decode_only": t["xraycls"] / t["decode"],
        "cached_speedup_vs_xraycls": t["xraycls"] / t["cached"],
        "monai_inverted_or_wrong": wrong,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, default=Path(os.environ.get("XRAYCLS_SHARED_DATA", "../shared/data"))
    )
    ap.add_argument("--jpegs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    chest = sorted((args.data / "dicom" / "chest_cr").glob("*.dcm"))
    with (args.data / "cxr-pneumonia-224" / "sample-1000.csv").open() as f:
        jpegs = [args.data / "cxr-pneumonia-224" / r["path"] for r in csv.DictReader(f)][
            : args.jpegs
        ]
    monai_fn = _monai_pipeline()
    results = [
        bench_set("chest DICOM (NEMA RG1 x4 incl. J2K, SIIM x2)", chest, args.rounds, monai_fn),
        bench_set(f"224-px JPEG (Kermany, {len(jpegs)})", jpegs, args.rounds, monai_fn),
    ]

    cols = ["decode", "monai", "xraycls", "cached", "cached_u16", "ingest_2_workers"]
    print(f"\nimages/s at {SIZE}² (median of {args.rounds} rounds, 1 process unless noted)\n")
    print(
        "| set | n | "
        + " | ".join(cols)
        + " | xraycls/MONAI speed | xraycls/decode time | cached speed-up | MONAI wrong way round |"
    )
    print("|---|---|" + "---|" * (len(cols) + 4))
    for r in results:
        ips = r["images_per_s"]
        print(
            f"| {r['set']} | {r['images']} | "
            + " | ".join(f"{ips[c]:.1f}" for c in cols)
            + f" | {r['xraycls_vs_monai_speed']:.2f}x | {r['xraycls_time_vs_decode_only']:.2f}x"
            f" | {r['cached_speedup_vs_xraycls']:.1f}x | {', '.join(r['monai_inverted_or_wrong']) or 'none'} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"size": SIZE, "rounds": args.rounds, "results": results}, indent=2)
        )
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
