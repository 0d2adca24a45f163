"""Pull the pieces of :class:`~llmtier.checkpoint.LazyTensor` values ahead of the writer.

A lazy value's producer typically reads its piece from SSD (the offloaded
optimizer's state) with one synchronous read per piece.  Pulled in the
writer's thread, every piece's read would wait for the previous piece's
write and the other way round.  :class:`ReadAhead` runs the producers of all
lazy values of one save, in order, on a background thread, up to ``limit``
bytes ahead of the consumer, so reading the next pieces overlaps copying and
writing this one.  The pieces must therefore stay valid after the producer
has been asked for the next one (a fresh buffer per piece); a producer that
reuses one buffer sets ``LazyTensor(..., readahead=False)`` and is pulled
inline, as before.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from ..engine import as_bytes_view
from .tree import LazyTensor

LIMIT = 128 << 20  # bytes pulled ahead of the consumer (plus one piece)
_END = object()


class ReadAhead:
    """Background producer of the pieces of every read-ahead ``LazyTensor`` in ``values`` (in that order).

    The consumer asks for them with :meth:`pieces`, in the same order.  An error of a producer is
    raised by :meth:`pieces` of its value.  Use as a context manager (stops the thread)."""

    def __init__(self, values: list[Any], limit: int = LIMIT) -> None:
        self._lazy = [v for v in values if isinstance(v, LazyTensor) and v.readahead]
        self._limit = limit
        self._items: deque[tuple[Any, int]] = deque()
        self._ahead = 0
        self._stop = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if self._lazy:
            self._thread = threading.Thread(target=self._produce, name="llmtier-ckpt-readahead", daemon=True)
            self._thread.start()

    def _put(self, item: Any, n: int) -> bool:
        with self._cond:
            while self._ahead >= self._limit and not self._stop:
                self._cond.wait()
            if self._stop:
                return False
            self._items.append((item, n))
            self._ahead += n
            self._cond.notify_all()
            return True

    def _produce(self) -> None:
        for value in self._lazy:
            try:
                for piece in value.chunks():
                    if not self._put(piece, as_bytes_view(piece, writable=False).nbytes):
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer of this value
                self._put(exc, 0)
                return
            if not self._put(_END, 0):
                return

    def handles(self, value: Any) -> bool:
        """True when ``value``'s pieces come from this read-ahead."""
        return isinstance(value, LazyTensor) and value.readahead and self._thread is not None

    def pieces(self, value: LazyTensor) -> Iterator[Any]:
        """The pieces of ``value`` (the next read-ahead lazy value, in order)."""
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item, n = self._items.popleft()
                self._ahead -= n
                self._cond.notify_all()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the producer (a piece being read is finished first) and drop what was pulled ahead."""
        with self._cond:
            self._stop = True
            self._items.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
