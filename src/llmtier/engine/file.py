"""An open file of an engine: the user-facing read/write API."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..errors import ClosedError, io_failure
from .batch import LIST, SINGLE
from .plan import READ, WRITE

if TYPE_CHECKING:
    from .base import Engine

_MODES = {"r": os.O_RDONLY, "w": os.O_RDWR | os.O_CREAT | os.O_TRUNC, "r+": os.O_RDWR}


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
        return self.engine._submit([(self, READ, buf, offset, tag)], mode=SINGLE, exact=exact)

    def pwrite(self, buf: Any, offset: int = 0, *, tag: Any = None) -> Future[int]:
        """Write all of ``buf`` at ``offset``; the future gives the byte count."""
        return self.engine._submit([(self, WRITE, buf, offset, tag)], mode=SINGLE)

    def pread_many(self, bufs: Sequence[Any], offsets: Sequence[int], *, tags: Sequence[Any] | None = None,
                   exact: bool = True) -> Future[list[int]]:
        """Read many buffers in one submission; the future gives a count per buffer."""
        return self.engine._submit(_zip(self, READ, bufs, offsets, tags), mode=LIST, exact=exact)

    def pwrite_many(self, bufs: Sequence[Any], offsets: Sequence[int], *,
                    tags: Sequence[Any] | None = None) -> Future[list[int]]:
        """Write many buffers in one submission; the future gives a count per buffer."""
        return self.engine._submit(_zip(self, WRITE, bufs, offsets, tags), mode=LIST)

    def pread_pages(self, buf: Any, offsets: Sequence[int] | Any, page_size: int, *, tag: Any = None) -> Future[int]:
        """Read ``len(offsets)`` pages of ``page_size`` bytes into one buffer.

        Page ``k`` is the file bytes ``[offsets[k], offsets[k] + page_size)``
        and lands in ``buf[k*page_size:(k+1)*page_size]``.  ``buf`` (numpy
        array, torch CPU tensor, memoryview; C-contiguous, writable) must be
        exactly ``len(offsets) * page_size`` bytes; ``offsets`` (a sequence or
        numpy array of ints >= 0, copied at the call) may repeat and need not
        be sorted.  The future gives the total byte count.  Always exact: the
        lowest page that hits end of file raises
        :class:`~llmtier.errors.ShortReadError` with that page's offset; a
        failed page raises the typed error of :func:`~llmtier.errors.io_failure`.

        With ``uring`` and everything ``O_DIRECT``-aligned (buffer address,
        ``page_size`` and every offset) all pages go to the kernel in one
        call, with no Python object per page; otherwise, and on the other
        backends, each page is an ordinary request (same results and errors).
        """
        return self.engine._submit_pages(self, READ, buf, offsets, page_size, tag)

    def pwrite_pages(self, buf: Any, offsets: Sequence[int] | Any, page_size: int, *, tag: Any = None) -> Future[int]:
        """Write page ``k`` of ``buf`` (``buf[k*page_size:(k+1)*page_size]``) at
        ``offsets[k]``, for every ``k``; the future gives the total byte count.

        The counterpart of :meth:`pread_pages`, with the same rules.  With
        repeated offsets, which page's bytes end up there is unspecified.
        """
        return self.engine._submit_pages(self, WRITE, buf, offsets, page_size, tag)

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

    def _extend_to(self, end: int) -> None:
        """Grow the file to ``end`` bytes if it is shorter (never shrinks it).

        ``O_DIRECT`` writes past end of file update the file size as they
        complete, which ext4 does synchronously under the inode lock: queued
        writes then run one at a time.  Extending first makes them ordinary
        in-size writes that proceed in parallel.  If the batch then fails the
        file stays extended (a hole where the data did not land).
        """
        with self._cond:
            if end > os.fstat(self._fd).st_size:
                _os_call(os.ftruncate, self.path, self._fd, end)

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
