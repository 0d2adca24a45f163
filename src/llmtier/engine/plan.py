"""Turn a user request into the kernel-level operations that carry it out.

A user request is (file, read|write, buffer, offset).  ``O_DIRECT`` wants the
offset, the size and the buffer address aligned (4 KiB here); user requests
often are not (safetensors offsets, a 4095-byte tensor).  The rules:

Reads
  * all aligned: one direct operation straight into the user's buffer;
  * offset and address aligned, size not: the aligned body goes straight into
    the user's buffer, the last partial block is read into a small bounce
    buffer and copied out;
  * otherwise: the aligned cover ``[floor(offset), ceil(offset+size))`` is
    read into a bounce buffer and the requested slice is copied out.

Writes
  * offset unaligned: the whole write goes through the buffered descriptor
    (the kernel keeps buffered and direct I/O on one file coherent);
  * otherwise the aligned body is written directly (from a bounce copy if the
    buffer address is unaligned) and the partial last block, if any, through
    the buffered descriptor.  So a write of 4095 bytes to a fresh file leaves
    a file of exactly 4095 bytes: nothing is padded.

Each operation gets a result (bytes moved or ``-errno``); :meth:`Plan.resolve`
turns those into the user's byte count, stopping at the first short piece
(end of file) and copying bounce data out.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .buffers import address, alloc, round_down, round_up

READ = 0
WRITE = 1


class Op:
    """One kernel-level transfer: ``fd``, direction, buffer view, offset."""

    __slots__ = ("kind", "fd", "view", "offset", "file", "tag", "res", "plan", "batch", "t_submit", "t_complete", "qd")

    def __init__(self, kind: int, fd: int, view: memoryview, offset: int, file: Any, tag: Any, plan: Plan) -> None:
        self.kind = kind
        self.fd = fd
        self.view = view
        self.offset = offset
        self.file = file
        self.tag = tag
        self.plan = plan
        self.batch: Any = None  # set by the engine at submit
        self.res = 0
        self.t_submit = 0
        self.t_complete = 0
        self.qd = 0


class _Segment:
    """A run of ops covering one contiguous stretch of the user's buffer."""

    __slots__ = ("ops", "user_len", "bounce", "skip")

    def __init__(self, user_len: int, bounce: np.ndarray | None = None, skip: int = 0) -> None:
        self.ops: list[Op] = []
        self.user_len = user_len
        self.bounce = bounce  # data lands here first, then ``skip`` bytes in is copied out
        self.skip = skip


class Plan:
    """How one user request is carried out, and how its result is computed."""

    __slots__ = ("kind", "file", "view", "offset", "tag", "segments", "exact")

    def __init__(self, kind: int, file: Any, view: memoryview, offset: int, tag: Any, exact: bool) -> None:
        self.kind = kind
        self.file = file
        self.view = view
        self.offset = offset
        self.tag = tag
        self.exact = exact
        self.segments: list[_Segment] = []

    @property
    def ops(self) -> list[Op]:
        return [op for seg in self.segments for op in seg.ops]

    def _add(self, seg: _Segment, fd: int, view: memoryview, offset: int, chunk: int | None) -> None:
        """Append ops for ``view`` at ``offset``, split in ``chunk`` pieces if given."""
        n = view.nbytes
        step = chunk or n
        for start in range(0, n, step):
            seg.ops.append(Op(self.kind, fd, view[start : start + step], offset + start, self.file, self.tag, self))
        self.segments.append(seg)

    def resolve(self) -> int:
        """Bytes the user got (reads: copied into their buffer). ``-errno`` on failure."""
        count = 0
        for seg in self.segments:
            got = 0
            for op in seg.ops:
                if op.res < 0:
                    return op.res
                got += op.res
                if op.res < op.view.nbytes:
                    break
            if seg.bounce is not None:
                avail = max(0, min(seg.user_len, got - seg.skip))
                if avail:
                    self.view[count : count + avail] = seg.bounce[seg.skip : seg.skip + avail].data
                got = avail
            count += got
            if got < seg.user_len:
                break
        return count


def plan_request(
    kind: int, file: Any, view: memoryview, offset: int, tag: Any, *, direct_fd: int | None,
    buffered_fd: int, align: int, chunk: int | None, exact: bool = True,
) -> Plan:
    """Plan one request.  ``direct_fd`` is None when the file is not opened ``O_DIRECT``.

    ``chunk`` splits large direct transfers into pieces (None: leave whole,
    for backends that split themselves).
    """
    plan = Plan(kind, file, view, offset, tag, exact)
    n = view.nbytes
    if n == 0:
        return plan
    if direct_fd is None:
        plan._add(_Segment(n), buffered_fd, view, offset, chunk)
        return plan
    addr_ok = address(view) % align == 0
    if kind == READ:
        _plan_read(plan, view, offset, direct_fd, align, chunk, addr_ok)
    else:
        _plan_write(plan, view, offset, direct_fd, buffered_fd, align, chunk, addr_ok)
    return plan


def _plan_read(plan: Plan, view: memoryview, offset: int, fd: int, align: int, chunk: int | None, addr_ok: bool) -> None:
    n = view.nbytes
    if addr_ok and offset % align == 0:
        body = round_down(n, align)
        if body:
            plan._add(_Segment(body), fd, view[:body], offset, chunk)
        if body < n:
            bounce = alloc(align)
            plan._add(_Segment(n - body, bounce, 0), fd, memoryview(bounce), offset + body, None)
        return
    start = round_down(offset, align)
    end = round_up(offset + n, align)
    bounce = alloc(end - start)
    plan._add(_Segment(n, bounce, offset - start), fd, memoryview(bounce), start, chunk)


def _plan_write(
    plan: Plan, view: memoryview, offset: int, direct_fd: int, buffered_fd: int, align: int, chunk: int | None, addr_ok: bool
) -> None:
    n = view.nbytes
    if offset % align:
        plan._add(_Segment(n), buffered_fd, view, offset, chunk)
        return
    body = round_down(n, align)
    if body:
        src = view[:body]
        if not addr_ok:
            bounce = alloc(body)
            bounce[:] = np.frombuffer(src, dtype=np.uint8)
            src = memoryview(bounce)
        plan._add(_Segment(body), direct_fd, src, offset, chunk)
    if body < n:
        plan._add(_Segment(n - body), buffered_fd, view[body:], offset + body, None)
