"""The engine interface: files, requests, futures, workers and observers.

Every backend shares this code path.  A request is planned into kernel-level
operations (see ``plan.py``), the operations go on a queue, worker threads
hand them to the backend's ``_execute`` (which blocks, with the GIL released,
until they are done), and the request's future completes when its last
operation has.  A blocking call is ``submit(...).result()``: one code path.

Observers (the tracer) are called from worker threads with a list of
:class:`IOEvent` after each executed group of operations; with none
registered nothing is timed or recorded.
"""
from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np

from ..errors import ClosedError, IOFailure, PermissionDeniedError, ShortReadError, io_failure
from .buffers import view_and_address
from .plan import READ, WRITE, Op, Plan, plan_request
from .settings import Settings

_MODES = {"r": os.O_RDONLY, "w": os.O_RDWR | os.O_CREAT | os.O_TRUNC, "r+": os.O_RDWR}
_STOP = object()
_GROUP = 4096  # operations planned before the first group is handed to the backend


class IORequest(NamedTuple):
    """One request for :meth:`Engine.submit`: ``op`` is ``"read"`` or ``"write"``."""

    file: File
    op: str
    buf: Any
    offset: int
    tag: Any = None


class IOEvent(NamedTuple):
    """What an observer learns about one kernel-level operation."""

    backend: str
    op: str  # "read" | "write"
    path: str
    offset: int
    size: int
    tag: Any
    submit_ns: int  # time.monotonic_ns() when handed to the kernel
    complete_ns: int
    result: int  # bytes moved, or -errno
    queue_depth: int  # operations in flight at submit, this one included


Observer = Callable[[list[IOEvent]], None]


class _EngineFuture(Future):
    """A Future whose ``result()`` lends the waiting thread to the engine."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._engine._help(self)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            self._engine._help(self)
        return super().exception(timeout)


class _Batch:
    """Completion bookkeeping for one ``submit`` call.

    ``entries`` holds, per user request in order, its :class:`Plan` or (fast
    path) its single bare :class:`Op`.  ``pending`` counts operations not yet
    completed plus one guard held by the submitter while it is still
    enqueueing, so a batch cannot finish before all of it has been submitted.
    """

    __slots__ = ("entries", "future", "pending", "lock", "single", "exact")

    def __init__(self, engine: Engine, single: bool, exact: bool) -> None:
        self.entries: list[Plan | Op] = []
        self.future: Future = _EngineFuture(engine)
        self.future.set_running_or_notify_cancel()
        self.pending = 1
        self.lock = threading.Lock()
        self.single = single
        self.exact = exact

    def done(self, n: int) -> None:
        """``n`` operations (or the guard) completed; finish when none remain."""
        with self.lock:
            self.pending -= n
            last = self.pending == 0
        if last:
            self.finish()

    def finish(self) -> None:
        """Resolve every request and complete the future (first error wins)."""
        results = []
        error: BaseException | None = None
        for e in self.entries:
            try:
                if type(e) is Op:
                    got = e.res if e.plan is None else e.plan.resolve()
                else:
                    got = e.resolve()  # type: ignore[union-attr]
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                error = error or exc
                continue
            size = e.view.nbytes
            if got < 0 and error is None:
                verb = "read" if e.kind == READ else "write"
                error = io_failure(f"{verb} failed", path=e.file.path, offset=e.offset, size=size, errno=-got)
            elif e.kind == READ and self.exact and got < size and error is None:
                error = ShortReadError(path=e.file.path, offset=e.offset, size=size, got=got)
            results.append(got)
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(results[0] if self.single else results)


class File:
    """An open file of an :class:`Engine`. Use as a context manager."""

    def __init__(self, engine: Engine, path: str | os.PathLike[str], mode: str) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of 'r', 'w', 'r+', got {mode!r}")
        self.engine = engine
        self.path = os.fspath(path)
        self.mode = mode
        self._outstanding = 0
        self._cond = threading.Condition()
        self._closed = False
        flags = _MODES[mode] | getattr(os, "O_CLOEXEC", 0)
        self._fd = _open(self.path, flags)
        self._direct_fd: int | None = None
        #: why this file is not using direct I/O although the engine asked for it (or None)
        self.direct_reason: str | None = None
        if engine._uses_direct:
            try:
                self._direct_fd = os.open(self.path, (flags & ~(os.O_CREAT | os.O_TRUNC)) | os.O_DIRECT)
            except OSError as exc:
                self.direct_reason = f"O_DIRECT refused by the file system ({exc.strerror}); using buffered I/O"

    @property
    def direct(self) -> bool:
        """True when aligned requests bypass the page cache."""
        return self._direct_fd is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def size(self) -> int:
        """Current length of the file in bytes."""
        return os.fstat(self._checked_fd()).st_size

    def pread(self, buf: Any, offset: int = 0, *, tag: Any = None, exact: bool = True) -> Future[int]:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``.

        The future gives the byte count.  With ``exact`` (default) a read that
        hits end of file fails with :class:`~llmtier.errors.ShortReadError`;
        with ``exact=False`` it returns the shorter count.  Bytes past the
        count are left untouched.
        """
        return self.engine._submit([(self, READ, buf, offset, tag)], single=True, exact=exact)

    def pwrite(self, buf: Any, offset: int = 0, *, tag: Any = None) -> Future[int]:
        """Write all of ``buf`` at ``offset``; the future gives the byte count."""
        return self.engine._submit([(self, WRITE, buf, offset, tag)], single=True)

    def pread_many(self, bufs: Sequence[Any], offsets: Sequence[int], *, tags: Sequence[Any] | None = None,
                   exact: bool = True) -> Future[list[int]]:
        """Read many buffers in one submission; the future gives a count per buffer."""
        return self.engine._submit(_zip(self, READ, bufs, offsets, tags), single=False, exact=exact)

    def pwrite_many(self, bufs: Sequence[Any], offsets: Sequence[int], *,
                    tags: Sequence[Any] | None = None) -> Future[list[int]]:
        """Write many buffers in one submission; the future gives a count per buffer."""
        return self.engine._submit(_zip(self, WRITE, bufs, offsets, tags), single=False)

    def sync(self) -> None:
        """Flush written data and metadata to stable storage (``fsync``)."""
        fd = self._checked_fd()
        self.wait_idle()
        _os_call(os.fsync, self.path, fd)

    def truncate(self, length: int) -> None:
        """Set the file length (``ftruncate``)."""
        _os_call(os.ftruncate, self.path, self._checked_fd(), length)

    def allocate(self, length: int) -> None:
        """Reserve disk space for ``length`` bytes (``posix_fallocate``); ENOSPC surfaces here."""
        _os_call(os.posix_fallocate, self.path, self._checked_fd(), 0, length)

    def wait_idle(self) -> None:
        """Block until every request submitted on this file has completed."""
        with self._cond:
            self._cond.wait_for(lambda: self._outstanding == 0)

    def close(self) -> None:
        """Wait for this file's requests in flight, then close it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.wait_idle()
        for fd in (self._direct_fd, self._fd):
            if fd is not None:
                os.close(fd)
        self.engine._forget(self)

    def _checked_fd(self) -> int:
        if self._closed:
            raise ClosedError(f"file {self.path} is closed")
        return self._fd

    def _track(self, n: int) -> None:
        with self._cond:
            self._outstanding += n
            if self._outstanding == 0:
                self._cond.notify_all()

    def __enter__(self) -> File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("direct" if self.direct else "buffered")
        return f"<llmtier File {self.path!r} mode={self.mode!r} {state} engine={self.engine.name}>"


class Engine:
    """Moves bytes between host buffers and files. Backends subclass this.

    Subclasses set ``name``, and implement :meth:`_execute`; the class
    attributes below say how the shared dispatcher feeds them.
    """

    name = "base"
    #: split large direct operations into ``chunk_size`` pieces before queueing
    #: (False: the backend splits itself)
    _split = True
    #: a worker takes every queued operation at once (True) or one at a time
    _take_all = False

    def __init__(self, settings: Settings, reason: str = "") -> None:
        self.settings = settings
        #: why this backend was chosen (set by ``open_engine("auto")``)
        self.reason = reason or f"{self.name} requested explicitly"
        self._observers: list[Observer] = []
        self._files: set[File] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"llmtier-{self.name}-{i}", daemon=True)
            for i in range(self._worker_count())
        ]
        for t in self._workers:
            t.start()

    # -- what backends provide -------------------------------------------------
    @property
    def _uses_direct(self) -> bool:
        return self.settings.direct

    def _worker_count(self) -> int:
        return 1

    def _execute(self, ops: list[Op], record: bool) -> list[IOEvent] | None:
        """Carry out ``ops``, setting ``op.res``.

        With ``record``, either set ``op.t_submit``/``t_complete``/``qd`` and
        return None (one event per op), or return the events themselves.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _execute")

    def _close_backend(self) -> None:
        """Release backend resources after the workers have stopped."""

    # -- public API ------------------------------------------------------------
    def open(self, path: str | os.PathLike[str], mode: str = "r") -> File:
        """Open ``path`` with ``mode`` ``"r"``, ``"w"`` (create/truncate) or ``"r+"``."""
        self._check_open()
        f = File(self, path, mode)
        with self._lock:
            self._files.add(f)
        return f

    def submit(self, requests: Iterable[IORequest | tuple], *, exact: bool = True) -> Future[list[int]]:
        """Submit a batch of requests in one call; the future gives a count per request."""
        items = []
        for r in requests:
            file, op, buf, offset, *rest = r
            if op not in ("read", "write"):
                raise ValueError(f"op must be 'read' or 'write', got {op!r}")
            items.append((file, READ if op == "read" else WRITE, buf, offset, rest[0] if rest else None))
        return self._submit(items, single=False, exact=exact)

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(events)`` after each group of operations completes."""
        with self._lock:
            self._observers = [*self._observers, observer]

    def remove_observer(self, observer: Observer) -> None:
        with self._lock:
            self._observers = [o for o in self._observers if o is not observer]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Finish every request already submitted, stop the workers, close files. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._workers:
            self._queue.put(_STOP)
        for t in self._workers:
            t.join()
        for f in list(self._files):
            f.close()
        self._close_backend()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<llmtier Engine {self.name} ({'closed' if self._closed else self.reason})>"

    # -- internals -------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"engine {self.name} is closed")

    def _forget(self, f: File) -> None:
        with self._lock:
            self._files.discard(f)

    def _submit(self, items: Iterable[tuple], *, single: bool, exact: bool = True) -> Future:
        self._check_open()
        align = self.settings.alignment
        chunk = self.settings.chunk_size if self._split else None
        batch = _Batch(self, single, exact)
        entries = batch.entries
        # Pass 1: validate everything before any I/O starts, so a bad request
        # raises here and nothing of the batch is in flight.  Aligned direct
        # requests on numpy arrays take the fast path: one bare Op with the
        # array itself as the buffer, its address checked by the backend (a
        # misaligned one comes back -EINVAL and is re-planned, see _work).
        # This loop runs once per request: keep it lean.
        slow: list[tuple] = []
        last = None
        direct_fd = None
        for file, kind, buf, offset, tag in items:
            if file is not last:
                self._check_file(file)
                last, direct_fd = file, file._direct_fd
            if kind == WRITE and file.mode == "r":
                raise PermissionDeniedError("cannot write: file was opened read-only (mode 'r')",
                                            path=file.path, offset=offset, size=None)
            if offset < 0:
                raise ValueError(f"offset must be >= 0, got {offset}")
            if type(buf) is np.ndarray and direct_fd is not None and not offset % align:
                n = buf.nbytes
                if n and not n % align and (chunk is None or n <= chunk):
                    flags = buf.flags
                    if flags.c_contiguous and (kind == WRITE or flags.writeable):
                        entries.append(Op(kind, direct_fd, buf, offset, file, tag, None))
                        continue
            view, addr = view_and_address(buf, writable=kind == READ)
            slow.append((len(entries), (kind, file, view, addr, offset, tag)))
            entries.append(None)  # type: ignore[arg-type]  # planned below
        # Pass 2: plan the rest and enqueue in groups, so the backend starts
        # on the first group while later ones are still being planned.
        for index, (kind, file, view, addr, offset, tag) in slow:
            entries[index] = plan_request(kind, file, view, addr, offset, tag, direct_fd=file._direct_fd,
                                          buffered_fd=file._fd, align=align, chunk=chunk)
        group: list[Op] = []
        for e in entries:
            if type(e) is Op:
                group.append(e)
            else:
                group.extend(e.ops)  # type: ignore[union-attr]
            if len(group) >= _GROUP:
                self._enqueue(batch, group)
                group = []
        if group:
            self._enqueue(batch, group)
        batch.done(1)  # release the submitter's guard
        return batch.future

    def _check_file(self, file: File) -> None:
        if file.engine is not self:
            raise ValueError(f"{file!r} belongs to another engine")
        file._checked_fd()

    def _enqueue(self, batch: _Batch, ops: list[Op]) -> None:
        with batch.lock:
            batch.pending += len(ops)
        _count_per_file(ops, +1)
        for op in ops:
            op.batch = batch
        if self._take_all:
            self._queue.put(ops)
        else:
            for op in ops:
                self._queue.put((op,))

    def _work(self) -> None:
        """Worker loop: take operations, execute them, complete their batches."""
        while self._process(self._queue.get()):
            pass

    def _help(self, future: Future) -> None:
        """Caller-runs: a thread about to block on ``future`` executes queued
        work itself instead of sleeping while a worker wakes up (a thread
        hand-off costs tens of microseconds, as much as a 4 KiB read)."""
        while not future.done():
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if not self._process(item):
                return

    def _process(self, item: Any) -> bool:
        """Execute one queue item (with ``_take_all``: everything queued).

        Returns False once a stop marker was taken (it is put back for the
        other threads when the taker is not a worker).
        """
        if item is _STOP:
            self._pass_on_stop()
            return False
        ops = list(item)
        stop = False
        if self._take_all:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                ops.extend(item)
        self._run(ops)
        self._replan_misaligned(ops)
        self._complete(ops)
        if stop:
            self._pass_on_stop()
        return not stop

    def _pass_on_stop(self) -> None:
        """A stop marker is meant for a worker: a helping caller puts it back."""
        if threading.current_thread() not in self._workers:
            self._queue.put(_STOP)

    def _run(self, ops: list[Op]) -> None:
        """Execute ``ops`` (results land in ``op.res``) and tell the observers."""
        observers = self._observers
        events = None
        try:
            events = self._execute(ops, bool(observers))
        except BaseException as exc:  # noqa: BLE001 - a backend bug must not hang futures
            for op in ops:
                op.res = -(getattr(exc, "errno", None) or errno.EIO)
        if observers:
            self._notify(observers, events if events is not None else [self._event(op) for op in ops])

    def _replan_misaligned(self, ops: list[Op]) -> None:
        """Fast-path ops whose buffer address O_DIRECT refused: bounce them, here and now."""
        for op in ops:
            if op.plan is None and op.res == -errno.EINVAL:
                view, addr = view_and_address(op.view, writable=op.kind == READ)
                op.plan = plan_request(op.kind, op.file, view, addr, op.offset, op.tag, direct_fd=op.fd,
                                       buffered_fd=op.file._fd, align=self.settings.alignment,
                                       chunk=self.settings.chunk_size if self._split else None)
                self._run(op.plan.ops)

    @staticmethod
    def _complete(ops: list[Op]) -> None:
        _count_per_file(ops, -1)
        for batch, n in _tally(op.batch for op in ops):
            batch.done(n)

    def _event(self, op: Op, offset: int | None = None, size: int | None = None, t_submit: int | None = None,
               t_complete: int | None = None, res: int | None = None, qd: int | None = None) -> IOEvent:
        """The event for ``op`` (fields may be overridden for one piece of it)."""
        return IOEvent(self.name, "read" if op.kind == READ else "write", op.file.path,
                       op.offset if offset is None else offset, op.view.nbytes if size is None else size, op.tag,
                       op.t_submit if t_submit is None else t_submit, op.t_complete if t_complete is None else t_complete,
                       op.res if res is None else res, op.qd if qd is None else qd)

    @staticmethod
    def _notify(observers: list[Observer], events: list[IOEvent]) -> None:
        for obs in observers:
            try:
                obs(events)
            except Exception:  # noqa: BLE001 - a broken observer must not break I/O
                import logging  # noqa: PLC0415

                logging.getLogger("llmtier.engine").exception("engine observer %r failed", obs)


def _tally(objs: Iterable[Any]) -> list[tuple[Any, int]]:
    """Distinct objects (by identity) with how often each occurs, in first-seen order."""
    seen: dict[int, list] = {}
    for obj in objs:
        entry = seen.get(id(obj))
        if entry is None:
            seen[id(obj)] = [obj, 1]
        else:
            entry[1] += 1
    return [(obj, n) for obj, n in seen.values()]


def _count_per_file(ops: list[Op], sign: int) -> None:
    """Adjust each file's count of operations in flight (one lock per file)."""
    for file, n in _tally(op.file for op in ops):
        file._track(sign * n)


def _zip(file: File, kind: int, bufs: Sequence[Any], offsets: Sequence[int], tags: Sequence[Any] | None) -> list[tuple]:
    if len(bufs) != len(offsets) or (tags is not None and len(tags) != len(bufs)):
        raise ValueError(f"bufs, offsets and tags differ in length: {len(bufs)}, {len(offsets)}, "
                         f"{len(tags) if tags is not None else '-'}")
    tags = tags if tags is not None else [None] * len(bufs)
    return [(file, kind, b, o, t) for b, o, t in zip(bufs, offsets, tags)]


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        raise io_failure("cannot open file", path=path, offset=None, size=None, errno=exc.errno or 0) from None


def _os_call(fn: Callable[..., Any], path: str, *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as exc:
        raise io_failure(f"{fn.__name__} failed", path=path, offset=None, size=None, errno=exc.errno or 0) from None


def now_ns() -> int:
    """The clock every event uses (CLOCK_MONOTONIC, also used by the C extension)."""
    return time.monotonic_ns()


__all__ = ["Engine", "File", "IOEvent", "IORequest", "IOFailure", "Observer", "now_ns"]
