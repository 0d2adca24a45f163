"""Record the I/O that llmtier causes, at three layers, and analyse it.

>>> import llmtier.trace
>>> with llmtier.trace.record("run.trace.npz", device_path="/data"):   # doctest: +SKIP
...     ...   # anything that uses llmtier engines
>>> t = llmtier.trace.load("run.trace.npz")                            # doctest: +SKIP

Sources:

* **application** — every kernel-level operation of every engine in the
  process: submit and completion time, op, file, offset, size, tag, queue
  depth, backend (:mod:`.recorder`);
* **block layer** — every request the disk behind ``device_path`` was
  issued, with its completion (ftrace, root only; :mod:`.block`); block
  requests are tied to traced files through the files' extents (FIEMAP);
* **device counters** — ``/proc/diskstats`` at 10 Hz (:mod:`.diskstats`).

A source that cannot run here is listed, with the reason, in the trace's
``meta["missing"]``; the others still record.  :mod:`.analysis` turns a
trace into figures, :mod:`.report` into an HTML page and a Markdown summary.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..engine import add_global_observer, remove_global_observer
from .block import BlockTracer, BlockTraceUnavailable, file_extents
from .diskstats import FIELDS, DiskStatsSampler, device_of
from .recorder import Recorder, Trace


@contextmanager
def record(path: str | os.PathLike[str], *, device_path: str | os.PathLike[str] | None = None,
           block: bool = True, diskstats: bool = True, app: bool = True, interval: float = 0.1,
           app_from: str | os.PathLike[str] | None = None, label: str = "",
           extents: bool | None = None) -> Iterator[Recorder]:
    """Record while the block runs; save to ``path`` (.npz) at the end.

    ``device_path``: a file or directory on the device whose block requests
    and counters are recorded (default: the directory of ``path``).
    ``block``: capture block requests (needs root; if not possible the
    reason goes to ``meta["missing"]`` and recording goes on).  ``app``:
    record this process's engine operations.  ``app_from``: take the
    application records from that trace file instead, written by another
    process (how ``llmtier trace`` combines a child's records with the
    block capture it runs itself).  ``label``: what was traced (the report's title).
    ``extents``: note where each file lies on disk when first seen, to tie
    block requests to files deleted before the end (default: ``block``).
    """
    rec = Recorder(extents=block if extents is None else extents)
    missing: list[str] = []
    notes: list[str] = []
    sampler = None
    tracer = None
    device = ""
    if diskstats or block:
        target = device_path or os.path.dirname(os.path.abspath(os.fspath(path)))
        try:
            device, why = device_of(target)
        except (OSError, ValueError) as exc:
            why = str(exc)
        if not device:
            if diskstats:
                missing.append(f"device counters: {why}")
            if block:
                missing.append(f"block layer: {why}")
    if diskstats and device:
        try:
            sampler = DiskStatsSampler(device, interval).start()
        except (OSError, ValueError) as exc:
            missing.append(f"device counters: {exc}")
    if block and device:
        try:
            tracer = BlockTracer(device).start()
        except (BlockTraceUnavailable, OSError) as exc:
            missing.append(f"block layer: {exc}")
    t0 = time.monotonic_ns()
    if app and app_from is None:
        add_global_observer(rec)
    try:
        yield rec
    finally:
        if app and app_from is None:
            remove_global_observer(rec)
        t1 = time.monotonic_ns()
        extra: dict[str, Any] = {}
        if sampler is not None:
            extra["diskstats"] = sampler.stop()
        if tracer is not None:
            extra.update({f"blk_{k}": v for k, v in tracer.stop().items()})
            notes.extend(tracer.notes)
            if tracer.reissued:
                notes.append(f"block layer: {tracer.reissued} requests were requeued by the driver and issued again "
                             "(counted once)")
        meta: dict[str, Any] = {"start_ns": t0, "end_ns": t1, "device": device, "diskstats_fields": list(FIELDS),
                                "pid": os.getpid(), "source": label, "block_devices": [d for d, _, _ in tracer.disks] if tracer else []}
        if app_from is not None:
            rec, child_meta = _load_app(app_from, missing)
            meta["child"] = child_meta
        if not app and app_from is None:
            missing.append("application level: switched off")
        if tracer is not None:
            extra["extents"] = _extents_of(rec, notes)
        meta["missing"] = missing
        meta["notes"] = notes
        rec.save(path, meta=meta, extra=extra)


def _load_app(app_from: str | os.PathLike[str], missing: list[str]) -> tuple[Recorder, dict[str, Any]]:
    """A recorder holding the application records of another process's trace."""
    rec = Recorder(capacity=1)
    if not os.path.exists(app_from):
        missing.append("application level: the command wrote no application records (it did not use llmtier, "
                       "or it was killed before exit)")
        return rec, {}
    t = Trace(app_from)
    rec.load_columns(t.app, files=t.files, tags=t.tags, backends=t.backends,
                     seen_extents=t.extra.get("seen_extents"))
    return rec, {k: t.meta[k] for k in ("pid", "start_ns", "end_ns") if k in t.meta}


def _extents_of(rec: Recorder, notes: list[str]) -> np.ndarray:
    """Rows ``(file, file_offset, device_offset, length)``: each traced file's extents now,
    with every place it was seen to have while recording (deleted or recreated files)."""
    parts = []
    gone = []
    for i, f in enumerate(rec.files):
        seen = rec.seen_extents.get(i)
        try:
            ex = file_extents(f)
            if seen is not None:  # the file may have been recreated: keep every place it had
                ex = np.unique(np.concatenate([seen, ex]), axis=0)
        except OSError:
            if seen is None:
                gone.append(f)
                continue
            ex = seen
        if len(ex):
            parts.append(np.column_stack([np.full(len(ex), i, dtype=np.int64), ex]))
    if gone:
        notes.append(f"block layer: {len(gone)} traced files were deleted before their place on disk was known; "
                     f"their block requests are not attributed (e.g. {gone[0]})")
    return np.concatenate(parts) if parts else np.empty((0, 4), dtype=np.int64)


def load(path: str | os.PathLike[str]) -> Trace:
    """Load a saved trace."""
    return Trace(path)


__all__ = ["BlockTraceUnavailable", "BlockTracer", "DiskStatsSampler", "Recorder", "Trace", "device_of", "load",
           "record"]
