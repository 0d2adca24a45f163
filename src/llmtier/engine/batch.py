"""Completion bookkeeping: the engine's futures and per-submit batches."""
from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..errors import ShortReadError, io_failure
from .plan import READ, Op, PagesOp, Plan

if TYPE_CHECKING:
    from .base import Engine


class EngineFuture(Future):
    """A Future whose ``result()`` lends the waiting thread to the engine, for work submitted up to its own
    (never for younger work: a pipelined caller waiting for batch i must not end up running batch i+1 inline)."""

    def __init__(self, engine: Engine, seq: int = -1) -> None:
        super().__init__()
        self._engine = engine
        self._seq = seq

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._engine._help(self)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            self._engine._help(self)
        return super().exception(timeout)


#: what a batch's future gives: a count per request, the only request's
#: count, or the sum of the counts (``pread_pages``: one int for all pages)
LIST, SINGLE, SUM = "list", "single", "sum"


class Batch:
    """Completion bookkeeping for one ``submit`` call.

    ``entries`` holds, per user request in order, its :class:`Plan` or (fast
    path) its single bare :class:`Op`, or (pages fast path) one
    :class:`PagesOp` for all pages.  ``pending`` counts operations not yet
    completed plus one guard held by the submitter while it is still
    enqueueing, so a batch cannot finish before all of it has been submitted.
    ``mode`` (LIST, SINGLE or SUM) says what the future gives.
    """

    __slots__ = ("entries", "future", "pending", "lock", "mode", "exact", "seq")

    def __init__(self, engine: Engine, mode: str, exact: bool) -> None:
        self.entries: list[Plan | Op] = []
        self.seq = next(engine._seq)  # submission order: a waiting caller helps only with older work
        self.future: Future = EngineFuture(engine, self.seq)
        self.future.set_running_or_notify_cancel()
        self.pending = 1
        self.lock = threading.Lock()
        self.mode = mode
        self.exact = exact

    def done(self, n: int) -> None:
        """``n`` operations (or the guard) completed; finish when none remain."""
        with self.lock:
            self.pending -= n
            last = self.pending == 0
        if last:
            self.finish()

    def finish(self) -> None:
        """Resolve every request and complete the future (first error wins)."""
        results = []
        error: BaseException | None = None
        for e in self.entries:
            try:
                if type(e) is Op:
                    got = e.res if e.plan is None else e.plan.resolve()
                elif type(e) is PagesOp:
                    error = error or _pages_failure(e, self.exact)
                    results.append(e.res)
                    continue
                else:
                    got = e.resolve()  # type: ignore[union-attr]
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                error = error or exc
                continue
            size = e.view.nbytes
            if got < 0 and error is None:
                verb = "read" if e.kind == READ else "write"
                error = io_failure(f"{verb} failed", path=e.file.path, offset=e.offset, size=size, errno=-got)
            elif e.kind == READ and self.exact and got < size and error is None:
                error = ShortReadError(path=e.file.path, offset=e.offset, size=size, got=got)
            results.append(got)
        # Break the reference cycles (batch -> op -> batch, plan -> op -> plan) now, so that bounce
        # buffers and the caller's buffers are freed when the caller lets go, not at the next cyclic GC.
        for e in self.entries:
            if type(e) is Plan:
                e.ops = []
                e.segments = None
        self.entries = []
        if error is not None:
            self.future.set_exception(error)
        elif self.mode == SINGLE:
            self.future.set_result(results[0])
        elif self.mode == SUM:
            self.future.set_result(sum(results))
        else:
            self.future.set_result(results)


def _pages_failure(op: PagesOp, exact: bool) -> BaseException | None:
    """The error of a pages operation, as the per-page requests would report
    it: the lowest page that failed (typed by errno) or, reading exactly,
    ended short; each with that page's offset and size."""
    if op.res < 0:  # the whole call failed (the backend raised): report page 0
        page, got = 0, op.res
    elif op.bad >= 0:
        page, got = op.bad, op.bad_res
    else:
        return None
    offset = int(op.offsets[page])
    if got < 0:
        verb = "read" if op.kind == READ else "write"
        return io_failure(f"{verb} failed", path=op.file.path, offset=offset, size=op.page, errno=-got)
    if op.kind == READ and exact:
        return ShortReadError(path=op.file.path, offset=offset, size=op.page, got=got)
    return None


def tally(objs: Iterable[Any]) -> list[tuple[Any, int]]:
    """Distinct objects (by identity) with how often each occurs, in first-seen order."""
    seen: dict[int, list] = {}
    for obj in objs:
        entry = seen.get(id(obj))
        if entry is None:
            seen[id(obj)] = [obj, 1]
        else:
            entry[1] += 1
    return [(obj, n) for obj, n in seen.values()]


def count_per_file(ops: list[Op], sign: int) -> None:
    """Adjust each file's count of operations in flight (one lock per file)."""
    for file, n in tally(op.file for op in ops):
        file._track(sign * n)
