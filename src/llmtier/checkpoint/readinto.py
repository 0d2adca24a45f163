"""Read a shard's tensors at the disk's speed: into fresh memory (``load``) or into the caller's tensors
(``load(into=...)``).

One pipeline serves both.  The tensors are taken in file order and cut into
*segments* of up to :data:`SEGMENT` bytes (a big tensor spans several, small
ones share one); up to :data:`DEPTH` segments are in flight at once, so the
engine always has a deep queue of large direct reads.  The oldest segment is
waited for (without lending this thread to the engine, so queued reads stay
with the engine's worker and keep the disk busy), then checked and retired
while the younger ones are still on their way:

* **fresh memory** (``dst`` is ``None``): tensors are read in place into
  page-aligned arenas of up to :data:`ARENA` bytes that the kernel may back
  with 2 MiB pages (``MADV_HUGEPAGE``: a fault per 2 MiB instead of per 4 KiB,
  about 6x cheaper per byte on the development VM).  A second thread
  allocates and faults the arenas in ahead of the reads, so the page faults of
  new memory run beside the disk instead of in the read path.  The tensors
  are views of their arena (no copy).
* **the caller's tensors**: a tensor whose address and size are 4 KiB
  aligned is read straight into it.  torch's and numpy's allocators give
  64-byte alignment, which ``O_DIRECT`` refuses, so the others are read into
  ``DEPTH + 1`` reusable aligned windows and copied into place when their
  segment is retired (the copy runs while the next segments are read).  The
  engine's io_uring worker completes a group of queued reads together, so the
  next segment is submitted into the spare window as soon as the oldest has
  arrived, before that one is copied out: the engine gets new work the moment
  it may have run dry.  The windows are huge-page memory too:
  a direct read pins its buffer's pages, and pinning 4 KiB pages cost the
  development VM a third of the load's time (``into=`` of 3.53 GiB: 2.3-3.0 s
  into 4 KiB-page windows, 1.5-1.6 s into 2 MiB-page ones, in the same
  rounds as a load into fresh memory, 1.5-1.6 s).

The CRC-32C of every tensor is computed as its segments are retired, in
order, off the disk's critical path (the reads of the next segments are in
flight meanwhile).
"""
from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine import alloc, as_bytes_view
from ..errors import ChecksumError, FormatError
from ..store import dtypes
from ..store.format import ALIGN, TensorInfo, align_up, crc32c
from .staging import ParallelCopy

SEGMENT = 32 << 20  # bytes per engine submission
DEPTH = 8  # segments in flight: 256 MiB queued at the engine
ARENA = 64 << 20  # fresh memory is allocated in arenas of up to this size (a bigger tensor: its own)
PREFAULT = 2  # threads that fault fresh arenas in ahead of the reads
COPY_THREADS = 1  # threads that copy a segment out of its window (2 measured slower on 2 cores: they compete with the I/O)
HUGE = 2 << 20
_GAP = 1 << 20  # tensors further apart than this never share an arena


def alloc_huge(nbytes: int) -> np.ndarray:
    """``nbytes`` of page-aligned, zero-filled memory the kernel may back with 2 MiB pages (with
    transparent huge pages in ``madvise`` or ``always`` mode; otherwise ordinary pages), the mapping
    rounded up to whole 2 MiB so that its tail is a huge page too."""
    if nbytes <= 0:
        return np.empty(0, dtype=np.uint8)
    return alloc(-(-nbytes // HUGE) * HUGE, huge=True)[:nbytes]


def _address(dst: Any) -> int:
    return dst.ctypes.data if isinstance(dst, np.ndarray) else dst.data_ptr()


@dataclass
class _Piece:
    info: TensorInfo
    off: int  # byte offset inside the tensor
    n: int
    target: Any  # fresh: (arena index, offset in arena); direct: the tensor's byte view; bounce: the tensor's view
    mode: str  # "arena", "direct" or "bounce"
    pos: int = 0  # offset in the segment's window (bounce)


class _Arenas:
    """Fresh memory for the tensors, allocated and faulted in ahead of the reads by ``threads`` helper
    threads (``0``: none; the reads then fault the pages in themselves, inside the kernel)."""

    def __init__(self, sizes: list[int], threads: int) -> None:
        self.sizes = sizes
        self.bufs: list[np.ndarray | None] = [None] * len(sizes)
        self.ready = [threading.Event() for _ in sizes]
        self.error: BaseException | None = None
        self._stop = False
        self._next = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._fault, name=f"llmtier-ckpt-prefault-{i}", daemon=True)
                         for i in range(threads if sizes else 0)]
        for th in self._threads:
            th.start()

    def _fault(self) -> None:
        try:
            while not self._stop:
                with self._lock:
                    k, self._next = self._next, self._next + 1
                if k >= len(self.sizes):
                    return
                buf = alloc_huge(self.sizes[k])
                buf[::4096] = 0  # fault every page in now (numpy releases the GIL for this)
                self.bufs[k] = buf
                self.ready[k].set()
        except BaseException as exc:  # noqa: BLE001 - re-raised by get()
            self.error = exc
            for e in self.ready:
                e.set()

    def get(self, k: int) -> np.ndarray:
        if not self._threads:
            if self.bufs[k] is None:
                self.bufs[k] = alloc_huge(self.sizes[k])
        else:
            self.ready[k].wait()
        buf = self.bufs[k]
        if buf is None:  # the prefault thread failed (or was stopped)
            raise self.error or RuntimeError("the prefault of checkpoint memory stopped")
        return buf

    def close(self) -> None:
        self._stop = True
        for th in self._threads:
            th.join()


def read_tensors(st: Any, pairs: list[tuple[TensorInfo, Any]], *, verify: bool, segment: int = SEGMENT,
                 depth: int = DEPTH, prefault: int = PREFAULT, copy_threads: int = COPY_THREADS) -> dict[str, np.ndarray]:
    """Read every ``(info, dst)`` of store ``st``.  ``dst``: a CPU, contiguous array or tensor of exactly
    the tensor's size, filled in place; or ``None``: the tensor is read into fresh memory.  Returns the
    fresh tensors' raw bytes (``uint8`` views of page-aligned arenas), by name."""
    pairs = sorted(pairs, key=lambda p: (p[0].file, p[0].offset))
    # fresh tensors: arenas covering runs of neighbouring tensors, laid out as in the file
    arena_of: dict[str, tuple[int, int]] = {}
    sizes: list[int] = []
    start = end = -1
    file = None
    for info, dst in pairs:
        if dst is not None or not info.nbytes:
            continue
        lo = info.offset - info.offset % ALIGN
        hi = align_up(info.offset + info.nbytes)
        if not sizes or info.file != file or lo - end > _GAP or hi - start > ARENA or lo < end:
            sizes.append(0)
            start, file = lo, info.file
        end = hi
        sizes[-1] = end - start
        arena_of[info.name] = (len(sizes) - 1, info.offset - start)
    # pieces, then segments
    pieces: list[_Piece] = []
    for info, dst in pairs:
        if not info.nbytes:
            continue
        if dst is None:
            mode, target = "arena", arena_of[info.name]
        else:
            target = np.frombuffer(as_bytes_view(dst, writable=True), dtype=np.uint8)
            mode = "direct" if _address(dst) % ALIGN == 0 and info.nbytes % ALIGN == 0 else "bounce"
        for off in range(0, info.nbytes, segment):
            pieces.append(_Piece(info, off, min(segment, info.nbytes - off), target, mode))
    segments: list[list[_Piece]] = []
    used = segment
    for pc in pieces:
        size = align_up(pc.n)
        if used + size > segment or segments[-1][0].info.file != pc.info.file:
            segments.append([])
            used = 0
        pc.pos = used
        segments[-1].append(pc)
        used += size
    depth = max(1, min(depth, len(segments)))
    bounce = any(pc.mode == "bounce" for pc in pieces)
    nwin = depth + 1  # a spare: the next segment is submitted before the oldest is copied out
    windows = [alloc_huge(segment) for _ in range(nwin)] if bounce else []
    copier = ParallelCopy(copy_threads) if bounce else None
    arenas = _Arenas(sizes, prefault)
    crcs: dict[str, int] = {}

    def submit(k: int) -> Any:
        bufs = []
        for pc in segments[k]:
            if pc.mode == "arena":
                a, base = pc.target
                bufs.append(arenas.get(a)[base + pc.off : base + pc.off + align_up(pc.n)])
            elif pc.mode == "direct":
                bufs.append(pc.target[pc.off : pc.off + pc.n])
            else:
                bufs.append(windows[k % nwin][pc.pos : pc.pos + align_up(pc.n)])
        f = st.file(segments[k][0].info.file)
        return f.pread_many(bufs, [pc.info.offset + pc.off for pc in segments[k]],
                            tags=[pc.info.name for pc in segments[k]], exact=False)

    def retire(k: int, got: Any) -> None:
        for pc, g in zip(segments[k], got if isinstance(got, list) else [got]):
            if g < pc.n:
                raise FormatError(f"the file ends inside tensor {pc.info.name!r} (truncated after it was opened?)",
                                  path=pc.info.file, field="size")
            if pc.mode == "arena":
                a, base = pc.target
                data = arenas.get(a)[base + pc.off : base + pc.off + pc.n]
            elif pc.mode == "direct":
                data = pc.target[pc.off : pc.off + pc.n]
            else:
                data = windows[k % nwin][pc.pos : pc.pos + pc.n]
                copier.copy(pc.target[pc.off : pc.off + pc.n], data)
            if verify and pc.info.crc32c is not None:
                crc = crcs[pc.info.name] = crc32c(data, crcs.get(pc.info.name, 0))
                if pc.off + pc.n == pc.info.nbytes and crc != pc.info.crc32c:
                    raise ChecksumError(f"tensor {pc.info.name!r}: CRC-32C 0x{crc:08x}, index says "
                                        f"0x{pc.info.crc32c:08x} (the data on disk is damaged)", path=pc.info.file,
                                        field=pc.info.name)

    inflight: list[Any] = []
    try:
        for k in range(depth):
            inflight.append(submit(k))
        for k in range(len(segments)):
            fut = inflight.pop(0)
            # Not fut.result() alone: that lends this thread to the engine, which would run the queued
            # younger segments here, inline, and retire nothing until they are all done.
            concurrent.futures.wait([fut])
            got = fut.result()
            if k + depth < len(segments):  # refill into the spare window first: the engine may have run dry
                inflight.append(submit(k + depth))
            retire(k, got)
    except BaseException:
        for fut in inflight:  # never leave a read writing into memory we give up
            concurrent.futures.wait([fut])
        raise
    finally:
        arenas.close()
        if copier is not None:
            copier.close()
    out: dict[str, np.ndarray] = {}
    for info, dst in pairs:
        if dst is None:
            if info.name in arena_of:
                a, base = arena_of[info.name]
                out[info.name] = arenas.get(a)[base : base + info.nbytes]
            else:
                out[info.name] = np.empty(0, dtype=np.uint8)
    return out


def typed(raw: np.ndarray, info: TensorInfo, kind: str) -> Any:
    """A fresh tensor's raw bytes as a torch tensor (``kind == "torch"``) or numpy array of its dtype and shape."""
    if kind == "torch":
        import torch  # noqa: PLC0415

        if raw.nbytes == 0:
            return torch.empty(info.shape, dtype=dtypes.torch_dtype(info.dtype))
        return torch.from_numpy(raw).view(dtypes.torch_dtype(info.dtype)).reshape(info.shape)
    return raw.view(np.dtype(info.dtype.numpy)).reshape(info.shape)


def read_into(st: Any, pairs: list[tuple[TensorInfo, Any]], *, verify: bool) -> None:
    """Fill each ``dst`` (CPU, contiguous, exactly the tensor's size) with the stored tensor ``info``."""
    read_tensors(st, pairs, verify=verify)
