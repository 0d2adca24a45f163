"""Page-aligned host buffers and a pool so hot paths never allocate.

``alloc(n)`` returns a numpy ``uint8`` array backed by an anonymous ``mmap``:
its address is page aligned, which is what ``O_DIRECT`` needs.  A torch view
is ``torch.from_numpy(buf)`` (no copy).  The memory is freed when the last
view of it is dropped.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

PAGE = mmap.PAGESIZE


def alloc(nbytes: int, *, huge: bool = False) -> np.ndarray:
    """Return ``nbytes`` of page-aligned, zero-filled host memory as ``uint8``.

    ``huge=True`` asks the kernel for transparent huge pages (``MADV_HUGEPAGE``:
    2 MiB pages where the system allows them, ordinary pages otherwise).  For
    buffers that are filled whole by direct I/O again and again (the weight
    streamer's slots, the store's stages and arenas, the optimizer's chunks):
    a direct read or write pins its buffer's pages, and on the development VM
    reads into huge pages ran 2.41 GiB/s against 1.86 into 4 KiB pages (the
    same file and engine, 256 MiB reads).  Not for sparse buffers that give
    single pages back (:func:`discard_pages`, :func:`move_pages`).

    >>> buf = alloc(1 << 20)
    >>> buf.ctypes.data % 4096
    0
    """
    if nbytes < 0:
        raise ValueError(f"alloc: nbytes must be >= 0, got {nbytes}")
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    mapping = mmap.mmap(-1, round_up(nbytes, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # no transparent huge pages here: ordinary pages
            mapping.madvise(mmap.MADV_HUGEPAGE)
    # The array keeps the mmap alive through its ``base`` chain.
    return np.frombuffer(mapping, dtype=np.uint8, count=nbytes)


def discard_pages(buf: np.ndarray, start: int, stop: int) -> int:
    """Give the whole pages of ``buf[start:stop]`` back to the system (``MADV_DONTNEED``); they read as
    zeros afterwards.  ``buf`` must come from :func:`alloc`.  Returns the bytes released (the partial
    pages at either end are kept: they may hold neighbouring data).

    >>> buf = alloc(3 * PAGE); buf[:] = 7
    >>> discard_pages(buf, 1, 3 * PAGE), int(buf[PAGE]), int(buf[0])
    (8192, 0, 7)
    """
    mapping = _mapping_of(buf)
    a, b = round_up(max(0, start), PAGE), round_down(min(stop, buf.nbytes), PAGE)
    if b <= a:
        return 0
    mapping.madvise(mmap.MADV_DONTNEED, a, b - a)
    return b - a


_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2
_libc: Any = None


def _mremap() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mremap.restype = ctypes.c_void_p
        lib.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        _libc = lib
    return _libc


def move_pages(src: np.ndarray, src_start: int, dst: np.ndarray, dst_start: int, nbytes: int) -> bool:
    """Move the physical pages of ``src[src_start:src_start+nbytes]`` to ``dst[dst_start:...]`` (Linux
    ``mremap``): ``dst`` then holds what ``src`` held, with no page fault and no copy, and ``src``'s range reads
    as zeros (a fresh anonymous mapping, no memory until touched).  For a cache that evicts one entry to make
    room for another of the same size in a fixed-place buffer: reading into moved pages skips the faults of
    fresh ones (about 0.45 s per GiB on the development VM).  Both buffers must come from :func:`alloc`; both
    ranges page aligned and ``nbytes`` a multiple of the page size.  Returns False, changing nothing, where the
    move is not possible here (not Linux, unaligned): the caller then reads into fresh pages as before.

    >>> a, b = alloc(2 * PAGE), alloc(2 * PAGE); a[:] = 7
    >>> move_pages(a, PAGE, b, 0, PAGE), int(b[0]), int(a[PAGE]), int(a[0])
    (True, 7, 0, 7)
    """
    if not sys.platform.startswith("linux") or nbytes <= 0 or nbytes % PAGE:
        return False
    _mapping_of(src), _mapping_of(dst)  # both from alloc(): anonymous, private, page aligned
    if src_start % PAGE or dst_start % PAGE or src_start + nbytes > src.nbytes or dst_start + nbytes > dst.nbytes:
        return False
    if src_start + nbytes > round_down(src.nbytes, PAGE) or dst_start + nbytes > round_down(dst.nbytes, PAGE):
        return False  # the last partial page is shared with nothing, but keep the rule simple: whole pages only
    lib = _mremap()
    a, b = src.ctypes.data + src_start, dst.ctypes.data + dst_start
    got = lib.mremap(a, nbytes, nbytes, _MREMAP_MAYMOVE | _MREMAP_FIXED, b)
    if got is None or got == ctypes.c_void_p(-1).value or got != b:
        return False  # nothing moved (ENOMEM: too many mappings, ...): both ranges as they were
    # the source range is unmapped now: map fresh zero pages there at once
    prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10  # MAP_FIXED
    got = lib.mmap(a, nbytes, prot, flags, -1, 0)
    if got != a:
        err = ctypes.get_errno()
        raise OSError(err, f"move_pages: could not map the moved-from range again: {os.strerror(err)}")
    return True


def _mapping_of(buf: np.ndarray) -> mmap.mmap:
    base = buf.base
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is None or buf.ctypes.data != np.frombuffer(base, dtype=np.uint8, count=0).ctypes.data:
        raise ValueError("the buffer is not the start of an alloc() mapping")
    return base


def round_up(n: int, align: int) -> int:
    """Smallest multiple of ``align`` that is >= ``n``."""
    return -(-n // align) * align


def round_down(n: int, align: int) -> int:
    """Largest multiple of ``align`` that is <= ``n``."""
    return n - n % align


def as_bytes_view(buf: Any, *, writable: bool) -> memoryview:
    """A flat, C-contiguous ``uint8`` memoryview of ``buf`` without copying.

    Accepts numpy arrays, torch CPU tensors, ``bytearray``, ``mmap``,
    ``memoryview`` and anything else exposing the buffer protocol.  Raises
    ``TypeError`` for non-contiguous data or GPU tensors, and for read-only
    data when ``writable`` is requested.
    """
    return view_and_address(buf, writable=writable)[0]


def view_and_address(buf: Any, *, writable: bool) -> tuple[memoryview, int]:
    """Like :func:`as_bytes_view`, also returning the address of the first byte.

    Flat ``uint8`` numpy arrays (what :func:`alloc` returns, and slices of it)
    take a fast path: this runs once per request on the submit hot path.
    """
    if type(buf) is np.ndarray and buf.dtype == np.uint8 and buf.ndim == 1 and buf.flags.c_contiguous:
        if writable and not buf.flags.writeable:
            raise TypeError("buffer is read-only; a read needs a writable buffer")
        return memoryview(buf), buf.__array_interface__["data"][0]
    if type(buf).__module__.startswith("torch"):
        buf = _torch_to_numpy(buf)
    try:
        view = memoryview(buf)
    except TypeError as exc:
        raise TypeError(f"expected a buffer (numpy array, torch CPU tensor, memoryview), got {type(buf).__name__}") from exc
    if not view.c_contiguous:
        raise TypeError("buffer must be C-contiguous")
    if writable and view.readonly:
        raise TypeError("buffer is read-only; a read needs a writable buffer")
    if view.nbytes == 0:
        return memoryview(bytearray()), 0
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view, np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]


def _torch_to_numpy(t: Any) -> np.ndarray:
    if t.device.type != "cpu":
        raise TypeError(f"tensor is on {t.device}; the engine reads and writes host memory (move it with .cpu())")
    if not t.is_contiguous():
        raise TypeError("tensor must be contiguous")
    # Reinterpret as bytes so any dtype (bf16, fp8) works without numpy support.
    flat = t.detach().reshape(-1)
    import torch  # noqa: PLC0415 - torch is optional; only reached with a tensor in hand

    return flat.view(torch.uint8).numpy() if flat.numel() else np.empty(0, dtype=np.uint8)


class BufferPool:
    """A fixed set of equally sized, page-aligned buffers reused across calls.

    ``with pool.get() as buf:`` blocks until a buffer is free and hands it back
    on exit.  Buffers are allocated lazily, up to ``count``.
    """

    def __init__(self, nbytes: int, count: int, *, huge: bool = False) -> None:
        if nbytes <= 0 or count <= 0:
            raise ValueError(f"BufferPool needs nbytes > 0 and count > 0, got {nbytes}, {count}")
        self.nbytes = nbytes
        self.count = count
        self.huge = huge
        self._free: list[np.ndarray] = []
        self._made = 0
        self._cond = threading.Condition()
        self._closed = False

    @contextmanager
    def get(self) -> Iterator[np.ndarray]:
        """Borrow a buffer for the duration of the ``with`` block."""
        buf = self.acquire()
        try:
            yield buf
        finally:
            self.release(buf)

    def acquire(self) -> np.ndarray:
        """Take a buffer (waits while all ``count`` are lent out)."""
        with self._cond:
            while True:
                if self._closed:
                    raise ValueError("BufferPool is closed")
                if self._free:
                    return self._free.pop()
                if self._made < self.count:
                    self._made += 1
                    break
                self._cond.wait()
        return alloc(self.nbytes, huge=self.huge)

    def release(self, buf: np.ndarray) -> None:
        """Give a buffer taken with :meth:`acquire` back."""
        with self._cond:
            if not self._closed:
                self._free.append(buf)
            self._cond.notify()

    def close(self) -> None:
        """Drop the pooled buffers; later ``acquire`` calls fail."""
        with self._cond:
            self._closed = True
            self._free.clear()
            self._cond.notify_all()

    def __enter__(self) -> BufferPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
