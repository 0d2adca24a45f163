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

import contextlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..engine import add_global_observer, remove_global_observer
from ..errors import FormatError
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
        _finish(path, rec, sampler, tracer, app, app_from, missing, notes,
                {"start_ns": t0, "device": device, "diskstats_fields": list(FIELDS), "pid": os.getpid(),
                 "source": label, "block_devices": [d for d, _, _ in tracer.disks] if tracer else []})


def _finish(path: str | os.PathLike[str], rec: Recorder, sampler: DiskStatsSampler | None, tracer: BlockTracer | None,
            app: bool, app_from: str | os.PathLike[str] | None, missing: list[str], notes: list[str],
            meta: dict[str, Any]) -> None:
    """Stop the sources and save; a source that fails is said in the trace, which is still written."""
    extra: dict[str, Any] = {}
    if tracer is not None:
        try:
            extra.update({f"blk_{k}": v for k, v in tracer.stop().items()})
            if tracer.reissued:
                notes.append(f"block layer: {tracer.reissued} requests were requeued by the driver and issued again "
                             "(counted once)")
        except (OSError, MemoryError, ValueError) as exc:
            missing.append(f"block layer: capture failed when stopping: {exc!r}")
        notes.extend(tracer.notes)
    meta["end_ns"] = time.monotonic_ns()  # after the block capture's last completions
    if sampler is not None:
        extra["diskstats"] = sampler.stop()
    if app_from is not None:
        rec, meta["children"] = _load_app(app_from, missing, notes)
    if not app and app_from is None:
        missing.append("application level: switched off")
    if "blk_submit_ns" in extra:
        extra["extents"] = _extents_of(rec, notes, meta["block_devices"])
    meta["missing"] = missing
    meta["notes"] = notes
    rec.save(path, meta=meta, extra=extra)


def app_trace_paths(app_from: str | os.PathLike[str]) -> list[str]:
    """The trace ``app_from`` and those of other processes of the same command (``ROOT.<pid>.npz``)."""
    root, ext = os.path.splitext(os.fspath(app_from))
    d = os.path.dirname(root) or "."
    base = os.path.basename(root)
    out = [os.fspath(app_from)] if os.path.exists(app_from) else []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(d)):
            mid = name[len(base) + 1 : len(name) - len(ext)] if ext else ""
            if name.startswith(base + ".") and name.endswith(ext) and mid.isdigit():
                out.append(os.path.join(d, name))
    return out


def _load_app(app_from: str | os.PathLike[str], missing: list[str],
              notes: list[str]) -> tuple[Recorder, list[dict[str, Any]]]:
    """A recorder holding the application records of the command's processes, merged."""
    rec = Recorder(capacity=1)
    paths = app_trace_paths(app_from)
    if not paths:
        missing.append("application level: the command wrote no application records (it did not use llmtier, "
                       "or it was killed before exit)")
        return rec, []
    files: dict[str, int] = {}
    tags: dict[str, int] = {"": 0}
    backends: dict[str, int] = {}
    parts: list[dict[str, np.ndarray]] = []
    extents: list[np.ndarray] = []
    children: list[dict[str, Any]] = []
    for p in paths:
        try:
            t = Trace(p)
        except (FormatError, OSError) as exc:
            notes.append(f"application level: records of one process could not be read ({exc})")
            continue
        fmap = np.array([files.setdefault(f, len(files)) for f in t.files] or [0], dtype=np.int64)
        tmap = np.array([tags.setdefault(x, len(tags)) for x in t.tags] or [0], dtype=np.int64)
        bmap = np.array([backends.setdefault(x, len(backends)) for x in t.backends] or [0], dtype=np.int64)
        cols = dict(t.app)
        cols["file"], cols["tag"], cols["backend"] = fmap[cols["file"]], tmap[cols["tag"]], bmap[cols["backend"]]
        parts.append(cols)
        ex = t.extra.get("seen_extents")
        if ex is not None and len(ex):
            ex = np.array(ex, dtype=np.int64).reshape(-1, 4)
            ex[:, 0] = fmap[ex[:, 0]]
            extents.append(ex)
        children.append({k: t.meta[k] for k in ("pid", "start_ns", "end_ns") if k in t.meta})
    if parts:
        merged = {k: np.concatenate([c[k] for c in parts]) for k in parts[0]}
        order = np.argsort(merged["submit_ns"], kind="stable")
        rec.load_columns({k: v[order] for k, v in merged.items()}, files=list(files), tags=list(tags),
                         backends=list(backends), seen_extents=np.concatenate(extents) if extents else None)
    if len(children) > 1:
        notes.append(f"application level: records of {len(children)} processes merged")
    return rec, children


def _extents_of(rec: Recorder, notes: list[str], disks: list[str]) -> np.ndarray:
    """Rows ``(file, file_offset, device_offset, length)``: each traced file's extents now,
    with every place it was seen to have while recording (deleted or recreated files)."""
    parts = []
    gone = []
    elsewhere = []
    for i, f in enumerate(rec.files):
        seen = rec.seen_extents.get(i)
        with contextlib.suppress(OSError, ValueError):
            dev, _ = device_of(f)
            if dev not in disks:
                # e.g. device-mapper, md, btrfs: FIEMAP offsets are not offsets on the traced disk
                elsewhere.append(f"{f} ({dev or 'no block device'})")
                continue
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
    if elsewhere:
        notes.append(f"block layer: {len(elsewhere)} traced files are on a device whose addresses are not those of "
                     f"the traced disk(s) {', '.join(disks)}, so their block requests are not attributed "
                     f"(e.g. {elsewhere[0]})")
    if gone:
        notes.append(f"block layer: {len(gone)} traced files were deleted before their place on disk was known; "
                     f"their block requests are not attributed (e.g. {gone[0]})")
    return np.concatenate(parts) if parts else np.empty((0, 4), dtype=np.int64)


def load(path: str | os.PathLike[str]) -> Trace:
    """Load a saved trace."""
    return Trace(path)


__all__ = ["BlockTraceUnavailable", "BlockTracer", "DiskStatsSampler", "Recorder", "Trace", "app_trace_paths",
           "device_of", "load", "record"]
