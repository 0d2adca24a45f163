"""Backends built on blocking ``preadv``/``pwritev`` system calls.

``posix``   buffered I/O through the page cache, one request at a time on one
            worker: what ``open(...).readinto`` / ``torch.load`` users get.
``threads`` ``O_DIRECT`` with page-aligned buffers; large requests are split
            into ``chunk_size`` pieces that a pool of ``threads`` workers
            issues concurrently (queue depth = threads).  Python releases the
            GIL inside each system call, so the pool overlaps real I/O.
"""
from __future__ import annotations

import os
import threading

from .base import Engine, now_ns
from .plan import READ, Op


def transfer(op: Op) -> int:
    """Move all of ``op``'s bytes with blocking calls; bytes moved or ``-errno``.

    Retries short transfers and EINTR; a read that returns 0 is end of file.
    """
    view, offset, done, n = op.view, op.offset, 0, op.view.nbytes
    call = os.preadv if op.kind == READ else os.pwritev
    while done < n:
        if done and not isinstance(view, memoryview):
            view = memoryview(view).cast("B")  # a numpy array: slice by bytes from here on
        try:
            got = call(op.fd, [view[done:] if done else view], offset + done)
        except InterruptedError:
            continue
        except OSError as exc:
            return -(exc.errno or 5)
        if got == 0:
            if op.kind == READ:
                break
            return -5  # EIO: a write that makes no progress
        done += got
    return done


class PosixEngine(Engine):
    """Buffered ``pread``/``pwrite``, one request at a time: the baseline."""

    name = "posix"
    _split = False

    @property
    def _uses_direct(self) -> bool:
        return False

    def _execute(self, ops: list[Op], record: bool) -> None:
        for op in ops:
            if record:
                op.qd = 1
                op.t_submit = now_ns()
                op.res = transfer(op)
                op.t_complete = now_ns()
            else:
                op.res = transfer(op)


class ThreadsEngine(Engine):
    """``O_DIRECT`` through a pool of threads issuing chunked blocking calls."""

    name = "threads"

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._qd_lock = threading.Lock()
        self._running = 0
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _worker_count(self) -> int:
        return self.settings.threads

    def _execute(self, ops: list[Op], record: bool) -> None:
        for op in ops:
            if not record:
                op.res = transfer(op)
                continue
            with self._qd_lock:
                self._running += 1
                op.qd = self._running
            op.t_submit = now_ns()
            op.res = transfer(op)
            op.t_complete = now_ns()
            with self._qd_lock:
                self._running -= 1
