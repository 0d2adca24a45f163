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

from .buffers import alloc, round_down, round_up

READ = 0
WRITE = 1


class Op:
    """One kernel-level transfer: ``fd``, direction, buffer, offset.

    ``view`` is a memoryview, or (the submit fast path for aligned direct
    requests) the caller's numpy array itself; then ``plan`` is None until a
    misaligned buffer address sends it through :func:`plan_request`.
    """

    __slots__ = ("kind", "fd", "view", "offset", "file", "tag", "res", "plan", "batch", "t_submit", "t_complete", "qd")

    def __init__(self, kind: int, fd: int, view: Any, offset: int, file: Any, tag: Any, plan: Plan | None) -> None:
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


class PagesOp(Op):
    """The pages fast path (``File.pread_pages``): ``len(offsets)`` pages of
    ``page`` bytes between one contiguous buffer (``view``) and the file.

    Page ``k`` is ``view[k*page:(k+1)*page]`` and file bytes
    ``[offsets[k], offsets[k] + page)``.  The backend moves all of it in one
    call (``Ring.gather``) and sets ``res`` to the total bytes moved, ``bad``
    to the lowest page that did not move in full (-1: none) and ``bad_res``
    to that page's ``-errno`` or byte count.  ``plan`` stays None: nothing is
    ever re-planned (the submitter checked every alignment up front).
    """

    __slots__ = ("bad", "bad_res", "offsets", "page")

    def __init__(self, kind: int, fd: int, view: Any, offsets: np.ndarray, page: int, file: Any, tag: Any) -> None:
        super().__init__(kind, fd, view, int(offsets[0]), file, tag, None)
        self.offsets = offsets
        self.page = page
        self.bad = -1
        self.bad_res = 0


class Plan:
    """How one user request is carried out, and how its result is computed.

    ``ops`` are the kernel-level operations in buffer order.  ``segments`` is
    None when they form one plain run over the user's buffer (the common,
    aligned case: no extra objects); otherwise a list of
    ``(n_ops, user_len, bounce, skip)``: the next ``n_ops`` ops cover
    ``user_len`` bytes of the user's buffer, landing first in ``bounce`` (if
    not None) from which the bytes ``skip`` in are copied out.
    """

    __slots__ = ("kind", "file", "view", "offset", "tag", "ops", "segments")

    def __init__(self, kind: int, file: Any, view: memoryview, offset: int, tag: Any) -> None:
        self.kind = kind
        self.file = file
        self.view = view
        self.offset = offset
        self.tag = tag
        self.ops: list[Op] = []
        self.segments: list[tuple[int, int, np.ndarray | None, int]] | None = None

    def _add(self, fd: int, view: memoryview, offset: int, chunk: int | None,
             user_len: int | None = None, bounce: np.ndarray | None = None, skip: int = 0) -> None:
        """Append ops for ``view`` at ``offset``, split in ``chunk`` pieces if given.

        ``user_len`` given: record a segment (needed once a request has more
        than one run, or a bounce buffer).
        """
        n = view.nbytes
        step = chunk or n
        before = len(self.ops)
        if step >= n:
            self.ops.append(Op(self.kind, fd, view, offset, self.file, self.tag, self))
        else:
            for start in range(0, n, step):
                self.ops.append(Op(self.kind, fd, view[start : start + step], offset + start, self.file, self.tag, self))
        if user_len is not None:
            if self.segments is None:
                self.segments = []
            self.segments.append((len(self.ops) - before, user_len, bounce, skip))

    def resolve(self) -> int:
        """Bytes the user got (reads: copied into their buffer), or ``-errno``."""
        if self.segments is None:
            return _prefix(self.ops, 0, len(self.ops))
        count = first = 0
        for n_ops, user_len, bounce, skip in self.segments:
            got = _prefix(self.ops, first, first + n_ops)
            first += n_ops
            if got < 0:
                return got
            if bounce is not None:
                got = max(0, min(user_len, got - skip))
                if got:
                    self.view[count : count + got] = bounce[skip : skip + got].data
            count += got
            if got < user_len:
                break
        return count


def _prefix(ops: list[Op], first: int, end: int) -> int:
    """Bytes of the contiguous prefix moved by ``ops[first:end]``; ``-errno`` on failure."""
    got = 0
    for k in range(first, end):
        op = ops[k]
        if op.res < 0:
            return op.res
        got += op.res
        if op.res < op.view.nbytes:
            break
    return got


def plan_request(
    kind: int, file: Any, view: memoryview, addr: int, offset: int, tag: Any, *, direct_fd: int | None,
    buffered_fd: int, align: int, chunk: int | None,
) -> Plan:
    """Plan one request.  ``addr`` is the buffer's address; ``direct_fd`` is
    None when the file is not opened ``O_DIRECT``.

    ``chunk`` splits large direct transfers into pieces (None: leave whole,
    for backends that split themselves).
    """
    plan = Plan(kind, file, view, offset, tag)
    n = view.nbytes
    if n == 0:
        return plan
    if direct_fd is None:
        plan._add(buffered_fd, view, offset, chunk)
    elif addr % align == 0 and offset % align == 0 and n % align == 0:
        plan._add(direct_fd, view, offset, chunk)  # the common case: straight in or out
    elif kind == READ:
        _plan_read(plan, view, addr, offset, direct_fd, align, chunk)
    else:
        _plan_write(plan, view, addr, offset, direct_fd, buffered_fd, align, chunk)
    return plan


def _plan_read(plan: Plan, view: memoryview, addr: int, offset: int, fd: int, align: int, chunk: int | None) -> None:
    n = view.nbytes
    if addr % align == 0 and offset % align == 0:
        body = round_down(n, align)
        if body:
            plan._add(fd, view[:body], offset, chunk, user_len=body)
        bounce = alloc(align)
        plan._add(fd, memoryview(bounce), offset + body, None, user_len=n - body, bounce=bounce)
        return
    start = round_down(offset, align)
    end = round_up(offset + n, align)
    bounce = alloc(end - start)
    plan._add(fd, memoryview(bounce), start, chunk, user_len=n, bounce=bounce, skip=offset - start)


def _plan_write(plan: Plan, view: memoryview, addr: int, offset: int, direct_fd: int, buffered_fd: int,
                align: int, chunk: int | None) -> None:
    n = view.nbytes
    if offset % align:
        plan._add(buffered_fd, view, offset, chunk)
        return
    body = round_down(n, align)
    if body:
        src = view[:body]
        if addr % align:
            bounce = alloc(body)
            bounce[:] = np.frombuffer(src, dtype=np.uint8)
            src = memoryview(bounce)
        plan._add(direct_fd, src, offset, chunk, user_len=body)
    if body < n:
        plan._add(buffered_fd, view[body:], offset + body, None, user_len=n - body)
