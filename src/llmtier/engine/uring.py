"""The io_uring backend: the C extension ``_uring`` moves the bytes.

One worker thread owns one ring.  It takes every queued operation at once and
hands the whole group to ``Ring.run``, which splits them into ``chunk_size``
pieces, keeps ``queue_depth`` of them in flight, submits many per system call
and waits with the GIL released.  Operations submitted while a group runs are
picked up as the next group, so individually submitted requests still get
batched.  A :class:`PagesOp` (``File.pread_pages``) goes to ``Ring.gather``
instead: all its pages in one call, no Python object per page.
"""
from __future__ import annotations

import errno
import os
from typing import Any

from .base import Engine, IOEvent
from .plan import Op, PagesOp


def load_extension() -> tuple[Any, str]:
    """Import the extension and check the kernel lets us use io_uring.

    Returns ``(module, "")`` or ``(None, reason)``.  Setting the environment
    variable ``LLMTIER_NO_URING=1`` turns the backend off (to compare, or to
    work around a kernel problem).
    """
    if os.environ.get("LLMTIER_NO_URING", "") not in ("", "0"):
        return None, "io_uring turned off by LLMTIER_NO_URING"
    try:
        from . import _uring  # noqa: PLC0415 - optional compiled extension
    except ImportError as exc:
        return None, f"the io_uring extension is not built ({exc}); reinstall with a C compiler and kernel headers"
    try:
        _uring.probe()
    except OSError as exc:
        return None, f"the kernel refused io_uring ({exc}); it may be disabled (sysctl kernel.io_uring_disabled) or filtered by seccomp"
    return _uring, ""


class UringEngine(Engine):
    """``O_DIRECT`` requests through io_uring, many per system call."""

    name = "uring"
    _split = False  # the ring splits into pieces itself
    _take_all = True
    _gather = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        mod, reason = load_extension()
        if mod is None:
            from ..errors import EngineUnavailableError  # noqa: PLC0415

            raise EngineUnavailableError("uring", reason)
        settings = args[0] if args else kwargs["settings"]
        # Room for a full queue plus resubmissions of short transfers.
        self._ring = mod.Ring(max(64, 2 * settings.queue_depth))
        super().__init__(*args, **kwargs)

    def _execute(self, ops: list[Op], record: bool) -> list[IOEvent] | None:
        # Fast-path ops (plan None) have not had their buffer address checked:
        # the ring does that (align).  Planned ops were checked in Python and
        # may target the buffered descriptor, where any address is fine.
        fast = [op for op in ops if op.plan is None]
        if fast and any(type(op) is PagesOp for op in fast):
            return self._execute_with_pages(ops, record)
        if len(fast) == len(ops) or not fast:
            return self._ring_run(ops, record, self.settings.alignment if fast else 0)
        planned = [op for op in ops if op.plan is not None]
        events = self._ring_run(fast, record, self.settings.alignment)
        more = self._ring_run(planned, record, 0)
        return events + more if record else None  # type: ignore[operator]

    def _execute_with_pages(self, ops: list[Op], record: bool) -> list[IOEvent] | None:
        """A group holding PagesOps: one ``Ring.gather`` each, the rest as usual.

        The ring is one queue, so these calls run one after the other.
        """
        rest = [op for op in ops if type(op) is not PagesOp]
        events = self._execute(rest, record) if rest else ([] if record else None)
        for op in ops:
            if type(op) is PagesOp:
                more = self._ring_gather(op, record)
                if record:
                    events.extend(more)  # type: ignore[union-attr, arg-type]
        return events

    def _ring_gather(self, op: PagesOp, record: bool) -> list[IOEvent] | None:
        s = self.settings
        try:
            op.res, op.bad, op.bad_res, events = self._ring.gather(
                op.kind, op.fd, op.view, op.offsets, op.page, s.chunk_size,
                min(s.queue_depth, self._ring.entries), record, s.alignment)
        except Exception as exc:  # noqa: BLE001 - e.g. io_uring_enter failed: only this op fails
            op.res = -(getattr(exc, "errno", None) or errno.EIO)
            return [] if record else None
        if not record:
            return None
        # One event per SQE, with the page's file offset and the piece's size.
        return [self._event(op, off, n, t_sub, t_done, res, qd) for _, off, n, t_sub, t_done, res, qd in events]

    def _ring_run(self, ops: list[Op], record: bool, align: int) -> list[IOEvent] | None:
        s = self.settings
        reqs = [(op.kind, op.fd, op.view, op.offset) for op in ops]
        results, events = self._ring.run(reqs, s.chunk_size, min(s.queue_depth, self._ring.entries), record, align)
        for op, res in zip(ops, results):
            op.res = res
        if not record:
            return None
        # One event per SQE: the pieces the kernel actually saw.
        return [self._event(ops[idx], off, n, t_sub, t_done, res, qd)
                for idx, off, n, t_sub, t_done, res, qd in events]

    def _close_backend(self) -> None:
        self._ring.close()

