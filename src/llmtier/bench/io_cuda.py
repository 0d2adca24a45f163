"""The bandwidth study's GPU half (CHEOPS '25 question 1): tensors between SSD and GPU memory.

For each tensor size and direction it moves ``volume`` bytes of tensors of
that size between one file and GPU memory along every path it can run here,
interleaved round by round, and reports the median GiB/s with min-max:

* ``llmtier``: the engine's direct reads into pinned slots, each copied to
  the GPU on a side stream while the next slots are read
  (:class:`~llmtier.engine.cuda.DevicePipe`); writes the reverse;
* ``host``: the same engine into host memory only -- the CPU-destination
  figure, so ``llmtier / host`` says what the GPU hop costs;
* ``naive``: what users write: buffered reads into fresh pageable memory, then
  ``.to("cuda")`` (writes: ``.cpu()``, then ``write``); page cache dropped first;
* ``kvikio``: cuFile through kvikio where it imports (GDS, or its
  compatibility mode: the table says which);
* ``deepnvme``: DeepSpeed's ``aio_handle`` into page-locked host tensors, then
  copied to the GPU, where ``deepspeed`` and its op build;
* ``fio``: sequential direct reads/writes of the same file at the engine's
  request size and depth, the ceiling of the disk in the same round.

Writes are timed to the end of an ``fsync``.  ``device="cpu"`` runs the same
schedule with host tensors standing in for GPU memory (a smoke test of the
code on machines without a GPU; its figures mean nothing about a GPU).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from ..engine import alloc, open_engine
from ..engine.cuda import DeviceOps, DevicePipe
from .deepnvme import DeepNVMe, deepnvme_available
from .fio import fio_available, run_fio
from .system import drop_page_cache

MiB, GiB = 1 << 20, 1 << 30
SIZES = (1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)
QUICK_SIZES = (1 * MiB, 64 * MiB)
PATHS = ("llmtier", "host", "naive", "kvikio", "deepnvme", "fio")


@dataclass
class DeviceCell:
    """One path x op x size: medians over the rounds."""

    path: str
    op: str
    size_bytes: int
    gib_per_s: float = 0.0
    gib_per_s_min: float = 0.0
    gib_per_s_max: float = 0.0
    runs: int = 0
    note: str = ""
    samples: list[float] = field(default_factory=list, repr=False)

    def finish(self) -> None:
        if self.samples:
            self.runs = len(self.samples)
            self.gib_per_s = statistics.median(self.samples)
            self.gib_per_s_min, self.gib_per_s_max = min(self.samples), max(self.samples)

    def record(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples"] = list(self.samples)
        return d


def _kvikio() -> tuple[Any, str]:
    try:
        import kvikio  # noqa: PLC0415 - optional peer
        import kvikio.defaults  # noqa: PLC0415
    except ImportError as exc:
        return None, f"kvikio not importable ({exc})"
    mode = getattr(kvikio.defaults, "compat_mode", None) or getattr(kvikio.defaults, "is_compat_mode_preferred", None)
    try:
        how = f"compat mode {mode()}" if callable(mode) else "mode unknown"
    except Exception as exc:  # noqa: BLE001 - a description only
        how = f"mode unknown ({exc})"
    return kvikio, how


class _Paths:
    """The transfer functions of one study: each moves ``tensors`` of ``size`` bytes."""

    def __init__(self, path: str, device: str, engine: Any, slot_bytes: int) -> None:
        import torch  # noqa: PLC0415

        self.torch, self.path = torch, path
        self.ops = DeviceOps(device)
        self.engine = engine
        self.pipe = DevicePipe(engine, device, slot_bytes=slot_bytes, slots=4)
        self.kvikio, self.kvikio_mode = _kvikio() if self.ops.cuda else (None, "kvikio needs a GPU")
        ok, why = deepnvme_available()
        self.deepnvme_reason = "" if ok and self.ops.cuda else (why if not ok else "the GPU path needs a GPU")

    def available(self) -> dict[str, str]:
        """path -> "" when it runs here, else why not."""
        fio_ok, fio_why = fio_available()
        return {"llmtier": "", "host": "", "naive": "",
                "kvikio": "" if self.kvikio else self.kvikio_mode,
                "deepnvme": self.deepnvme_reason, "fio": "" if fio_ok else fio_why}

    def device_tensors(self, size: int, count: int) -> list[Any]:
        return [self.ops.empty(size) for _ in range(count)]

    def read(self, name: str, size: int, count: int, dev: list[Any]) -> None:
        torch, offs = self.torch, [i * size for i in range(count)]
        if name == "llmtier":
            with self.engine.open(self.path) as f:
                self.pipe.read_many(f, offs, dev)
        elif name == "host":
            bufs = [alloc(size) for _ in range(count)]
            with self.engine.open(self.path) as f:
                f.pread_many(bufs, offs).result()
        elif name == "naive":
            with open(self.path, "rb", buffering=0) as fh:
                for i, d in enumerate(dev):
                    host = np.empty(size, dtype=np.uint8)
                    fh.seek(offs[i])
                    fh.readinto(memoryview(host))
                    d.copy_(torch.from_numpy(host))
        elif name == "kvikio":
            with self.kvikio.CuFile(self.path, "r") as f:
                futs = [f.pread(d, size, o) for d, o in zip(dev, offs)]
                for fut in futs:
                    fut.get()
        elif name == "deepnvme":
            with DeepNVMe() as dn:
                bufs = [dn.alloc(size) for _ in range(count)]
                dn.read(self.path, bufs, offs)
                for d, b in zip(dev, bufs):
                    d.copy_(b, non_blocking=True)
                self.ops.synchronize()
        self.ops.synchronize()

    def write(self, name: str, size: int, count: int, dev: list[Any], target: str) -> None:
        offs = [i * size for i in range(count)]
        if name == "llmtier":
            with self.engine.open(target, "w") as f:
                self.pipe.write_many(f, offs, dev)
                f.sync()
        elif name == "host":
            bufs = [alloc(size) for _ in range(count)]
            with self.engine.open(target, "w") as f:
                f.pwrite_many(bufs, offs).result()
                f.sync()
        elif name == "naive":
            fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for d, o in zip(dev, offs):
                    os.pwrite(fd, d.cpu().numpy().tobytes(), o)
                os.fsync(fd)
            finally:
                os.close(fd)
        elif name == "kvikio":
            with self.kvikio.CuFile(target, "r+") as f:
                for fut in [f.pwrite(d, size, o) for d, o in zip(dev, offs)]:
                    fut.get()
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif name == "deepnvme":
            with DeepNVMe() as dn:
                bufs = [dn.alloc(size) for _ in range(count)]
                for b, d in zip(bufs, dev):
                    b.copy_(d)
                dn.write(target, bufs, offs)
            fd = os.open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        self.pipe.close()


def _make_file(path: str, nbytes: int, engine: Any) -> None:
    if os.path.exists(path) and os.path.getsize(path) >= nbytes:
        return
    chunk = alloc(64 * MiB)
    chunk[:] = np.random.default_rng(0).integers(0, 256, chunk.size, dtype=np.uint8)
    with engine.open(path, "w") as f:
        for off in range(0, nbytes, chunk.size):
            f.pwrite(chunk[:min(chunk.size, nbytes - off)], off).result()
        f.sync()


def run_device_study(directory: str, *, device: str = "cuda", sizes: tuple[int, ...] = SIZES, ops: tuple[str, ...] = ("read", "write"),
                     paths: tuple[str, ...] = PATHS, rounds: int = 5, volume: int = 1 * GiB, slot_bytes: int = 64 * MiB,
                     progress: bool = True) -> tuple[list[DeviceCell], list[str]]:
    """Run the GPU half of the study; returns the cells and notes (what did not run, and why)."""
    os.makedirs(directory, exist_ok=True)
    src = os.path.join(directory, "llmtier-io-cuda.bin")
    dst = os.path.join(directory, "llmtier-io-cuda-w.bin")
    volume = max(volume, max(sizes))
    notes: list[str] = []
    cells: dict[tuple[str, str, int], DeviceCell] = {}
    with open_engine("auto") as eng:
        _make_file(src, volume, eng)
        _make_file(dst, volume, eng)
        run = _Paths(src, device, eng, slot_bytes)
        try:
            avail = run.available()
            use = [p for p in paths if not avail.get(p, f"unknown path {p}")]
            notes += [f"{p}: not run ({avail.get(p, 'unknown path')})" for p in paths if p not in use]
            if "kvikio" in use:
                notes.append(f"kvikio: {run.kvikio_mode}")
            _, how = drop_page_cache()
            notes.append(f"engine {eng.name}; {how}")
            steps = rounds * len(sizes) * len(ops) * len(use)
            bar = tqdm(total=steps, disable=not progress, desc="bench io --device", unit="cell")
            for rnd in range(rounds + 1):  # the first round warms up and is not kept
                for size in sizes:
                    count = max(1, volume // size)
                    dev = run.device_tensors(size, count)
                    for op in ops:
                        for name in use:
                            cell = cells.setdefault((name, op, size), DeviceCell(name, op, size))
                            rate = _one(run, name, op, size, count, dev, src, dst)
                            if rnd > 0:
                                cell.samples.append(rate)
                                bar.update()
                    del dev
            bar.close()
        finally:
            run.close()
    for c in cells.values():
        c.finish()
    return list(cells.values()), notes


def _one(run: _Paths, name: str, op: str, size: int, count: int, dev: list[Any], src: str, dst: str) -> float:
    nbytes = size * count
    if name == "fio":
        r = run_fio(src if op == "read" else dst, op, min(size, 1 * MiB), 32, nbytes)
        return r.gib_per_s
    if op == "read":
        drop_page_cache()
        t0 = time.perf_counter()
        run.read(name, size, count, dev)
    else:
        t0 = time.perf_counter()
        run.write(name, size, count, dev, dst)
    return nbytes / GiB / (time.perf_counter() - t0)


def format_table(cells: list[DeviceCell], notes: list[str]) -> str:
    """Markdown: one row per op x size, a column per path, and llmtier's ratio to host and kvikio."""
    by = {(c.path, c.op, c.size_bytes): c for c in cells}
    paths = [p for p in PATHS if any(c.path == p for c in cells)]
    head = "| op | size | " + " | ".join(f"{p} GiB/s" for p in paths) + " | llmtier/host | llmtier/kvikio |"
    lines = [head, "|" + "---|" * (len(paths) + 4)]
    for op in ("read", "write"):
        for size in sorted({c.size_bytes for c in cells if c.op == op}):
            row = [op, f"{size // MiB} MiB"]
            for p in paths:
                c = by.get((p, op, size))
                row.append(f"{c.gib_per_s:.2f} ({c.gib_per_s_min:.2f}-{c.gib_per_s_max:.2f})" if c else "-")
            ours = by.get(("llmtier", op, size))
            for peer in ("host", "kvikio"):
                c = by.get((peer, op, size))
                row.append(f"{ours.gib_per_s / c.gib_per_s:.2f}" if ours and c and c.gib_per_s else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


__all__ = ["PATHS", "QUICK_SIZES", "SIZES", "DeviceCell", "format_table", "run_device_study"]
