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
import itertools
import operator
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, NamedTuple

import numpy as np

from ..errors import ClosedError, PermissionDeniedError
from .batch import LIST, SUM, Batch, count_per_file, tally
from .buffers import as_bytes_view, view_and_address
from .file import File
from .plan import READ, WRITE, Op, PagesOp, plan_request
from .settings import Settings

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

# Observers of every engine in the process (the tracer's switch); replaced, never mutated.
_global_observers: list[Observer] = []
_global_lock = threading.Lock()


def add_global_observer(observer: Observer) -> None:
    """Call ``observer(events)`` for the operations of every engine, present and future."""
    global _global_observers
    with _global_lock:
        _global_observers = [*_global_observers, observer]


def remove_global_observer(observer: Observer) -> None:
    global _global_observers
    with _global_lock:
        _global_observers = [o for o in _global_observers if o is not observer]


def _younger(item: Any, seq: int) -> bool:
    """Whether queue ``item`` (a run of ops of one batch) was submitted after batch ``seq``."""
    return item is not _STOP and bool(item) and item[0].batch.seq > seq


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
    #: ``_execute`` accepts a :class:`PagesOp` (all pages of a ``pread_pages``
    #: call in one operation); False: such calls become one request per page
    _gather = False

    def __init__(self, settings: Settings, reason: str = "") -> None:
        self.settings = settings
        #: why this backend was chosen (set by ``open_engine("auto")``)
        self.reason = reason or f"{self.name} requested explicitly"
        self._observers: list[Observer] = []
        self._files: set[File] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._seq = itertools.count()  # batch submission order
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
    def prioritize(self, nice: int = -10) -> str | None:
        """Set the Linux nice value of this engine's worker threads.

        Compute threads that spin between parallel regions (OpenMP, as torch
        uses) can keep the worker that refills the device's queue off the
        CPU, and the disk idles.  A negative ``nice`` lets the worker run as
        soon as a completion arrives; it needs root or ``CAP_SYS_NICE``.
        Returns None when done, or why it could not be done.
        """
        for t in self._workers:
            try:
                os.setpriority(os.PRIO_PROCESS, t.native_id, nice)
            except OSError as exc:
                return f"cannot set nice {nice} on the I/O threads ({exc.strerror}; needs root or CAP_SYS_NICE)"
        return None

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
        return self._submit(items, mode=LIST, exact=exact)

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

    def _submit(self, items: Iterable[tuple], *, mode: str, exact: bool = True) -> Future:
        """Submit ``(file, kind, buf, offset, tag)`` requests as one batch;
        ``mode`` (batch.LIST/SINGLE/SUM) says what the future gives."""
        self._check_open()
        align = self.settings.alignment
        chunk = self.settings.chunk_size if self._split else None
        batch = Batch(self, mode, exact)
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
        write_ends: dict[File, int] = {}
        for file, kind, buf, offset, tag in items:
            if file is not last:
                self._check_file(file)
                last, direct_fd = file, file._direct_fd
            if offset < 0:
                raise ValueError(f"offset must be >= 0, got {offset}")
            if kind == WRITE:
                if file.mode == "r":
                    raise PermissionDeniedError("cannot write: file was opened read-only (mode 'r')",
                                                path=file.path, offset=offset, size=None)
                if direct_fd is not None:
                    end = offset + _nbytes(buf)
                    if end > write_ends.get(file, 0):
                        write_ends[file] = end
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
        for file, end in write_ends.items():
            file._extend_to(end)
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

    def _submit_pages(self, file: File, kind: int, buf: Any, offsets: Any, page_size: int, tag: Any) -> Future:
        """``File.pread_pages``/``pwrite_pages``: validate, then one :class:`PagesOp`
        (backends with ``_gather``, everything aligned and direct) or one
        request per page through :meth:`_submit`; the future gives the total."""
        self._check_open()
        self._check_file(file)
        page = operator.index(page_size)
        if page <= 0:
            raise ValueError(f"page_size must be > 0, got {page}")
        offs = _page_offsets(offsets, page)
        if kind == WRITE and file.mode == "r":
            raise PermissionDeniedError("cannot write: file was opened read-only (mode 'r')",
                                        path=file.path, offset=int(offs[0]) if len(offs) else None, size=page)
        view, addr = view_and_address(buf, writable=kind == READ)
        n = len(offs)
        if view.nbytes != n * page:
            raise ValueError(f"buffer is {view.nbytes} bytes; {n} pages of {page} bytes need {n * page}")
        direct_fd = file._direct_fd
        mask = self.settings.alignment - 1  # a power of two
        if (self._gather and n and direct_fd is not None and not addr & mask and not page & mask
                and not (offs & mask).any()):
            if kind == WRITE:
                file._extend_to(int(offs.max()) + page)
            batch = Batch(self, SUM, True)
            op = PagesOp(kind, direct_fd, view, offs, page, file, tag)
            batch.entries.append(op)
            self._enqueue(batch, [op])
            batch.done(1)  # release the submitter's guard
            return batch.future
        arr = np.frombuffer(view, dtype=np.uint8) if n else view
        return self._submit([(file, kind, arr[k * page : (k + 1) * page], off, tag)
                             for k, off in enumerate(offs.tolist())], mode=SUM)

    def _check_file(self, file: File) -> None:
        if file.engine is not self:
            raise ValueError(f"{file!r} belongs to another engine")
        file._checked_fd()

    def _enqueue(self, batch: Batch, ops: list[Op]) -> None:
        with batch.lock:
            batch.pending += len(ops)
        count_per_file(ops, +1)
        for op in ops:
            op.batch = batch
        if self._take_all:
            self._queue.put(ops)
        else:
            for op in ops:
                self._queue.put((op,))

    def _work(self) -> None:
        """Worker loop: take operations, execute them, complete their batches."""
        running = True
        while running:
            running = self._process(self._queue.get())

    def _help(self, future: Future) -> None:
        """Caller-runs: a thread about to block on ``future`` executes queued
        work itself instead of sleeping while a worker wakes up (a thread
        hand-off costs tens of microseconds, as much as a 4 KiB read)."""
        upto = getattr(future, "_seq", None)
        while not future.done():
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if upto is not None and _younger(item, upto):
                self._queue.put(item)  # submitted after the awaited batch: the workers' work, not ours
                return
            if not self._process(item, upto):
                return

    def _process(self, item: Any, upto: int | None = None) -> bool:
        """Execute one queue item (with ``_take_all``: everything queued; a helping caller
        waiting for batch ``upto``: everything queued that was submitted up to it).

        Returns False once a stop marker was taken (it is put back for the
        other threads when the taker is not a worker).
        """
        if item is _STOP:
            self._pass_on_stop()
            return False
        ops = list(item)
        stop = False
        if self._take_all:
            later = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                if upto is not None and _younger(item, upto):
                    later.append(item)
                    continue
                ops.extend(item)
            for item in later:
                self._queue.put(item)
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
        observers = self._observers + _global_observers if _global_observers else self._observers
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
            if op.plan is None and op.res == -errno.EINVAL and type(op) is Op:  # a PagesOp is never re-planned
                view, addr = view_and_address(op.view, writable=op.kind == READ)
                op.plan = plan_request(op.kind, op.file, view, addr, op.offset, op.tag, direct_fd=op.fd,
                                       buffered_fd=op.file._fd, align=self.settings.alignment,
                                       chunk=self.settings.chunk_size if self._split else None)
                self._run(op.plan.ops)

    @staticmethod
    def _complete(ops: list[Op]) -> None:
        count_per_file(ops, -1)
        for batch, n in tally(op.batch for op in ops):
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
            except Exception:
                import logging  # noqa: PLC0415

                logging.getLogger("llmtier.engine").exception("engine observer %r failed", obs)


def _nbytes(buf: Any) -> int:
    """Byte length of a buffer (cheap for numpy arrays)."""
    return buf.nbytes if type(buf) is np.ndarray else as_bytes_view(buf, writable=False).nbytes


def _page_offsets(offsets: Any, page: int) -> np.ndarray:
    """``offsets`` as a fresh 1-D int64 array (a snapshot: the caller may reuse
    theirs at once), each >= 0 with the page's end representable."""
    arr = np.asarray(offsets)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise TypeError(f"offsets must be a 1-D sequence of ints, got {arr.dtype} with shape {arr.shape}")
    if arr.dtype.kind == "u" and int(arr.max()) > _INT64_MAX - page:
        raise ValueError(f"page offset {int(arr.max())} is out of range")
    offs = np.array(arr, dtype=np.int64)
    if (offs < 0).any():
        raise ValueError(f"offsets must be >= 0, got {int(offs.min())}")
    if int(offs.max()) > _INT64_MAX - page:
        raise ValueError(f"page offset {int(offs.max())} + page size {page} is out of range")
    return offs


_INT64_MAX = (1 << 63) - 1


def now_ns() -> int:
    """The clock every event uses (CLOCK_MONOTONIC, also used by the C extension)."""
    return time.monotonic_ns()


__all__ = ["Engine", "File", "IOEvent", "IORequest", "Observer", "now_ns"]
