"""The spill file of a :class:`~llmtier.offload.kv.TieredCache`: page groups on SSD.

A *page group* is one page (``P`` tokens) of one layer for every row of the
batch, laid out as the K block ``[B, Hk, P, Dk]`` then the V block ``[B, Hv, P, Dv]``
(see ``budget.py``).  It is the unit written when a page fills and read when a layer
needs its past.  Slots are handed out from the end of the file, or from a
free list after a crop; nothing else ever moves.

The file is scratch, not a store (the prefix store keeps checksummed files):
it is named ``.llmtier-kv-PID-TOKEN.spill`` in the given directory, removed
by :meth:`SpillFile.close`, and a file left by a killed process (its PID no
longer running) is removed by the next cache that opens the directory.  It
stays linked while in use so that tracing can map its blocks.  All I/O is
direct, through the engine.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import numpy as np

from ...engine import Engine, File, alloc
from ...plan.kv import MAX_WRITES  # page groups in flight to the disk before a writer waits


class SpillFile:
    """Slots of ``group_bytes`` in one unlinked file, and the writes in flight."""

    def __init__(self, engine: Engine, directory: str, group_bytes: int, *, tag: str = "kv") -> None:
        os.makedirs(directory, exist_ok=True)
        remove_stale(directory)
        self.path = os.path.join(directory, f".llmtier-kv-{os.getpid()}-{secrets.token_hex(4)}.spill")
        self.engine, self.group_bytes, self.tag = engine, group_bytes, tag
        self.file: File = engine.open(self.path, "w")
        self._end = 0
        self._free: list[int] = []
        self._writes: deque[tuple[Future, np.ndarray, int, int]] = deque()  # (future, buffer, layer, offset)
        self._given: set[int] = set()  # slots given back while their write is in flight
        self._spare: list[np.ndarray] = []
        self.bytes_written = 0
        self.write_s = 0.0

    # -- slots -------------------------------------------------------------------------------------------------------
    def take(self) -> int:
        if self._free:
            return self._free.pop()
        off = self._end
        self._end += self.group_bytes
        return off

    def give(self, offset: int) -> None:
        """Hand a slot back; one still being written is free once its write is done."""
        if any(w[3] == offset for w in self._writes):
            self._given.add(offset)
        else:
            self._free.append(offset)

    @property
    def used_bytes(self) -> int:
        return self._end - (len(self._free) + len(self._given)) * self.group_bytes

    # -- buffers and writes -----------------------------------------------------------------------------------------
    def buffer(self) -> np.ndarray:
        """An aligned page-group buffer: a spare one, or a new one."""
        self.reap()
        return self._spare.pop() if self._spare else alloc(self.group_bytes)

    def write(self, buf: np.ndarray, offset: int, layer: int, page: int) -> None:
        """Write ``buf`` at ``offset`` in the background; ``buf`` is the file's until the write is done."""
        while len(self._writes) >= MAX_WRITES:
            self._finish(self._writes.popleft())
        fut = self.file.pwrite(buf, offset, tag=f"{self.tag}:{layer}:{page}")
        self._writes.append((fut, buf, layer, offset))

    def reap(self) -> None:
        while self._writes and self._writes[0][0].done():
            self._finish(self._writes.popleft())

    def wait_layer(self, layer: int) -> None:
        """Wait for every write of ``layer`` still in flight (before its pages are read)."""
        if any(w[2] == layer for w in self._writes):
            self.drain()

    def drain(self) -> None:
        while self._writes:
            self._finish(self._writes.popleft())

    def _finish(self, w: tuple[Future, np.ndarray, int, int]) -> None:
        t0 = time.perf_counter()
        try:
            w[0].result()
        finally:
            self.write_s += time.perf_counter() - t0
        self.bytes_written += self.group_bytes
        if w[3] in self._given:
            self._given.discard(w[3])
            self._free.append(w[3])
        if len(self._spare) < MAX_WRITES:
            self._spare.append(w[1])

    @property
    def writes_in_flight(self) -> int:
        return len(self._writes)

    # -- reads -------------------------------------------------------------------------------------------------------
    def read(self, buf: np.ndarray, offsets: list[int], layer: int, first_page: int = 0) -> Future:
        """Read the page groups at ``offsets`` into consecutive slices of ``buf``, in one batch."""
        g = self.group_bytes
        reqs: list[Any] = [(self.file, "read", buf[i * g:(i + 1) * g], off, f"{self.tag}:{layer}:{first_page + i}")
                           for i, off in enumerate(offsets)]
        return self.engine.submit(reqs)

    def close(self) -> None:
        try:
            self.drain()
        finally:
            self.file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)


_STALE = re.compile(r"^\.llmtier-kv-(\d+)-[0-9a-f]{8}\.spill$")


def remove_stale(directory: str) -> list[str]:
    """Remove spill files whose process is gone; returns their names."""
    gone = []
    for name in os.listdir(directory):
        m = _STALE.match(name)
        if m is None or _running(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            gone.append(name)
    return gone


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (this one included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # running, as another user
    return True
