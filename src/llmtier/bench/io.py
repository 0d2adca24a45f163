"""The bandwidth study (CHEOPS '25 question 1) on the user's own machine.

For each engine × tensor size × direction it moves a set of tensors of that
size between page-aligned host memory and one file, and measures GiB/s and
CPU seconds per GiB; 4 KiB random reads at queue depth 1 and 32 give IOPS
(op ``randread``).  At depth 32 the ``uring`` engine runs twice: once with
one request per page (``pread_many``, row ``uring``) and once with the pages
API (``pread_pages``: one buffer, an int64 offset array, row ``uring-pages``).
In every round, fio runs the same block size, queue depth and direct flag
on the same file system, so each figure has its measured ceiling beside it.
Rounds interleave engines (and fio) so slow drift of a shared machine hits
all of them alike; each cell reports the median of the rounds and min–max.

Directions: ``read`` (file → memory), ``write`` (memory → a preallocated
file) and ``write-fresh`` (memory → a new file, block allocation included).
Write timings include a final ``fsync``: without it a buffered engine would
only be timed copying into the page cache.
"""
from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from ..engine import Engine, alloc, available_engines, open_engine
from ..engine.settings import Settings, current_settings
from .deepnvme import DeepNVMe, deepnvme_available
from .fio import fio_available, run_fio
from .system import Timing, drop_page_cache, timed

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
OPS = ("read", "write", "write-fresh", "randread")
PAGES = "uring-pages"  # the uring engine through File.pread_pages (random reads at depth 32)
FULL_SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 256 * MiB, 1 * GiB)
QUICK_SIZES = (64 * KiB, 1 * MiB, 64 * MiB)
DEEPNVME_TUNINGS = ((1 * MiB, 32), (1 * MiB, 128), (8 * MiB, 32), (8 * MiB, 128))


@dataclass
class Cell:
    """One row of the study (one engine, op and size): medians over rounds."""

    engine: str
    op: str
    size_bytes: int
    block_size: int
    queue_depth: int
    runs: int = 0
    gib_per_s: float = 0.0
    gib_per_s_min: float = 0.0
    gib_per_s_max: float = 0.0
    iops: float = 0.0
    cpu_s_per_gib: float = 0.0
    cpu_us_per_io: float = 0.0
    fio_gib_per_s: float | None = None
    fio_iops: float | None = None
    fio_cpu_s_per_gib: float | None = None
    samples: list[tuple[float, float, int, int]] = field(default_factory=list, repr=False)  # wall, cpu, bytes, ios

    def finish(self, fio: list[Any]) -> None:
        """Reduce the samples (and the fio samples of the same rounds) to medians."""
        rates = [b / GiB / w for w, _, b, _ in self.samples]
        self.runs = len(rates)
        self.gib_per_s = statistics.median(rates)
        self.gib_per_s_min, self.gib_per_s_max = min(rates), max(rates)
        self.iops = statistics.median(n / w for w, _, _, n in self.samples)
        self.cpu_s_per_gib = statistics.median(c / (b / GiB) for _, c, b, _ in self.samples)
        self.cpu_us_per_io = statistics.median(c / n * 1e6 for _, c, _, n in self.samples)
        if fio:
            self.fio_gib_per_s = statistics.median(r.gib_per_s for r in fio)
            self.fio_iops = statistics.median(r.iops for r in fio)
            self.fio_cpu_s_per_gib = statistics.median(r.cpu_s_per_gib for r in fio)

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("samples")
        return d


@dataclass(frozen=True)
class Workload:
    """What one cell moves: ``count`` requests of ``size`` bytes at ``offsets``."""

    op: str  # read | write | write-fresh | randread
    size: int
    offsets: tuple[int, ...]
    queue_depth: int  # requests in flight (randread qd1 submits one at a time)
    block_size: int  # what the device sees per request

    @property
    def nbytes(self) -> int:
        return self.size * len(self.offsets)


@dataclass
class StudyConfig:
    """Knobs of :func:`run_io_study`; ``quick()`` gives the under-a-minute variant
    (3 sizes, 3 rounds, 128 MiB per cell, one DeepNVMe tuning)."""

    directory: str
    engines: tuple[str, ...] = ("posix", "threads", "uring", "deepnvme")
    sizes: tuple[int, ...] = FULL_SIZES
    ops: tuple[str, ...] = OPS
    rounds: int = 5
    volume: int = 1 * GiB  # bytes moved per sequential cell (at least one tensor)
    max_requests: int = 16384  # caps the volume of small-tensor cells
    random_ios: int = 100_000  # 4 KiB random reads at QD32 per round (QD1: a tenth)
    deepnvme_tunings: tuple[tuple[int, int], ...] = DEEPNVME_TUNINGS
    settings: Settings = field(default_factory=current_settings)

    @classmethod
    def quick(cls, directory: str, **kw: Any) -> StudyConfig:
        base = dict(sizes=QUICK_SIZES, rounds=3, volume=128 * MiB, random_ios=10_000,
                    deepnvme_tunings=((1 * MiB, 32),))
        base.update(kw)
        return cls(directory, **base)


def sequential_workload(op: str, size: int, cfg: StudyConfig) -> Workload:
    count = max(1, min(cfg.volume // size, cfg.max_requests))
    s = cfg.settings
    pieces = count * -(-size // s.chunk_size)
    return Workload(op, size, tuple(i * size for i in range(count)), min(s.queue_depth, pieces), min(size, s.chunk_size))


def random_workload(qd: int, cfg: StudyConfig, file_size: int, seed: int) -> Workload:
    n = cfg.random_ios if qd > 1 else max(1000, cfg.random_ios // 10)
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, file_size // (4 * KiB), n) * 4 * KiB
    return Workload("randread", 4 * KiB, tuple(int(o) for o in offsets), qd, 4 * KiB)


class Study:
    """Runs the cells; owns the engines, the data file and the buffers."""

    def __init__(self, cfg: StudyConfig) -> None:
        self.cfg = cfg
        self.notes: list[str] = []
        self.data_path = os.path.join(cfg.directory, "llmtier-bench-io.dat")
        self.fresh_path = os.path.join(cfg.directory, "llmtier-bench-io.fresh")
        self.engines: dict[str, Any] = {}
        self.stack = ExitStack()
        self._cells: dict[tuple, Cell] = {}
        self._fio: dict[tuple, list[Any]] = {}
        self._sync: Engine | None = None

    # -- setup ----------------------------------------------------------------
    def open(self) -> None:
        cfg = self.cfg
        os.makedirs(cfg.directory, exist_ok=True)
        avail = available_engines()
        for name in cfg.engines:
            if name == "deepnvme":
                ok, why = deepnvme_available()
                if ok:
                    self.engines[name] = None  # one handle per tuning, made per cell
                else:
                    self.notes.append(f"deepnvme skipped: {why}")
            elif avail.get(name, f"unknown engine {name!r}"):
                self.notes.append(f"{name} skipped: {avail.get(name, 'unknown engine')}")
            else:
                self.engines[name] = self.stack.enter_context(open_engine(name, **_fields(cfg.settings)))
        self.fio_ok, fio_msg = fio_available()
        self.notes.append(fio_msg if not self.fio_ok else f"ceiling: {fio_msg}, ioengine=io_uring, direct=1")
        if "posix" in self.engines:
            _, msg = drop_page_cache()
            self.notes.append(f"posix: {msg}")
        self._make_data_file()

    def close(self) -> None:
        self.stack.close()
        for p in (self.data_path, self.fresh_path):
            if os.path.exists(p):
                os.unlink(p)

    def _make_data_file(self) -> None:
        nbytes = max(self.cfg.volume, max(self.cfg.sizes))
        chunk = alloc(64 * MiB)
        chunk[:] = np.random.default_rng(0).integers(0, 256, chunk.nbytes, dtype=np.uint8)
        with open_engine("threads") as eng, eng.open(self.data_path, "w") as f:
            f.pwrite_many([chunk[: min(chunk.nbytes, nbytes - o)] for o in range(0, nbytes, chunk.nbytes)],
                          list(range(0, nbytes, chunk.nbytes))).result()
            f.sync()
        self.file_size = nbytes

    # -- one measurement ------------------------------------------------------
    def run_engine(self, name: str, wl: Workload, buf: np.ndarray, tuning: tuple[int, int] | None = None) -> Timing:
        """Time ``name`` on ``wl`` once."""
        views = [buf[(i * wl.size) % buf.nbytes:][: wl.size] for i in range(len(wl.offsets))]
        path = self.fresh_path if wl.op == "write-fresh" else self.data_path
        if wl.op == "write-fresh" and os.path.exists(path):
            os.unlink(path)
        if name == "posix" and wl.op in ("read", "randread"):
            drop_page_cache()
        if name == "deepnvme":
            return self._run_deepnvme(wl, path, tuning)  # type: ignore[arg-type]
        if name == PAGES:
            # The same bytes of the same buffer the per-request row reads into
            # (views[k] is page k of it), as one array with an offset array.
            pages = buf[: wl.nbytes] if wl.nbytes <= buf.nbytes else alloc(wl.nbytes)
            offsets = np.array(wl.offsets, dtype=np.int64)
            uring: Engine = self.engines["uring"]
            return timed(lambda: _pages_run(uring, path, pages, offsets, wl.size))
        eng: Engine = self.engines[name]
        return timed(lambda: _engine_run(eng, wl, path, views))

    def _run_deepnvme(self, wl: Workload, path: str, tuning: tuple[int, int]) -> Timing:
        """DeepNVMe at its best: its own page-locked buffers (one per tensor,
        made outside the timing), all ops issued then one wait."""
        bs, qd = tuning
        if wl.op == "write-fresh":
            open(path, "wb").close()
        with DeepNVMe(bs, qd) as dn:
            bufs = [dn.alloc(wl.size) for _ in wl.offsets]
            if wl.op == "read":
                return timed(lambda: dn.read(path, bufs, list(wl.offsets)))
            sync = self._sync_engine()

            def write() -> None:
                dn.write(path, bufs, list(wl.offsets))
                with sync.open(path, "r+") as f:  # the same final fsync our writes pay
                    f.sync()

            return timed(write)

    def _sync_engine(self) -> Engine:
        if self._sync is None:
            self._sync = self.stack.enter_context(open_engine("posix"))
        return self._sync

    def run_fio(self, wl: Workload) -> Any:
        op = {"read": "read", "randread": "randread", "write": "write", "write-fresh": "write"}[wl.op]
        path = self.data_path
        if wl.op == "write-fresh":
            path = self.fresh_path
            if os.path.exists(path):
                os.unlink(path)
        return run_fio(path, op, wl.block_size, wl.queue_depth, wl.nbytes if wl.op != "randread" else self.file_size,
                       direct=True, ioengine="io_uring",
                       number_ios=len(wl.offsets) if wl.op == "randread" else None,
                       fresh=wl.op == "write-fresh")

    # -- the study ------------------------------------------------------------
    def cells(self) -> Iterator[tuple[Workload, str, tuple[int, int] | None]]:
        cfg = self.cfg
        for op in cfg.ops:
            if op == "randread":
                continue  # below
            for size in cfg.sizes:
                wl = sequential_workload(op, size, cfg)
                for name in self.engines:
                    if name != "deepnvme":
                        yield wl, name, None
                        continue
                    # Its tuning sweep where the study compares against it (>= 1 MiB);
                    # below that, one tuning: every small tensor is one op at depth 1 anyway.
                    for tuning in cfg.deepnvme_tunings if size >= MiB else cfg.deepnvme_tunings[:1]:
                        yield wl, name, tuning
        if "randread" not in cfg.ops:
            return
        for qd in (1, 32):
            wl = random_workload(qd, cfg, self.file_size, seed=qd)
            for name in self.engines:
                if name != "deepnvme":  # its API has no one-request-at-a-time mode to compare
                    yield wl, name, None
                if name == "uring" and qd > 1:
                    yield wl, PAGES, None

    def run(self, progress: bool = True) -> list[Cell]:
        cells = list(self.cells())
        workloads = list(dict.fromkeys(wl for wl, _, _ in cells))
        biggest = max(min(wl.nbytes, 1 * GiB) for wl in workloads)
        buf = alloc(biggest)
        buf[:] = 0xA5
        total = self.cfg.rounds * (len(cells) + (len(workloads) if self.fio_ok else 0))
        with tqdm(total=total, desc="bench io", unit="run", disable=not progress, leave=False) as bar:
            for rnd in range(self.cfg.rounds + 1):  # round 0 is the warm-up, not recorded
                for wl in workloads:
                    for c_wl, name, tuning in cells:
                        if c_wl is not wl:
                            continue
                        t = self.run_engine(name, wl, buf, tuning)
                        if rnd:
                            self._cell(name, wl, tuning).samples.append((t.wall_s, t.cpu_s, wl.nbytes, len(wl.offsets)))
                            bar.update()
                    if self.fio_ok and rnd:
                        self._fio.setdefault(_key(wl), []).append(self.run_fio(wl))
                        bar.update()
        for key, cell in self._cells.items():
            cell.finish(self._fio.get(key[:4], []))
        return list(self._cells.values())

    def _cell(self, name: str, wl: Workload, tuning: tuple[int, int] | None) -> Cell:
        bs, qd = tuning if tuning else (wl.block_size, wl.queue_depth)
        if name == "threads" and not tuning:
            qd = min(self.cfg.settings.threads, wl.queue_depth) if wl.queue_depth > 1 else 1
        key = (*_key(wl), name, tuning)
        if key not in self._cells:
            self._cells[key] = Cell(name, wl.op if wl.op != "randread" else f"randread-qd{wl.queue_depth}",
                                    wl.size, bs, qd)
        return self._cells[key]


def _key(wl: Workload) -> tuple:
    return (wl.op, wl.size, wl.queue_depth, len(wl.offsets))


def _engine_run(eng: Engine, wl: Workload, path: str, views: list[np.ndarray]) -> None:
    mode = {"read": "r", "randread": "r", "write": "r+", "write-fresh": "w"}[wl.op]
    with eng.open(path, mode) as f:
        if wl.op == "randread" and wl.queue_depth == 1:
            for v, o in zip(views, wl.offsets):  # one request in flight at a time
                f.pread(v, o).result()
        elif wl.op in ("read", "randread"):
            f.pread_many(views, wl.offsets).result()
        else:
            f.pwrite_many(views, wl.offsets).result()
            f.sync()


def _pages_run(eng: Engine, path: str, buf: np.ndarray, offsets: np.ndarray, page: int) -> None:
    with eng.open(path, "r") as f:
        f.pread_pages(buf, offsets, page).result()


def _fields(s: Settings) -> dict[str, Any]:
    return {k: getattr(s, k) for k in ("direct", "chunk_size", "queue_depth", "threads", "alignment")}


@contextmanager
def study(cfg: StudyConfig) -> Iterator[Study]:
    """Open a :class:`Study` (data file, engines) and clean up after it."""
    s = Study(cfg)
    try:
        s.open()
        yield s
    finally:
        s.close()


def run_io_study(cfg: StudyConfig, progress: bool = True) -> tuple[list[Cell], list[str]]:
    """Run the whole study; returns the cells and notes on what was skipped and why."""
    with study(cfg) as s:
        cells = s.run(progress)
        return cells, s.notes
