"""``xraycls predict --engine ray``: the same :class:`~xraycls.inference.predictor.Predictor` and rows, run
through Ray Data so that decoding and the model scale over a cluster.

The pipeline: ``from_items(paths)`` -> ``map(load)`` (stateless CPU tasks decode and preprocess
each file with :func:`xraycls.inference.rows.load_item`, which never raises) -> ``map_batches(scorer)``
(an actor pool; each actor loads the bundle once with ``Predictor.from_run``, one GPU per actor
when the cluster has GPUs, else CPU actors) -> rows streamed back to the driver with
``iter_batches``. The driver writes them through the same results file as the local engine, so
the schema, the resume rule and the kill safety are the same; only the row order while running
differs (the finished CSV is rewritten in input order). Needs ``pip install 'xraycls[distributed]'``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from xraycls.errors import ImageReadError
from xraycls.inference.rows import ScoreError, error_item, load_item, result_columns, score_items
from xraycls.io.isolate import shared_pool
from xraycls.io.ood import OODCriteria
from xraycls.io.preprocess import Preprocessing


def _load(row: dict[str, Any], prep: Preprocessing, ood: OODCriteria | None) -> dict[str, Any]:
    """One file -> a fixed-schema record (zeros for the pixels of a file that failed).

    The file is decoded in this Ray worker's isolated decoder process (:func:`shared_pool`), so
    a codec abort or hang is this file's error row, not a dead Ray worker whose task Ray retries
    until the whole dataset fails."""
    try:
        item = shared_pool().run(load_item, row["path"], prep, ood=ood)
    except ImageReadError as e:  # DecoderCrashed, DecoderTimeout
        item = error_item(row["path"], e)
    ok = item["pixels"] is not None
    return {
        "path": row["path"],
        "size_bytes": row["size_bytes"],
        "mtime_ns": row["mtime_ns"],
        "ok": ok,
        "pixels": item["pixels"]
        if ok
        else np.zeros((prep.image_size, prep.image_size), np.float32),
        "sop_instance_uid": item["sop_instance_uid"],
        "ood": item["ood"],
        "ood_reasons": item["ood_reasons"],
        "error": item["error"],
        "error_code": item["error_code"],
        "decode_s": item["decode_s"],
    }


class RayScorer:
    """A Ray Data actor: loads the bundle once, turns batches of records into result rows."""

    def __init__(
        self, run_dir: str, members: str, calibration: str | None, device: str, columns: list[str]
    ) -> None:
        from xraycls.inference.predictor import Predictor

        self.predictor = Predictor.from_run(
            run_dir,
            members=members,  # type: ignore[arg-type]
            calibration=calibration,
            device=device,
        )
        self.columns = columns

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score one batch (numpy format) into string columns of the results schema."""
        keys = (
            "path",
            "size_bytes",
            "mtime_ns",
            "sop_instance_uid",
            "ood",
            "ood_reasons",
            "error",
            "error_code",
        )
        items = []
        for i in range(len(batch["path"])):
            item: dict[str, Any] = {k: str(batch[k][i]) for k in keys}
            item["decode_s"] = float(batch["decode_s"][i])
            item["pixels"] = batch["pixels"][i] if bool(batch["ok"][i]) else None
            items.append(item)
        rows, _ = score_items(self.predictor, items)
        return {c: np.array([r[c] for r in rows], dtype=object) for c in self.columns}


def ray_batches(
    todo: list[tuple[str, tuple[str, str]]],
    *,
    run_dir: str | Path,
    members: str,
    calibration: str | None = None,
    prep: Preprocessing,
    classes: list[str],
    batch_size: int,
    ood: OODCriteria | None = None,
    actors: int | None = None,
    multilabel: bool = False,
) -> Iterator[list[dict[str, str]]]:
    """Result rows of ``todo`` ((path, (size, mtime)) pairs), a list per block, as they finish.

    Uses the running Ray instance, or starts one with ``ray.init()`` (which joins the cluster
    named by ``RAY_ADDRESS`` when set).

    Args:
        todo: Files to score with their stat key.
        run_dir: The run bundle every actor loads.
        members: Which weights of the bundle.
        calibration: A site calibration's name (default: the bundle's own).
        prep: The bundle's preprocessing (for the decoding tasks).
        ood: The bundle's out-of-distribution criteria.
        classes: The bundle's classes (for the columns).
        multilabel: The bundle predicts findings (``dec_<finding>`` columns too).
        batch_size: Files per model call.
        actors: Scoring actors (default: one per GPU, or one on CPU).
    """
    if not todo:
        return
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ScoreError("--engine ray needs Ray Data: pip install 'xraycls[distributed]'") from e
    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = False
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = actors or max(1, gpus)
    columns = result_columns(classes, multilabel=multilabel)
    ds = ray.data.from_items(
        [{"path": p, "size_bytes": s, "mtime_ns": m} for p, (s, m) in todo]
    ).map(_load, fn_kwargs={"prep": prep, "ood": ood})
    ds = ds.map_batches(
        RayScorer,
        fn_constructor_kwargs={
            "run_dir": str(Path(run_dir).resolve()),
            "members": members,
            "calibration": calibration,
            "device": "auto" if gpus else "cpu",
            "columns": columns,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n),
        num_gpus=1 if gpus else 0,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        paths = batch["path"]
        yield [{c: str(batch[c][i]) for c in columns} for i in range(len(paths))]
