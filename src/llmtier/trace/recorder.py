"""The application-level recorder: every engine request, both ends, in columns.

The engine reports each kernel-level operation (an :class:`IOEvent`) to its
observers; the recorder is one.  Events go into preallocated numpy columns
(grown by doubling, so recording costs a few array stores per event, no
Python object kept per request).  Paths and tags are interned into tables and
stored as small integers.

Columns (one row per operation the kernel saw)::

    submit_ns, complete_ns  int64   CLOCK_MONOTONIC (time.monotonic_ns)
    op                      uint8   0 read, 1 write
    file                    uint32  index into ``files``
    offset, size            int64   bytes
    result                  int64   bytes moved, or -errno
    tag                     uint32  index into ``tags`` (0 is "no tag")
    queue_depth             uint32  operations in flight at submit, this one included
    backend                 uint8   index into ``backends``

Saved as one ``.npz`` (numpy's zip of arrays) with the tables and metadata as
JSON in the array ``meta``: readable without llmtier (``numpy.load``).
"""
from __future__ import annotations

import json
import os
import threading
import zipfile
from typing import Any

import numpy as np

from ..errors import FormatError
from .block import BLOCK_COLUMNS, file_extents

COLUMNS: dict[str, Any] = {
    "submit_ns": np.int64, "complete_ns": np.int64, "op": np.uint8, "file": np.uint32, "offset": np.int64,
    "size": np.int64, "result": np.int64, "tag": np.uint32, "queue_depth": np.uint32, "backend": np.uint8,
}
TRACE_FORMAT = "llmtier-trace"
TRACE_VERSION = 1


def tag_name(tag: Any) -> str:
    """How a request's tag is recorded: its string form (None → "")."""
    return "" if tag is None else str(tag)


class Recorder:
    """Collects engine events into growable columns. Thread-safe."""

    def __init__(self, capacity: int = 1 << 16, extents: bool = False) -> None:
        self._lock = threading.Lock()
        # Where each file lies on disk, noted when the file is first seen and again
        # while it is being written (it may be gone, or recreated, by the end).
        self._want_extents = extents
        self.seen_extents: dict[int, np.ndarray] = {}
        self._covered: dict[int, int] = {}
        self._taken_ns: dict[int, int] = {}
        self._n = 0
        self._cols = {k: np.empty(capacity, dtype=t) for k, t in COLUMNS.items()}
        self.files: list[str] = []
        self.tags: list[str] = [""]
        self.backends: list[str] = []
        self._file_ids: dict[str, int] = {}
        self._tag_ids: dict[str, int] = {"": 0}
        self._backend_ids: dict[str, int] = {}

    def __len__(self) -> int:
        return self._n

    def __call__(self, events: list[Any]) -> None:
        """The engine observer: append ``events``."""
        if not events:
            return
        with self._lock:
            need = self._n + len(events)
            if need > len(self._cols["size"]):
                self._grow(need)
            i = self._n
            c = self._cols
            fid, tid, bid = self._file_ids, self._tag_ids, self._backend_ids
            for e in events:
                f = fid.get(e.path)
                if f is None:
                    f = fid[e.path] = len(self.files)
                    self.files.append(e.path)
                    if self._want_extents:
                        self._take_extents(f, e.path, e.complete_ns)
                elif self._want_extents and e.op == "write" and self._extents_stale(f, e.offset + e.size, e.complete_ns):
                    self._take_extents(f, e.path, e.complete_ns)
                name = tag_name(e.tag)
                t = tid.get(name)
                if t is None:
                    t = tid[name] = len(self.tags)
                    self.tags.append(name)
                b = bid.get(e.backend)
                if b is None:
                    b = bid[e.backend] = len(self.backends)
                    self.backends.append(e.backend)
                c["submit_ns"][i] = e.submit_ns
                c["complete_ns"][i] = e.complete_ns
                c["op"][i] = 0 if e.op == "read" else 1
                c["file"][i] = f
                c["offset"][i] = e.offset
                c["size"][i] = e.size
                c["result"][i] = e.result
                c["tag"][i] = t
                c["queue_depth"][i] = e.queue_depth
                c["backend"][i] = b
                i += 1
            self._n = i

    def _extents_stale(self, f: int, end: int, now_ns: int) -> bool:
        """A written file's extents are looked at again when a write goes past what was
        seen, or every second, and never more often than every 100 ms."""
        age = now_ns - self._taken_ns[f]
        return age > 100_000_000 and (end > self._covered.get(f, 0) or age > 1_000_000_000)

    def _take_extents(self, f: int, path: str, now_ns: int) -> None:
        """Add the file's extents now to what was seen (at most every 100 ms per file while written)."""
        self._taken_ns[f] = now_ns
        try:
            ex = file_extents(path, sync=False)  # no sync: must not change the workload's I/O
        except OSError:
            return
        if len(ex):
            self._covered[f] = int((ex[:, 0] + ex[:, 2]).max())
            old = self.seen_extents.get(f)
            self.seen_extents[f] = ex if old is None else np.unique(np.concatenate([old, ex]), axis=0)

    def extents_table(self) -> np.ndarray:
        """Rows ``(file, file_offset, device_offset, length)``: every place each file was seen to have."""
        parts = [np.column_stack([np.full(len(ex), f, dtype=np.int64), ex]) for f, ex in self.seen_extents.items()]
        return np.concatenate(parts) if parts else np.empty((0, 4), dtype=np.int64)

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * len(self._cols["size"]))
        for k, a in self._cols.items():
            b = np.empty(cap, dtype=a.dtype)
            b[: self._n] = a[: self._n]
            self._cols[k] = b

    def load_columns(self, cols: dict[str, np.ndarray], *, files: list[str], tags: list[str],
                     backends: list[str], seen_extents: np.ndarray | None = None) -> None:
        """Replace the contents with saved columns and tables (another process's records)."""
        with self._lock:
            n = len(cols["size"])
            self._cols = {k: np.asarray(cols[k], dtype=t).copy() if k in cols else np.zeros(n, dtype=t)
                          for k, t in COLUMNS.items()}
            self._n = n
            self.files, self.tags, self.backends = list(files), list(tags), list(backends)
            self._file_ids = {f: i for i, f in enumerate(self.files)}
            self._tag_ids = {t: i for i, t in enumerate(self.tags)}
            self._backend_ids = {b: i for i, b in enumerate(self.backends)}
            ex = np.empty((0, 4), dtype=np.int64) if seen_extents is None else np.asarray(seen_extents).reshape(-1, 4)
            self.seen_extents = {int(f): ex[ex[:, 0] == f, 1:] for f in np.unique(ex[:, 0])}

    def columns(self) -> dict[str, np.ndarray]:
        """A copy of the recorded columns, trimmed to the events recorded."""
        with self._lock:
            return {k: a[: self._n].copy() for k, a in self._cols.items()}

    def save(self, path: str | os.PathLike[str], meta: dict[str, Any] | None = None,
             extra: dict[str, np.ndarray] | None = None) -> None:
        """Write the trace (and ``extra`` arrays, e.g. device samples) as one ``.npz``, atomically."""
        with self._lock:  # a late engine thread may still be recording
            doc = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "files": list(self.files),
                   "tags": list(self.tags), "backends": list(self.backends), **(meta or {})}
            arrays = {f"app_{k}": a[: self._n].copy() for k, a in self._cols.items()}
            if self.seen_extents:
                arrays["seen_extents"] = self.extents_table()
        arrays.update(extra or {})
        arrays["meta"] = np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8)
        tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _check_columns(arrays: dict[str, np.ndarray], p: str, nfiles: int, ntags: int, nbackends: int) -> None:
    """Every column present, 1-D, integer, of one length; indices inside their tables."""
    for prefix, spec in (("app_", COLUMNS), ("blk_", BLOCK_COLUMNS)):
        present = [k for k in arrays if k.startswith(prefix)]
        if not present and prefix == "blk_":
            continue
        n = None
        for k in spec:
            a = arrays.get(prefix + k)
            if a is None:
                raise FormatError("column missing", path=p, field=prefix + k)
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise FormatError(f"column is {a.ndim}-D {a.dtype}, not 1-D integer", path=p, field=prefix + k)
            if n is not None and len(a) != n:
                raise FormatError("columns of different lengths", path=p, field=prefix + k)
            n = len(a)
    for col, size in (("app_file", nfiles), ("app_tag", ntags), ("app_backend", nbackends)):
        a = arrays[col]
        if len(a) and (int(a.min()) < 0 or int(a.max()) >= size):
            raise FormatError(f"index outside its table of {size}", path=p, field=col)
    for key in ("extents", "seen_extents"):
        a = arrays.get(key)
        if a is None:
            continue
        if a.ndim != 2 or a.shape[1] != 4 or a.dtype.kind not in "iu":
            raise FormatError("must be an integer array of rows (file, file_offset, device_offset, length)",
                              path=p, field=key)
        if len(a) and (int(a[:, 0].min()) < 0 or int(a[:, 0].max()) >= nfiles or int(a[:, 3].min()) < 0):
            raise FormatError("file index outside the table or negative length", path=p, field=key)
    ds = arrays.get("diskstats")
    if ds is not None and (ds.ndim != 2 or ds.dtype.kind not in "iu"):
        raise FormatError("must be a 2-D integer array", path=p, field="diskstats")


class Trace:
    """A saved trace, loaded.

    ``app``: application columns (:data:`COLUMNS`); ``block``: block-layer
    columns (``block.BLOCK_COLUMNS``, empty when not captured); ``extents``:
    rows ``(file, file_offset, device_offset, length)``; ``diskstats``:
    device counter samples; ``files``/``tags``/``backends`` tables; ``meta``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        p = os.fspath(path)
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise FormatError(f"not a readable trace ({exc})", path=p) from exc
        try:
            self.meta = json.loads(arrays.pop("meta").tobytes())
        except (KeyError, ValueError) as exc:
            raise FormatError("not an llmtier trace (no valid meta)", path=p, field="meta") from exc
        if not isinstance(self.meta, dict) or self.meta.get("format") != TRACE_FORMAT:
            raise FormatError("not an llmtier trace", path=p, field="meta.format")
        if self.meta.get("version") != TRACE_VERSION:
            raise FormatError(f"trace version {self.meta.get('version')!r}; this llmtier reads {TRACE_VERSION}",
                              path=p, field="meta.version")
        try:
            for key in ("files", "tags", "backends"):
                if not isinstance(self.meta[key], list) or not all(isinstance(x, str) for x in self.meta[key]):
                    raise TypeError(key)
        except (KeyError, TypeError) as exc:
            raise FormatError("missing tables", path=p, field=f"meta.{exc.args[0]}") from exc
        _check_columns(arrays, p, len(self.meta["files"]), len(self.meta["tags"]), len(self.meta["backends"]))
        self.app = {k[4:]: v for k, v in arrays.items() if k.startswith("app_")}
        self.block = {k[4:]: v for k, v in arrays.items() if k.startswith("blk_")}
        self.extra = {k: v for k, v in arrays.items() if not k.startswith(("app_", "blk_"))}
        self.extents = self.extra.get("extents", np.empty((0, 4), dtype=np.int64))
        self.diskstats = self.extra.get("diskstats")
        self.files: list[str] = self.meta["files"]
        self.tags: list[str] = self.meta["tags"]
        self.backends: list[str] = self.meta["backends"]

    def __len__(self) -> int:
        return len(self.app["size"])

    def tag_of(self, i: int) -> str:
        return self.tags[int(self.app["tag"][i])]

    @property
    def has_block(self) -> bool:
        return "submit_ns" in self.block

    @property
    def missing(self) -> list[str]:
        return list(self.meta.get("missing", []))

    @property
    def notes(self) -> list[str]:
        return list(self.meta.get("notes", []))
