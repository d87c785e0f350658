"""Publishing files atomically: a reader (or a resumed run) sees the old file or the new one.

One mechanism for every file the project publishes (manifests, results, weights, calibration,
cache entries, reports): write a temporary file beside the target, flush and ``fsync`` it, rename
it over the target, then ``fsync`` the folder so the rename itself survives a power cut. A failure
at any point removes the temporary file and leaves the target as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from xraycls.errors import OutputError

_WHY = {
    errno.ENOSPC: "the disk is full; free space and re-run (the run resumes where it stopped)",
    errno.EDQUOT: "the disk quota is exceeded; free space and re-run",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EACCES: "permission denied; choose a location you can write to",
    errno.EPERM: "permission denied; choose a location you can write to",
}


def output_error(path: str | Path, e: OSError, what: str = "cannot write") -> OutputError:
    """A one-line :class:`OutputError` for a failed write: the file, the reason and the fix."""
    why = _WHY.get(e.errno or 0) or (e.strerror or str(e))
    err = OutputError(f"{path}: {what}: {why}")
    err.errno = e.errno
    return err


def prepare_output_dir(path: str | Path, *, option: str = "--out") -> Path:
    """Create a folder that will receive outputs (with its parents) and check that it is
    writable, before any work starts.

    Raises:
        OutputError: A file is in the way, the location is read-only or not permitted; the
            message names the option, the path and the fix.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        blocker = next((a for a in [p, *p.parents] if a.exists() and not a.is_dir()), p)
        raise OutputError(
            f"{option} {p}: {blocker} is a file, not a folder; give a folder path"
        ) from e
    except OSError as e:
        raise output_error(f"{option} {p}", e, "cannot create the folder") from e
    try:
        fd, name = tempfile.mkstemp(dir=p, prefix=".xraycls-write-check.")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise output_error(f"{option} {p}", e, "cannot write there") from e
    return p


@contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path``; on a clean exit it is fsynced and renamed onto ``path``.

    For writers that insist on a file name (safetensors, pyarrow). The temporary file exists
    (empty) when the block starts and gets the mode a plain ``open`` would give (0666 minus the
    umask), not ``mkstemp``'s private 0600, so results stay readable by colleagues and viewers.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except OSError as e:
        raise output_error(path, e) from e
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield tmp
        with tmp.open("rb+") as f:  # the writer may have replaced the file: sync what is there
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OutputError:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as e:  # disk full, quota, a file system gone read-only: the target is intact
        tmp.unlink(missing_ok=True)
        if e.errno in _WHY:
            raise output_error(path, e) from e
        if e.errno is None and _disk_full(path.parent):  # numpy: "N requested and M written"
            raise output_error(path, OSError(errno.ENOSPC, str(e))) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(
    path: str | Path,
    mode: str = "w",
    *,
    encoding: str | None = "utf-8",
    newline: str | None = None,
    errors: str | None = None,
) -> Iterator[IO[Any]]:
    """An open file whose content replaces ``path`` atomically when the block ends cleanly.

    Args:
        path: The target.
        mode: ``"w"`` (text) or ``"wb"``.
        encoding: Text encoding (ignored in binary mode).
        newline: As for :func:`open` (``""`` for the csv module).
        errors: As for :func:`open`; ``surrogateescape`` writes non-UTF-8 file names back as
            their original bytes.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        kwargs = (
            {} if mode == "wb" else {"encoding": encoding, "newline": newline, "errors": errors}
        )
        with tmp.open(mode, **kwargs) as f:
            yield f


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Publish ``data`` at ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Publish ``text`` (UTF-8) at ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Strict JSON (NaN/inf become null; numpy scalars become numbers), written atomically."""
    return write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf -> None, numpy scalars -> Python numbers and paths -> strings,
    recursively."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _disk_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1024**2


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # not every file system lets a folder be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe: only where /proc is missing
    os.umask(mask)
    return mask
