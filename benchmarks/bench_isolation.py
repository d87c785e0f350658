"""What decoder isolation costs per file: ``load_item`` in this process (as before issue 15)
versus the same call in an isolated decoder process (``DecoderPool``: pickling the task, the
1024² result back through a pipe, the per-file watchdog).

Files: the shared corpus's real chest DICOMs (``dicom/chest_cr``: CR 1955x1841 uncompressed and
JPEG 2000, SIIM 1024² JPEG), each read ``--repeats`` times, alternating the two modes file by
file so that load from other jobs hits both alike. One worker, sequential: this measures the
added latency per file, not throughput. Worker start-up (a fresh interpreter importing the
decoders) is reported separately; it is paid once per worker per run.

Usage: python benchmarks/bench_isolation.py [--size 1024] [--repeats 3] [--out docs/bench_isolation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from xraycls.inference.rows import load_item
    from xraycls.io.isolate import DecoderPool
    from xraycls.io.preprocess import Preprocessing

    root = Path(os.environ.get("XRAYCLS_SHARED_DATA") or REPO.parent / "shared" / "data")
    files = sorted(p for p in (root / "dicom" / "chest_cr").glob("*.dcm"))
    if not files:
        raise SystemExit(f"no chest DICOMs under {root / 'dicom' / 'chest_cr'}")
    prep = Preprocessing(image_size=args.size)
    load_item(str(files[0]), prep)  # imports and plugin discovery, outside the timings
    t0 = time.perf_counter()
    pool = DecoderPool(1)
    pool.run(load_item, str(files[0]), prep)
    startup = time.perf_counter() - t0

    inproc: dict[str, list[float]] = {f.name: [] for f in files}
    isolated: dict[str, list[float]] = {f.name: [] for f in files}
    with pool:
        for _ in range(args.repeats):
            for f in files:
                t = time.perf_counter()
                a = load_item(str(f), prep)
                inproc[f.name].append(time.perf_counter() - t)
                t = time.perf_counter()
                b = pool.run(load_item, str(f), prep)
                isolated[f.name].append(time.perf_counter() - t)
                if a["error"] or b["error"] or not (a["pixels"] == b["pixels"]).all():
                    raise SystemExit(f"{f.name}: the two modes disagree")

        # The fixed cost alone: a task that only loads a cached 1024² image and hands it back
        # (np.load of 2 MiB + the 4 MiB float32 result through the pipe), in and out of process.
        import tempfile

        import numpy as np

        from xraycls.io.preprocess import ImageCache, read_cached

        with tempfile.TemporaryDirectory() as d:
            entry = ImageCache(d).put("ab" * 32, np.random.default_rng(0).random((1024, 1024)))
            ipc_in, ipc_out = [], []
            for _ in range(30):
                t = time.perf_counter()
                read_cached(entry)
                ipc_in.append(time.perf_counter() - t)
                t = time.perf_counter()
                pool.run(read_cached, entry)
                ipc_out.append(time.perf_counter() - t)
        fixed_ms = 1000 * (statistics.median(ipc_out) - statistics.median(ipc_in))

    rows = []
    print(f"{'file':34s} {'in-process s':>13s} {'isolated s':>11s} {'added ms':>9s} {'ratio':>6s}")
    for f in files:
        a, b = statistics.median(inproc[f.name]), statistics.median(isolated[f.name])
        rows.append({"file": f.name, "in_process_s": a, "isolated_s": b})
        print(f"{f.name:34s} {a:13.3f} {b:11.3f} {1000 * (b - a):9.1f} {b / a:6.2f}")
    all_a = statistics.median(x for v in inproc.values() for x in v)
    all_b = statistics.median(x for v in isolated.values() for x in v)
    added = statistics.median(
        b - a for f in files for a, b in zip(inproc[f.name], isolated[f.name], strict=True)
    )
    print(
        f"median per file: in-process {all_a:.3f} s, isolated {all_b:.3f} s "
        f"(added {1000 * added:.1f} ms, x{all_b / all_a:.2f}); worker start-up {startup:.2f} s; "
        f"fixed cost per file (1024² result through the pipe) {fixed_ms:.1f} ms"
    )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "size": args.size,
                    "repeats": args.repeats,
                    "files": rows,
                    "median_in_process_s": all_a,
                    "median_isolated_s": all_b,
                    "median_added_s": added,
                    "worker_startup_s": startup,
                    "fixed_cost_per_file_ms": fixed_ms,
                    "cpu": os.cpu_count(),
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
