"""Images scored per minute through ``xraycls listen`` against ``xraycls predict`` on a folder.

Same bundle, same files: the shared corpus's real chest radiographs (``chest_cr``: 1955x1841 CR
in JPEG 2000 and uncompressed, SIIM 1024² JPEG), copied up to ``--images`` with fresh SOP Instance
UIDs (a listener scores each instance once). Three ways, each in a fresh state/results folder:

- ``predict``: ``score()`` on the folder, results CSV only;
- ``predict --dicom-out``: the same plus an SR and an overlay Secondary Capture per image (the
  work ``listen`` does per image);
- ``listen``: a pynetdicom SCU in this script C-STOREs every file to a ``Listener`` (on
  loopback), which stores, scores, writes the SR + SC and sends them to a C-STORE destination
  (another SCP in this script); timed from the first C-STORE until every result was delivered.

Reports the median of ``--repeats`` runs as images per minute and the ratio to ``predict
--dicom-out`` (same outputs). The model is loaded once, outside the timings.

Usage: python benchmarks/bench_listen.py [--run RUN_DIR] [--tiny resnet50_test] [--size 224]
       [--images 12] [--repeats 3] [--batch-size 4] [--workers 0] [--out docs/bench_listen.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench_predict():
    spec = importlib.util.spec_from_file_location(
        "bench_predict", REPO / "benchmarks" / "bench_predict.py"
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def input_folder(out: Path, n: int, chest_dir: Path) -> list[Path]:
    """``n`` copies of the chest radiographs, each a distinct instance (new SOP Instance UID)."""
    import pydicom
    from pydicom.uid import generate_uid

    chest = sorted(chest_dir.glob("*.dcm"))
    if not chest:
        raise SystemExit(f"no chest DICOMs under {chest_dir} (set XRAYCLS_SHARED_DATA)")
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        ds = pydicom.dcmread(chest[i % len(chest)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = out / f"{i:04d}_{chest[i % len(chest)].name}"
        ds.save_as(path)
        files.append(path)
    return files


def run_predict(
    folder: Path, out: Path, predictor, *, dicom: bool, batch_size: int, workers: int
) -> float:
    from xraycls.inference.scoring import score

    t0 = time.perf_counter()
    s = score(
        folder,
        out / "results.csv",
        run=predictor,
        batch_size=batch_size,
        workers=workers,
        dicom_out=out / "dicom" if dicom else None,
    )
    seconds = time.perf_counter() - t0
    assert s.error == 0 and s.cam_failed == 0, s.line()
    return seconds


def run_listen(files: list[Path], out: Path, predictor, *, batch_size: int) -> float:
    import pydicom
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    from xraycls.inference.listen import ListenConfig, Listener

    delivered: list[int] = []
    sink = AE("PACS")
    for cx in AllStoragePresentationContexts:
        sink.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    server = sink.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda e: delivered.append(1) or 0x0000)],
    )
    cfg = ListenConfig(
        port=0,
        allow=["MODALITY"],
        dest=f"PACS@127.0.0.1:{server.server_address[1]}",
        batch_size=batch_size,
        queue_size=len(files) + 1,
    )
    listener = Listener(predictor, out, cfg)
    listener.start()
    datasets = [pydicom.dcmread(f) for f in files]
    scu = AE("MODALITY")
    for cx in {(d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in datasets}:
        scu.add_requested_context(cx[0], [cx[1]])
    try:
        t0 = time.perf_counter()
        assoc = scu.associate("127.0.0.1", listener.address[1], ae_title="XRAYCLS")
        assert assoc.is_established
        for d in datasets:
            assert assoc.send_c_store(d).Status == 0
        assoc.release()
        assert listener.wait_idle(3600)
        seconds = time.perf_counter() - t0
    finally:
        listener.stop()
        server.shutdown()
    assert listener.stats.scored == len(files) and len(delivered) == 2 * len(files)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="A run bundle (default: a random-init --tiny one).")
    ap.add_argument("--tiny", default="resnet50_test")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0, help="predict's decoding processes")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "bench_listen.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from xraycls.inference.predictor import Predictor

    bp = _bench_predict()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run = args.run or bp.build_bundle(tmp / "bundle", args.tiny, args.size)
        predictor = Predictor.from_run(run, device="cpu")
        files = input_folder(tmp / "in", args.images, bp.shared_dicom() / "chest_cr")
        times: dict[str, list[float]] = {"predict": [], "predict --dicom-out": [], "listen": []}
        for r in range(args.repeats):
            times["predict"].append(
                run_predict(
                    tmp / "in",
                    tmp / f"p{r}",
                    predictor,
                    dicom=False,
                    batch_size=args.batch_size,
                    workers=args.workers,
                )
            )
            times["predict --dicom-out"].append(
                run_predict(
                    tmp / "in",
                    tmp / f"d{r}",
                    predictor,
                    dicom=True,
                    batch_size=args.batch_size,
                    workers=args.workers,
                )
            )
            times["listen"].append(
                run_listen(files, tmp / f"l{r}", predictor, batch_size=args.batch_size)
            )
    per_min = {k: 60 * args.images / statistics.median(v) for k, v in times.items()}
    base = per_min["predict --dicom-out"]
    print(f"{args.images} images, batch {args.batch_size}, median of {args.repeats}")
    print(f"{'path':<22}{'images/min':>12}{'vs predict --dicom-out':>26}")
    for k, v in per_min.items():
        print(f"{k:<22}{v:>12.1f}{v / base:>25.2f}x")
    result = {
        "images": args.images,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "model": str(args.run) if args.run else f"{args.tiny} (random init)",
        "size": args.size,
        "seconds": times,
        "images_per_minute": per_min,
        "ratio_to_predict_dicom_out": {k: v / base for k, v in per_min.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
