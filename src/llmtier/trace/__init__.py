"""Record the I/O that llmtier causes: every engine request, plus device counters.

>>> import llmtier.trace
>>> with llmtier.trace.record("run.trace.npz", device_path="/data"):   # doctest: +SKIP
...     ...   # anything that uses llmtier engines
>>> t = llmtier.trace.load("run.trace.npz")                            # doctest: +SKIP

Sources today: the application-level recorder (every kernel-level operation
of every engine in the process: submit and completion time, op, file,
offset, size, tag, queue depth, backend) and ``/proc/diskstats`` sampled at
10 Hz for the device behind ``device_path``.  Block-layer capture (ftrace)
and the report are not built yet.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..engine import add_global_observer, remove_global_observer
from .diskstats import FIELDS, DiskStatsSampler, device_of
from .recorder import Recorder, Trace


@contextmanager
def record(path: str | os.PathLike[str], *, device_path: str | os.PathLike[str] | None = None,
           diskstats: bool = True, interval: float = 0.1) -> Iterator[Recorder]:
    """Record every engine operation in the process while the block runs; save to ``path`` (.npz).

    ``device_path``: a file or directory whose block device's counters are
    sampled (default: the directory of ``path``).  What could not be recorded
    is listed in the trace's ``meta["missing"]`` and printed by the report.
    """
    rec = Recorder()
    missing: list[str] = []
    sampler = None
    device = ""
    if diskstats:
        target = device_path or os.path.dirname(os.path.abspath(os.fspath(path)))
        try:
            device, why = device_of(target)
            if device:
                sampler = DiskStatsSampler(device, interval).start()
            else:
                missing.append(f"device counters: {why}")
        except (OSError, ValueError) as exc:
            missing.append(f"device counters: {exc}")
    missing.append("block layer: ftrace capture is not implemented in this version")
    t0 = time.monotonic_ns()
    add_global_observer(rec)
    try:
        yield rec
    finally:
        remove_global_observer(rec)
        t1 = time.monotonic_ns()
        extra: dict[str, Any] = {}
        if sampler is not None:
            extra["diskstats"] = sampler.stop()
        rec.save(path, meta={"start_ns": t0, "end_ns": t1, "device": device, "diskstats_fields": list(FIELDS),
                             "missing": missing, "pid": os.getpid()}, extra=extra)


def load(path: str | os.PathLike[str]) -> Trace:
    """Load a saved trace."""
    return Trace(path)


__all__ = ["DiskStatsSampler", "Recorder", "Trace", "device_of", "load", "record"]
