"""Machine-level helpers for honest measurements: page cache and CPU time."""
from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

DROP_CACHES = "/proc/sys/vm/drop_caches"


def drop_page_cache() -> tuple[bool, str]:
    """Write back dirty pages and drop the page cache; ``(ok, what happened)``.

    Needs root (or CAP_SYS_ADMIN); without it the caller must say that its
    buffered numbers may be flattered by the cache.
    """
    os.sync()
    try:
        with open(DROP_CACHES, "w") as fh:
            fh.write("3\n")
    except OSError as exc:
        return False, f"page cache NOT dropped ({DROP_CACHES}: {exc.strerror}); buffered figures may be flattered"
    return True, "page cache dropped before each buffered run"


def status_bytes(field: str) -> int:
    """A ``kB`` line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; 0 where there is none (no procfs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``; ``clear_refs`` 5, Linux 4.0+), so that ``VmHWM`` afterwards is the
    peak of what follows; False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class Timing:
    """Wall and CPU (user+system, all threads of this process) seconds."""

    wall_s: float
    cpu_s: float


def timed(fn: Callable[[], object]) -> Timing:
    """Run ``fn`` once and return its wall time and the process's CPU time."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return Timing(t1 - t0, cpu)


def engine_read_bw(paths: list[str], piece: int = 64 << 20, depth: int = 4) -> float | None:
    """Bytes/s of llmtier's engine reading ``paths`` whole (``piece``-byte direct
    reads, ``depth`` in flight, page cache dropped first): the disk's bound
    where fio is not installed."""
    from ..engine import alloc, open_engine  # noqa: PLC0415 - the bench layer sits above the engine

    drop_page_cache()
    bufs = [alloc(piece) for _ in range(depth)]
    total, t0 = 0, time.perf_counter()
    with open_engine("auto") as eng:
        for p in paths:
            with eng.open(p) as f:
                size, futs = f.size, []
                for k, off in enumerate(range(0, size, piece)):
                    if len(futs) == depth:
                        futs.pop(0).result()
                    futs.append(f.pread(bufs[k % depth][:min(piece, size - off)], off, exact=False))
                for fut in futs:
                    fut.result()
                total += size
    dt = time.perf_counter() - t0
    return total / dt if dt > 0 and total else None
