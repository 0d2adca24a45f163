"""Block-layer capture: ``block_rq_issue`` / ``block_rq_complete`` through a private ftrace instance.

What the device itself was asked to do, after the page cache, readahead,
merging and splitting (``max_sectors_kb``): one row per request with issue
and completion time, so latency and achieved queue depth follow.

How: tracefs is mounted if it is not (root only); a private instance
``instances/llmtier-<pid>`` is created so nothing else using ftrace is
disturbed; the two events are enabled with a filter on the traced disk(s);
a background thread copies ``trace_pipe`` into memory (never to disk: that
would trace itself) and the text is parsed when capture stops.  Timestamps
use the ``mono`` trace clock, the same clock as ``time.monotonic_ns()``, so
block rows line up with application rows; ftrace prints them with
microsecond resolution.

Where capture is not possible (not root, no tracefs, lockdown, no such
events) :class:`BlockTraceUnavailable` says what is missing.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import threading
import time
from typing import Any

import numpy as np

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
EVENTS = ("block/block_rq_issue", "block/block_rq_complete")
OPTIONAL_EVENTS = ("block/block_rq_requeue",)  # tells a driver's re-issue from a new request
BUFFER_KB_PER_CPU = 16384
PUMP_INTERVAL_S = 0.2  # how often the ring is copied out
MAX_TEXT = 2 << 30  # stop copying (and say so) past this much trace text

# op column of block rows
OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_OTHER = 0, 1, 2, 3, 4
# flags column: bits from the rwbs string
FLAG_READAHEAD, FLAG_SYNC, FLAG_META, FLAG_FUA, FLAG_PREFLUSH = 1, 2, 4, 8, 16

BLOCK_COLUMNS: dict[str, Any] = {
    "submit_ns": np.int64, "complete_ns": np.int64, "op": np.uint8, "flags": np.uint8, "dev": np.uint32,
    "offset": np.int64, "size": np.int64, "error": np.int32, "queue_depth": np.uint32,
}

_ISSUE = re.compile(rb"(\d+)\.(\d+): block_rq_issue: (\d+),(\d+) (\S+) (\d+) \(.*?\) (\d+) \+ (\d+)")
_COMPLETE = re.compile(rb"(\d+)\.(\d+): block_rq_complete: (\d+),(\d+) (\S+) \(.*?\) (\d+) \+ (\d+) .*?\[(-?\d+)\]")
_REQUEUE = re.compile(rb"block_rq_requeue: (\d+),(\d+) (\S+) \(.*?\) (\d+) \+ (\d+)")


class BlockTraceUnavailable(RuntimeError):
    """Block-layer capture cannot run here; the message names what is missing."""


def disk_devices(name: str) -> list[tuple[str, int, int]]:
    """``(name, major, minor)`` of the disks whose requests serve block device ``name``:
    the device itself, or its members for device-mapper / md devices (which
    pass bios down and never issue requests of their own)."""
    out: list[tuple[str, int, int]] = []
    slaves = f"/sys/class/block/{name}/slaves"
    members = sorted(os.listdir(slaves)) if os.path.isdir(slaves) else []
    for m in members or [name]:
        real = os.path.realpath(f"/sys/class/block/{m}")
        if os.path.exists(os.path.join(real, "partition")):
            real = os.path.dirname(real)
        if members and os.path.isdir(os.path.join(real, "slaves")) and os.listdir(os.path.join(real, "slaves")):
            out.extend(disk_devices(os.path.basename(real)))
            continue
        with open(os.path.join(real, "dev")) as f:
            major, minor = (int(x) for x in f.read().split(":"))
        out.append((os.path.basename(real), major, minor))
    return sorted(set(out))


def kernel_dev(major: int, minor: int) -> int:
    """The kernel-internal dev_t (MKDEV) that trace events carry."""
    return (major << 20) | minor


def _tracefs() -> str:
    """The tracefs root, mounting it when needed and permitted."""
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "instances")):
            return d
    try:
        if os.path.isdir(TRACEFS_DIRS[0]):
            r = subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS_DIRS[0]], capture_output=True, text=True,
                               timeout=10, check=False)
            if r.returncode == 0 and os.path.isdir(os.path.join(TRACEFS_DIRS[0], "instances")):
                return TRACEFS_DIRS[0]
            why = (r.stderr or r.stdout).strip() or f"mount exited {r.returncode}"
        else:
            why = f"{TRACEFS_DIRS[0]} does not exist"
    except (OSError, subprocess.SubprocessError) as exc:
        why = str(exc)
    who = "" if os.geteuid() == 0 else " (mounting needs root)"
    raise BlockTraceUnavailable(f"tracefs is not mounted and could not be mounted at {TRACEFS_DIRS[0]}{who}: {why}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _remove_stale_instances(root: str) -> None:
    """Instances left by llmtier processes that died without cleaning up."""
    inst = os.path.join(root, "instances")
    with contextlib.suppress(OSError):
        for name in os.listdir(inst):
            if not name.startswith("llmtier-"):
                continue
            try:
                pid = int(name.split("-")[1])
                os.kill(pid, 0)
            except (ValueError, IndexError):
                continue
            except ProcessLookupError:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(inst, name))
            except PermissionError:
                continue


class BlockTracer:
    """Capture block requests of the disk(s) behind ``device`` (a name from :func:`device_of`)."""

    def __init__(self, device: str, buffer_kb: int = BUFFER_KB_PER_CPU) -> None:
        self.device = device
        self.disks = disk_devices(device)
        self.buffer_kb = buffer_kb
        self.inst = ""
        self.notes: list[str] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = -1
        self.reissued = 0

    def start(self) -> BlockTracer:
        root = _tracefs()
        _remove_stale_instances(root)
        inst = os.path.join(root, "instances", f"llmtier-{os.getpid()}-{id(self) & 0xFFFF:x}")
        try:
            os.mkdir(inst)
        except OSError as exc:
            need = " (needs root, or CAP_SYS_ADMIN with write access to tracefs)" if exc.errno in (
                errno.EACCES, errno.EPERM) else ""
            raise BlockTraceUnavailable(f"cannot create an ftrace instance in {root}/instances{need}: "
                                        f"{exc.strerror}") from exc
        self.inst = inst
        try:
            for ev in EVENTS:
                if not os.path.isdir(os.path.join(inst, "events", ev)):
                    raise BlockTraceUnavailable(f"the kernel has no {ev} trace event")
            _write(os.path.join(inst, "tracing_on"), "0")
            try:
                _write(os.path.join(inst, "trace_clock"), "mono")
            except OSError as exc:
                raise BlockTraceUnavailable(f"the mono trace clock is not available: {exc.strerror}") from exc
            with contextlib.suppress(OSError):  # keep the default size if the kernel refuses
                _write(os.path.join(inst, "buffer_size_kb"), str(self.buffer_kb))
            filt = " || ".join(f"dev == {kernel_dev(ma, mi)}" for _, ma, mi in self.disks)
            for ev in EVENTS:
                _write(os.path.join(inst, "events", ev, "filter"), filt)
                _write(os.path.join(inst, "events", ev, "enable"), "1")
            for ev in OPTIONAL_EVENTS:
                if os.path.isdir(os.path.join(inst, "events", ev)):
                    with contextlib.suppress(OSError):
                        _write(os.path.join(inst, "events", ev, "filter"), filt)
                        _write(os.path.join(inst, "events", ev, "enable"), "1")
            self._fd = os.open(os.path.join(inst, "trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
            _write(os.path.join(inst, "tracing_on"), "1")
        except BlockTraceUnavailable:
            self._teardown()
            raise
        except OSError as exc:
            self._teardown()
            raise BlockTraceUnavailable(f"could not set up ftrace instance {inst}: {exc}") from exc
        try:
            self._thread = threading.Thread(target=self._pump, name="llmtier-blocktrace", daemon=True)
            self._thread.start()
        except BaseException:
            self._teardown()
            raise
        return self

    def _drain(self) -> None:
        """Copy what the pipe holds now, until it is empty."""
        while True:
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            if not data:
                return
            if self._size + len(data) > MAX_TEXT:
                if not any("truncated" in n for n in self.notes):
                    self.notes.append(f"block layer: capture truncated after {MAX_TEXT >> 20} MiB of trace text")
                continue  # keep emptying the ring so the kernel does not stall on it
            self._chunks.append(data)
            self._size += len(data)

    def _pump(self) -> None:
        # Drain in batches: waking for every event would compete with the traced
        # workload for the GIL and the CPU. The per-CPU ring holds seconds of events.
        try:
            while not self._stop.wait(PUMP_INTERVAL_S):
                self._drain()
        except OSError as exc:
            self.notes.append(f"block layer: reading the trace pipe failed ({exc}); capture ended early")

    def stop(self) -> dict[str, np.ndarray]:
        """Stop capture; the block columns (:data:`BLOCK_COLUMNS`). Notes on losses go to
        ``self.notes``. The ftrace instance is removed whatever happens."""
        if not self.inst:
            return empty_block_columns()
        try:
            time.sleep(0.02)  # completions of the last requests are logged in interrupt context
            with contextlib.suppress(OSError):
                _write(os.path.join(self.inst, "tracing_on"), "0")
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            with contextlib.suppress(OSError):
                self._drain()
            lost = self._lost_events()
            if lost:
                self.notes.append(f"block layer: the kernel dropped {lost} events (buffer overrun); "
                                  "latencies of the unpaired requests are unknown")
        finally:
            self._teardown()
        text = b"".join(self._chunks)
        self._chunks = []
        cols, unpaired, reissued = parse_block_text(text)
        if unpaired:
            self.notes.append(f"block layer: {unpaired} requests were issued but their completion was not seen")
        self.reissued = reissued
        return cols

    def _lost_events(self) -> int:
        lost = 0
        with contextlib.suppress(OSError):
            for cpu in os.listdir(os.path.join(self.inst, "per_cpu")):
                with open(os.path.join(self.inst, "per_cpu", cpu, "stats")) as f:
                    for line in f:
                        k, _, v = line.partition(":")
                        if k.strip() in ("overrun", "dropped events"):
                            with contextlib.suppress(ValueError):
                                lost += int(v.strip())
        return lost

    def _teardown(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self.inst:
            return
        for ev in EVENTS + OPTIONAL_EVENTS:
            with contextlib.suppress(OSError):
                _write(os.path.join(self.inst, "events", ev, "enable"), "0")
        with contextlib.suppress(OSError):
            os.rmdir(self.inst)
        self.inst = ""


def empty_block_columns() -> dict[str, np.ndarray]:
    return {k: np.empty(0, dtype=t) for k, t in BLOCK_COLUMNS.items()}


def _op_flags(rwbs: bytes) -> tuple[int, int]:
    s = rwbs.decode("ascii", "replace")
    pre = s.startswith("F")
    body = s[1:] if pre else s
    # rwbs: [F]lush-before, then the op letter (R W D E F(lush) N), then F(UA) A(head) S(ync) M(eta)...
    flags = ((FLAG_READAHEAD if "A" in body else 0) | (FLAG_SYNC if "S" in body else 0)
             | (FLAG_META if "M" in body else 0) | (FLAG_FUA if "F" in body[1:] else 0) | (FLAG_PREFLUSH if pre else 0))
    if body.startswith("R"):
        return OP_READ, flags
    if body.startswith("W"):
        return OP_WRITE, flags
    if body.startswith("D") or body.startswith("E"):
        return OP_DISCARD, flags
    if pre or body.startswith("F"):
        return OP_FLUSH, flags
    return OP_OTHER, flags


def _ns(sec: bytes, frac: bytes) -> int:
    """ftrace's ``SECONDS.FRACTION`` timestamp in nanoseconds (it prints microseconds)."""
    return int(sec) * 1_000_000_000 + int(frac[:9]) * 10 ** (9 - min(len(frac), 9))


def _op_kind(rwbs: bytes) -> int:
    return _op_flags(rwbs)[0]


def parse_block_text(text: bytes) -> tuple[dict[str, np.ndarray], int, int]:
    """Pair issue and complete lines (ftrace text) into request rows;
    ``(columns, unpaired issues, re-issues)``.

    A completion is matched to the oldest outstanding issue of the same
    disk, start sector and kind (read, write, flush, discard).  An issue that
    follows a ``block_rq_requeue`` of the same sector and kind is the same
    request issued again (the driver was busy), counted once.  Text without
    requeue events (older kernels): an issue of the same sector, kind and
    size while one is outstanding is taken for a requeue."""
    reissued = 0
    saw_requeue_events = b"block_rq_requeue:" in text
    requeued: dict[tuple[int, int, int], int] = {}
    rows: list[list[int]] = []
    pending: dict[tuple[int, int, int], list[int]] = {}
    for line in text.splitlines():
        if b"block_rq_issue:" in line:
            m = _ISSUE.search(line)
            if not m:
                continue
            sec, us, ma, mi, rwbs, nbytes, sector, nsec = m.groups()
            t = _ns(sec, us)
            op, flags = _op_flags(rwbs)
            dev = kernel_dev(int(ma), int(mi))
            size = int(nbytes) or int(nsec) * 512
            key = (dev, 0 if op == OP_FLUSH else int(sector), op)
            q = pending.setdefault(key, [])
            again = requeued.get(key, 0)
            if again or (q and not saw_requeue_events and op != OP_FLUSH and rows[q[-1]][6] == size):
                # Issued again: the driver was busy and the request was requeued.
                # Same request; keep its first issue time. (Without requeue events,
                # an issue of the same sector and size while one is outstanding is
                # taken for one.)
                if again:
                    requeued[key] = again - 1
                reissued += 1
                continue
            q.append(len(rows))
            rows.append([t, -1, op, flags, dev, int(sector) * 512, size, 0])
        elif b"block_rq_requeue:" in line:
            m = _REQUEUE.search(line)
            if m:
                ma, mi, rwbs, sector, _n = m.groups()
                op = _op_kind(rwbs)
                key = (kernel_dev(int(ma), int(mi)), 0 if op == OP_FLUSH else int(sector), op)
                requeued[key] = requeued.get(key, 0) + 1
        elif b"block_rq_complete:" in line:
            m = _COMPLETE.search(line)
            if not m:
                continue
            sec, us, ma, mi, rwbs, sector, _nsec, err = m.groups()
            t = _ns(sec, us)
            op = _op_kind(rwbs)
            q = pending.get((kernel_dev(int(ma), int(mi)), 0 if op == OP_FLUSH else int(sector), op))
            if q:
                r = rows[q.pop(0)]
                r[1] = t
                r[7] = int(err)
    unpaired = sum(len(q) for q in pending.values())
    if not rows:
        return empty_block_columns(), 0, reissued
    a = np.array(rows, dtype=np.int64)
    cols = {"submit_ns": a[:, 0], "complete_ns": a[:, 1], "op": a[:, 2].astype(np.uint8),
            "flags": a[:, 3].astype(np.uint8), "dev": a[:, 4].astype(np.uint32), "offset": a[:, 5],
            "size": a[:, 6], "error": a[:, 7].astype(np.int32)}
    cols["queue_depth"] = in_flight_at_submit(cols["submit_ns"], cols["complete_ns"])
    return cols, unpaired, reissued


def in_flight_at_submit(submit: np.ndarray, complete: np.ndarray) -> np.ndarray:
    """Requests in flight when each one was issued, itself included (unknown completions count as open)."""
    if len(submit) == 0:
        return np.empty(0, dtype=np.uint32)
    order = np.argsort(submit, kind="stable")
    rank = np.empty(len(submit), dtype=np.int64)
    rank[order] = np.arange(1, len(submit) + 1)  # issues at or before this one (ties by order)
    done = np.sort(complete[complete >= 0])
    finished = np.searchsorted(done, submit, side="right")
    return np.maximum(rank - finished, 1).astype(np.uint32)


def file_extents(path: str | os.PathLike[str], sync: bool = True) -> np.ndarray:
    """The file's extents on its device: rows ``(file_offset, device_offset, length)`` in bytes,
    device offsets relative to the whole disk (partition start added).  Empty
    when the file system does not answer FIEMAP.  ``sync`` writes dirty data
    back first (so delayed allocations have places); without it, extents
    whose place is not known yet are left out."""
    import fcntl  # noqa: PLC0415
    import struct  # noqa: PLC0415

    fs_iocc_fiemap = 0xC020660B
    fiemap_flag_sync = 1 if sync else 0
    unplaced = 0x2 | 0x4 | 0x8  # FIEMAP_EXTENT_UNKNOWN | DELALLOC | ENCODED
    n = 512
    out: list[tuple[int, int, int]] = []
    start = 0
    st = os.stat(path)
    part = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    base = 0
    with contextlib.suppress(OSError, ValueError), open(os.path.join(part, "start")) as f:
        base = int(f.read()) * 512
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return np.empty((0, 3), dtype=np.int64)
    try:
        while True:
            buf = bytearray(struct.pack("=QQIIII", start, (1 << 64) - 1 - start, fiemap_flag_sync, 0, n, 0)
                            + bytes(56 * n))
            try:
                fcntl.ioctl(fd, fs_iocc_fiemap, buf)
            except OSError:
                return np.empty((0, 3), dtype=np.int64)
            mapped = struct.unpack_from("=I", buf, 20)[0]
            last = False
            for i in range(mapped):
                lo, ph, ln, _r1, _r2, fl = struct.unpack_from("=QQQQQI", buf, 32 + 56 * i)
                if not fl & unplaced:
                    out.append((lo, ph + base, ln))
                last = bool(fl & 1)  # FIEMAP_EXTENT_LAST
            if mapped < n or last or mapped == 0:
                break
            lo, _ph, ln = struct.unpack_from("=QQQ", buf, 32 + 56 * (mapped - 1))
            start = lo + ln
    finally:
        os.close(fd)
    return np.array(out, dtype=np.int64).reshape(-1, 3)
