"""Completion bookkeeping: the engine's futures and per-submit batches."""
from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..errors import ShortReadError, io_failure
from .plan import READ, Op, Plan

if TYPE_CHECKING:
    from .base import Engine


class EngineFuture(Future):
    """A Future whose ``result()`` lends the waiting thread to the engine."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._engine._help(self)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            self._engine._help(self)
        return super().exception(timeout)


class Batch:
    """Completion bookkeeping for one ``submit`` call.

    ``entries`` holds, per user request in order, its :class:`Plan` or (fast
    path) its single bare :class:`Op`.  ``pending`` counts operations not yet
    completed plus one guard held by the submitter while it is still
    enqueueing, so a batch cannot finish before all of it has been submitted.
    """

    __slots__ = ("entries", "future", "pending", "lock", "single", "exact")

    def __init__(self, engine: Engine, single: bool, exact: bool) -> None:
        self.entries: list[Plan | Op] = []
        self.future: Future = EngineFuture(engine)
        self.future.set_running_or_notify_cancel()
        self.pending = 1
        self.lock = threading.Lock()
        self.single = single
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
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(results[0] if self.single else results)


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
