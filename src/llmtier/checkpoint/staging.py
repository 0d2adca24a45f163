"""Tensor bytes on their way to the store: host pieces for a synchronous save, a bounded
staging pool for an asynchronous one.

The pool hands out page-aligned chunks (``llmtier.engine.alloc``) up to a
fixed total; a snapshot that needs more waits for the background writer to
give chunks back, so staging memory never exceeds the bound.  Chunks are
kept between saves (no allocation on the hot path).  CUDA tensors are copied
device -> host with ``Tensor.copy_`` into the chunk; the chunks are not
page-locked by this module (see docs/CHECKPOINT.md).
"""
from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..engine import alloc, as_bytes_view
from .tree import LazyTensor, _is_torch

CHUNK = 64 << 20


def _flat_bytes_torch(t: Any) -> Any:
    import torch  # noqa: PLC0415

    t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def host_pieces(value: Any, bounce: np.ndarray | None) -> Iterator[Any]:
    """The bytes of one tensor value as host buffers, in order (a synchronous save's source).

    CPU tensors and numpy arrays are one piece (no copy); a CUDA tensor goes
    through ``bounce`` piece by piece; a :class:`LazyTensor` yields its own pieces.
    """
    if isinstance(value, LazyTensor):
        yield from value.chunks()
        return
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if arr.size:
            yield arr.reshape(-1).view(np.uint8)
        return
    flat = _flat_bytes_torch(value)
    if flat.device.type == "cpu":
        if flat.numel():
            yield flat.numpy()
        return
    import torch  # noqa: PLC0415

    host = torch.from_numpy(bounce if bounce is not None else alloc(CHUNK))
    n = flat.numel()
    for a in range(0, n, host.numel()):
        m = min(host.numel(), n - a)
        host[:m].copy_(flat[a : a + m])
        yield host[:m]


class StagingPool:
    """At most ``limit`` bytes of page-aligned staging memory, in ``chunk``-byte pieces."""

    def __init__(self, limit: int, chunk: int = CHUNK) -> None:
        self.chunk = chunk
        self.limit = max(chunk, limit + (-limit) % chunk)
        self._free: list[np.ndarray] = []
        self._count = 0
        self._cond = threading.Condition()

    @property
    def allocated(self) -> int:
        """Bytes of staging memory allocated so far (never more than ``limit``)."""
        return self._count * self.chunk

    def grow_limit(self, limit: int) -> None:
        """Raise the bound (never lowers it)."""
        with self._cond:
            self.limit = max(self.limit, limit + (-limit) % self.chunk)

    def reserve(self, nbytes: int) -> None:
        """Allocate (and fault in) chunks now until ``nbytes`` (at most the bound) are held, so that a
        snapshot of that size finds them ready."""
        with self._cond:
            while self._count * self.chunk < min(nbytes, self.limit):
                buf = alloc(self.chunk, huge=True)
                buf[::4096] = 0  # touch every page now, not during a snapshot
                self._count += 1
                self._free.append(buf)
            self._cond.notify_all()

    def acquire(self) -> np.ndarray:
        """A free chunk; waits for one to be released when the bound is reached."""
        with self._cond:
            while not self._free:
                if (self._count + 1) * self.chunk <= self.limit:
                    self._count += 1
                    return alloc(self.chunk, huge=True)
                self._cond.wait()
            return self._free.pop()

    def release(self, buf: np.ndarray) -> None:
        """Give a chunk back."""
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        """Drop the free chunks (chunks still in use are freed when released and dropped)."""
        with self._cond:
            self._count -= len(self._free)
            self._free.clear()


class ParallelCopy:
    """``np.copyto`` of large buffers split over the calling thread and ``threads - 1`` helper threads:
    one core's memcpy is slower than the memory, so a snapshot copies on every core it is given."""

    MIN = 8 << 20  # smaller copies run on the calling thread alone

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self._ex = concurrent.futures.ThreadPoolExecutor(self.threads - 1, thread_name_prefix="llmtier-ckpt-copy") \
            if self.threads > 1 else None

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``dst[...] = src`` (flat ``uint8`` arrays of one size)."""
        n = src.nbytes
        if self._ex is None or n < self.MIN:
            np.copyto(dst, src)
            return
        step = -(-n // self.threads // 4096) * 4096
        futs = [self._ex.submit(np.copyto, dst[a : a + step], src[a : a + step]) for a in range(step, n, step)]
        try:
            np.copyto(dst[:step], src[:step])
        finally:
            for f in futs:
                f.result()

    def close(self) -> None:
        """Stop the helper threads."""
        if self._ex is not None:
            self._ex.shutdown()


class Packer:
    """Copies tensors back to back into pool chunks (a chunk holds the tail of one tensor and the head of
    the next).  ``put`` receives ``("data", chunk, start, end)`` for every slice, in order, and
    ``("release", chunk)`` once a chunk holds nothing more to be written: the consumer hands it back to
    the pool then.  The caller's tensor may change as soon as :meth:`add` returns."""

    def __init__(self, pool: StagingPool, put: Any, copier: ParallelCopy | None = None, readahead: Any = None) -> None:
        self.pool, self.put = pool, put
        self.copier = copier
        self.readahead = readahead  # a ReadAhead that supplies the pieces of lazy values
        self.buf: np.ndarray | None = None
        self.fill = 0

    def _room(self) -> np.ndarray:
        if self.buf is None:
            self.buf, self.fill = self.pool.acquire(), 0
        return self.buf

    def _advance(self, start: int, n: int) -> None:
        self.put(("data", self.buf, start, start + n))
        self.fill = start + n
        if self.fill == self.pool.chunk:
            self.put(("release", self.buf))
            self.buf = None

    def add(self, value: Any) -> None:
        """Copy one tensor value (torch, numpy or LazyTensor)."""
        if _is_torch(value) and value.device.type != "cpu":  # device -> host, chunk by chunk
            import torch  # noqa: PLC0415

            flat = _flat_bytes_torch(value)
            n, done = flat.numel(), 0
            while done < n:
                buf = self._room()
                m = min(n - done, self.pool.chunk - self.fill)
                torch.from_numpy(buf[self.fill : self.fill + m]).copy_(flat[done : done + m])
                done += m
                self._advance(self.fill, m)
            return
        # Host memory: numpy copies (torch's copy_ spreads one memcpy over its OpenMP threads, which on a
        # busy machine ran 5x slower than one thread's memcpy).
        ra = self.readahead
        for piece in ra.pieces(value) if ra is not None and ra.handles(value) else host_pieces(value, None):
            src = np.frombuffer(as_bytes_view(piece, writable=False), dtype=np.uint8)
            done = 0
            while done < src.nbytes:
                buf = self._room()
                m = min(src.nbytes - done, self.pool.chunk - self.fill)
                if self.copier is not None:
                    self.copier.copy(buf[self.fill : self.fill + m], src[done : done + m])
                else:
                    np.copyto(buf[self.fill : self.fill + m], src[done : done + m])
                done += m
                self._advance(self.fill, m)

    def finish(self) -> None:
        """Hand over the last, partly filled chunk."""
        if self.buf is not None:
            self.put(("release", self.buf))
            self.buf = None
