"""Decoder isolation: untrusted files are decoded in child processes that may die.

A codec is native code fed with bytes from outside the hospital's control. Some mutants make
them abort (a C++ exception through python-gdcm), panic (a Rust ``PanicException`` that is a
``BaseException``), hang (a FIFO, a pathological stream) or allocate without bound. Here each
decode runs in a persistent worker process that is *replaced* when it dies, so a bad file costs
one error row, never the batch:

* a worker that dies while decoding a file turns that file into :class:`DecoderCrashed` (with the
  signal or exit status, and the last line the codec printed);
* a file that takes longer than the wall-clock limit turns into :class:`DecoderTimeout` (the
  worker is killed and replaced);
* every worker runs under a memory cap (``RLIMIT_AS``), so a blow-up is that file's error;
* workers die with their parent: ``PR_SET_PDEATHSIG`` (Linux) plus a watchdog thread, and they exit
  when the task pipe closes.

Workers are fresh interpreters (``python -m xraycls.io.isolate``), not forks: nothing of the
parent's threads, locks or CUDA state is inherited, and no ``__main__`` guard is needed. One
dispatcher thread per pool owns the workers (the death signal is tied to the thread that started
a process, so the thread that spawns them lives as long as the pool).

Limits come from :class:`DecodeLimits` (``XRAYCLS_DECODE_TIMEOUT_S``, ``XRAYCLS_DECODE_MEMORY_MB``).
Tests can inject faults into the workers with ``XRAYCLS_DECODER_FAULT_HOOK=module:function``: the
function is called with each task's path inside the worker before it is decoded (used by the test
suite to abort, hang or panic on marked files; never set it in production).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_ready
from pathlib import Path
from typing import Any

from xraycls.errors import (
    DecoderCrashed,
    DecoderTimeout,
    ImageReadError,
    ImageTooLargeError,
    OutputError,
)

FAULT_HOOK_ENV = "XRAYCLS_DECODER_FAULT_HOOK"
_STARTUP_S = 120.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class DecodeLimits:
    """What one file may cost its decoder."""

    timeout_s: float = 120.0
    """Wall-clock seconds per file (reading included: a FIFO or a stalled network share hangs)."""
    memory_mb: int = 8192
    """Address-space cap of a decoder process in MiB (0: none). A 100-megapixel frame (the
    pixel guard) needs about 2 GiB to decode and render; the rest is the interpreter and codecs."""

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"decode timeout must be positive, got {self.timeout_s}")
        if self.memory_mb < 0:
            raise ValueError(f"decoder memory cap must be >= 0 MiB, got {self.memory_mb}")

    @classmethod
    def from_env(cls) -> DecodeLimits:
        """Defaults, overridden by ``XRAYCLS_DECODE_TIMEOUT_S`` and ``XRAYCLS_DECODE_MEMORY_MB``."""
        d = cls()
        try:
            timeout = float(os.environ.get("XRAYCLS_DECODE_TIMEOUT_S") or d.timeout_s)
            memory = int(os.environ.get("XRAYCLS_DECODE_MEMORY_MB") or d.memory_mb)
        except ValueError as e:
            raise ValueError(
                f"XRAYCLS_DECODE_TIMEOUT_S / XRAYCLS_DECODE_MEMORY_MB must be numbers: {e}"
            ) from e
        return cls(timeout, memory)


@dataclass
class _Task:
    future: Future[Any]
    fn: Callable[..., Any]
    path: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Worker:
    """One decoder process and its two pipes."""

    def __init__(self, limits: DecodeLimits, extra_env: dict[str, str] | None = None) -> None:
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        # The codec's stderr: its last line names a crash (closed in stop()).
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        env = dict(os.environ) | (extra_env or {})
        # One thread per decoder: the workers are the parallelism, and thread pools multiply
        # the address space that the memory cap counts.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "xraycls.io.isolate",
                    str(task_r),
                    str(res_w),
                    str(os.getpid()),
                    str(limits.memory_mb),
                ],
                pass_fds=(task_r, res_w),
                stdin=subprocess.DEVNULL,
                stdout=self.log,
                stderr=self.log,
                env=env,
            )
        finally:
            os.close(task_r)
            os.close(res_w)
        self.tasks = Connection(task_w, readable=False)
        self.results = Connection(res_r, writable=False)
        self.task: _Task | None = None
        self.deadline = 0.0
        self.ready = False
        """Set when the worker has imported its decoders: its first task's clock starts then."""

    def last_words(self) -> str:
        """The last non-empty line the worker printed (e.g. ``terminate called after ...``)."""
        try:
            self.log.seek(max(0, self.log.seek(0, os.SEEK_END) - 2048))
            lines = [ln.strip() for ln in self.log.read().decode(errors="replace").splitlines()]
        except OSError:
            return ""
        lines = [ln for ln in lines if ln]
        return lines[-1][:200] if lines else ""

    def stop(self, *, kill: bool = False) -> int | None:
        """End the process (closing its task pipe asks it to exit) and reap it."""
        with contextlib.suppress(OSError):
            self.tasks.close()
        if kill:
            with contextlib.suppress(OSError):
                self.proc.kill()
        try:
            code = self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        with contextlib.suppress(OSError):
            self.results.close()
        self.log.close()
        return code


def describe_exit(code: int | None) -> str:
    """``SIGABRT``, ``SIGSEGV``, ``exit status 1`` ... for a worker's return code."""
    if code is None:
        return "an unknown cause"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


class DecoderPool:
    """Persistent decoder processes, replaced when they die; tasks get per-file limits.

    Use as a context manager (or call :meth:`close`). :meth:`submit` returns a future whose
    result is the function's return value, or whose exception is an :class:`ImageReadError`
    (the function's own, or :class:`DecoderCrashed` / :class:`DecoderTimeout`).
    """

    def __init__(
        self,
        workers: int = 1,
        limits: DecodeLimits | None = None,
        *,
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: variables set for the worker processes on top of this process's."""
        if workers < 1:
            raise ValueError(f"a decoder pool needs at least one worker, got {workers}")
        self.size = workers
        self.limits = limits or DecodeLimits.from_env()
        self.env = env
        self.crashed = 0
        self.timed_out = 0
        self._pending: collections.deque[_Task] = collections.deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="xraycls-decoders", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public

    def submit(
        self, fn: Callable[..., Any], path: str | Path, *args: Any, **kwargs: Any
    ) -> Future[Any]:
        """Run ``fn(path, *args, **kwargs)`` in a decoder process. ``fn`` must be importable
        (a module-level function) and its arguments and result picklable."""
        fut: Future[Any] = Future()
        with self._lock:
            if self._closing:
                raise RuntimeError("the decoder pool is closed")
            if self._error is not None:
                raise RuntimeError(f"the decoder pool failed: {self._error}") from self._error
            self._pending.append(_Task(fut, fn, str(path), args, kwargs))
        self._wake()
        return fut

    def run(self, fn: Callable[..., Any], path: str | Path, *args: Any, **kwargs: Any) -> Any:
        """:meth:`submit` and wait: the result, or the file's :class:`ImageReadError`."""
        return self.submit(fn, path, *args, **kwargs).result()

    def imap_unordered(
        self,
        fn: Callable[..., Any],
        paths: Iterable[str | Path],
        *args: Any,
        prefetch: int | None = None,
        **kwargs: Any,
    ) -> Iterator[tuple[int, Any]]:
        """``(index, result or ImageReadError)`` for each path, as they finish.

        At most ``prefetch`` (default: twice the workers) tasks are queued ahead, so results
        never pile up in memory while the caller is busy.
        """
        window = max(1, prefetch or 2 * self.size)
        source = iter(enumerate(paths))
        running: dict[Future[Any], int] = {}
        try:
            while True:
                while len(running) < window:
                    nxt = next(source, None)
                    if nxt is None:
                        break
                    running[self.submit(fn, nxt[1], *args, **kwargs)] = nxt[0]
                if not running:
                    return
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    i = running.pop(fut)
                    exc = fut.exception()
                    if exc is not None and not isinstance(exc, ImageReadError):
                        raise exc
                    yield i, exc if exc is not None else fut.result()
        finally:
            for fut in running:
                fut.cancel()

    def close(self) -> None:
        """Stop the workers (a task still running is killed) and the dispatcher thread."""
        with self._lock:
            self._closing = True
        self._wake()
        self._thread.join()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ dispatcher thread

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        workers: list[_Worker] = []
        try:
            self._dispatch(workers)
        except BaseException as e:  # a broken pool must fail its callers, not hang them
            with self._lock:
                self._error = e
                pending = list(self._pending)
                self._pending.clear()
            for w in workers:
                if w.task is not None:
                    pending.append(w.task)
            for t in pending:
                if not t.future.done():
                    t.future.set_exception(RuntimeError(f"the decoder pool failed: {e}"))
        finally:
            for w in workers:
                if w.task is not None and not w.task.future.done():
                    w.task.future.cancel()
                w.stop(kill=w.task is not None)

    def _dispatch(self, workers: list[_Worker]) -> None:
        while True:
            with self._lock:
                if self._closing:
                    return
                idle = [w for w in workers if w.task is None]
                while self._pending and (idle or len(workers) < self.size):
                    task = self._pending.popleft()
                    if not task.future.set_running_or_notify_cancel():
                        continue
                    if not idle:
                        workers.append(_Worker(self.limits, self.env))
                        idle.append(workers[-1])
                    self._start(idle.pop(), task)
            busy = [w for w in workers if w.task is not None]
            now = time.monotonic()
            timeout = min((w.deadline - now for w in busy), default=None)
            ready = wait_ready(
                [self._wake_r, *(w.results for w in busy)],
                timeout=None if timeout is None else max(0.0, timeout),
            )
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(self._wake_r, 4096)
            for w in busy:
                if w.results in ready:
                    self._collect(w, workers)
                elif time.monotonic() >= w.deadline:
                    self._timeout(w, workers)

    def _start(self, w: _Worker, task: _Task) -> None:
        w.task = task
        if w.log.tell() > 1 << 20:  # keep only what the codec prints for the current file
            w.log.seek(0)
            w.log.truncate()
        # A fresh interpreter first imports its decoders (seconds on a busy machine): that
        # start-up does not count against the file's limit.
        w.deadline = time.monotonic() + self.limits.timeout_s + (0 if w.ready else _STARTUP_S)
        # A worker that died idle fails the send: _collect then sees EOF and reports the crash.
        with contextlib.suppress(OSError, ValueError):
            w.tasks.send((task.fn, task.path, task.args, task.kwargs))

    def _collect(self, w: _Worker, workers: list[_Worker]) -> None:
        task = w.task
        assert task is not None
        try:
            kind, value = w.results.recv()
        except (EOFError, OSError):
            try:
                code = w.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                code = None
            words = _last_words(w)
            w.stop(kill=True)
            self._replace(w, workers)
            how = describe_exit(code)
            if not w.ready:  # it died importing its decoders: the installation, not the file
                err = RuntimeError(
                    f"a decoder process could not start ({how}): {words or 'no message'}"
                )
                task.future.set_exception(err)
                raise err from None
            self.crashed += 1
            task.future.set_exception(
                DecoderCrashed(
                    task.path,
                    f"the decoder process died ({how}) while decoding this file"
                    + (f": {words}" if words else "")
                    + "; the file is skipped and the other files are decoded",
                )
            )
            return
        if kind == "ready":
            w.ready = True
            w.deadline = time.monotonic() + self.limits.timeout_s
            return
        w.task = None
        if kind == "fatal":  # not this file's fault: fail the run loudly
            err = RuntimeError(f"a decoder process {value}")
            task.future.set_exception(err)
            raise err
        if kind == "ok":
            task.future.set_result(value)
        else:
            task.future.set_exception(value)

    def _timeout(self, w: _Worker, workers: list[_Worker]) -> None:
        task = w.task
        assert task is not None
        w.stop(kill=True)
        self._replace(w, workers)
        self.timed_out += 1
        task.future.set_exception(
            DecoderTimeout(
                task.path,
                f"reading and decoding took longer than the {self.limits.timeout_s:g} s limit "
                "(a hang, a blocking read or a pathological stream); the decoder was stopped",
            )
        )

    def _replace(self, w: _Worker, workers: list[_Worker]) -> None:
        workers.remove(w)  # a new one is started when the next task needs it


def _last_words(w: _Worker) -> str:
    with contextlib.suppress(ValueError, OSError):
        return w.last_words()
    return ""


# --------------------------------------------------------------------------- journal


class DecodeJournal:
    """For decoding *in this process* (``--workers 0``): each file's path is appended and
    fsynced before it is decoded, and marked done after. A file still open in the journal when
    the next run starts was being decoded when the process died; that run decodes it in an
    isolated process (:meth:`suspects`), so a file that kills its decoder is recorded as
    ``decoder_crashed`` instead of killing every re-run at the same place. (A ``kill -9`` by the
    user also leaves a file open: decoding it isolated once is harmless.)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.suspects: set[str] = set()
        try:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                mark, _, rest = line.partition(" ")
                try:
                    name = json.loads(rest)
                except ValueError:
                    continue  # a line torn by the kill
                if mark == "+":
                    self.suspects.add(name)
                elif mark == "-":
                    self.suspects.discard(name)
        except OSError:
            pass
        self._f: Any = None

    @contextlib.contextmanager
    def decoding(self, path: str) -> Iterator[None]:
        """Record ``path`` durably before the block, and as finished after it."""
        if self._f is None:
            self._f = self.path.open("a", encoding="utf-8")
        self._f.write(f"+ {json.dumps(path)}\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        yield
        self._f.write(f"- {json.dumps(path)}\n")
        self._f.flush()

    def close(self) -> None:
        """The run finished: forget the journal."""
        if self._f is not None:
            self._f.close()
            self._f = None
        self.path.unlink(missing_ok=True)


def run_journaled(
    journal: DecodeJournal, fn: Callable[..., Any], paths: Iterable[str], *args: Any, **kwargs: Any
) -> Iterator[tuple[int, Any]]:
    """``(index, result or ImageReadError)`` of ``fn(path, *args, **kwargs)`` in this process,
    through ``journal``; files the journal suspects are decoded in an isolated process."""
    pool: DecoderPool | None = None
    try:
        for i, p in enumerate(paths):
            if p in journal.suspects:
                pool = pool or DecoderPool(1)
                try:
                    yield i, pool.run(fn, p, *args, **kwargs)
                except ImageReadError as e:
                    yield i, e
                continue
            with journal.decoding(p):
                try:
                    out = fn(p, *args, **kwargs)
                except ImageReadError as e:
                    out = e
            yield i, out
    finally:
        if pool is not None:
            pool.close()


# --------------------------------------------------------------------------- shared pool

_SHARED: DecoderPool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool() -> DecoderPool:
    """A process-wide one-worker pool (the viewer's uploads, a Ray task's files)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED._closing or _SHARED._error is not None:
            _SHARED = DecoderPool(1)
        return _SHARED


# --------------------------------------------------------------------------- the worker side


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(0)

    def watch() -> None:  # for platforms without PR_SET_PDEATHSIG
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _cap_memory(memory_mb: int) -> None:
    if memory_mb <= 0:
        return
    import resource

    limit = memory_mb * 1024**2
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _fault_hook() -> Callable[[str], None] | None:
    spec = os.environ.get(FAULT_HOOK_ENV)
    if not spec:
        return None
    import importlib

    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def _serve(task_fd: int, result_fd: int, parent: int, memory_mb: int) -> None:
    _die_with_parent(parent)
    tasks = Connection(task_fd, writable=False)
    results = Connection(result_fd, readable=False)
    # Import the decoders before the cap, so that the cap measures decoding, not start-up.
    import xraycls.io.preprocess  # noqa: F401
    from xraycls.io.dicom import prepare_decoders

    prepare_decoders()

    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(1)
    _cap_memory(memory_mb)
    warnings.simplefilter("ignore")  # notes travel in ImageMeta.warnings; stderr is for codecs
    hook = _fault_hook()
    results.send(("ready", os.getpid()))
    while True:
        try:
            fn, path, args, kwargs = tasks.recv()
        except (EOFError, OSError):
            return
        except Exception as e:  # the task's function cannot be imported here: a setup error
            results.send(("fatal", f"cannot load the task: {type(e).__name__}: {e}"))
            continue
        try:
            if hook is not None:
                hook(path)
            out: tuple[str, Any] = ("ok", fn(path, *args, **kwargs))
        except (ImageReadError, OutputError) as e:  # OutputError: a run-level failure (disk full)
            out = ("error", e)
        except MemoryError:
            out = (
                "error",
                ImageTooLargeError(
                    path, f"decoding needs more than the decoder's {memory_mb} MiB memory cap"
                ),
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # a panic from a native plugin, a bug: this file's error
            out = ("error", ImageReadError(path, f"the decoder failed: {type(e).__name__}: {e}"))
        try:
            results.send(out)
        except MemoryError:
            results.send(("error", ImageTooLargeError(path, "the decoded image is too large")))


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
