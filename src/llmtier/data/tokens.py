"""Random fixed-length windows of a token file, read at the device's speed.

>>> ds = TokenDataset("train.bin", seq_len=1024, batch_size=16, seed=0)    # doctest: +SKIP
>>> for x, y in ds:            # (16, 1024) int64 inputs and next-token targets
...     ...

The token file is either a flat array (nanoGPT's ``train.bin`` of uint16 or
uint32 ids) or a Megatron ``.bin`` with its ``.idx`` (:mod:`.indexed`; the
dtype comes from the index, and windows run over the documents back to back,
as Megatron's GPT dataset packs them).

Batch ``b`` of the stream is ``batch_size`` windows of ``seq_len + 1`` tokens
whose starts are drawn uniformly by ``numpy.random.default_rng([seed, b])``:
any batch can be produced without the ones before it, so the stream is
deterministic for a seed and resumes from a position (the number of batches
consumed, :meth:`TokenDataset.state_dict`).  The windows of a group of
consecutive batches (about :data:`GATHER_BYTES`) are read with **one** engine
call (``pread_pages``): each window widened to ``span`` bytes of whole 4 KiB
pages (``O_DIRECT``), into one aligned buffer; with ``uring`` the group goes to
the kernel in one call with no Python object per window, the ring's queue kept
full across its batches.  A background thread keeps at least two groups and
``prefetch`` batches in flight (:class:`BatchReader`).  Windows end before the file's last partial
4 KiB page (less than 4 KiB of tokens are never sampled).

With ``DataLoader(ds, batch_size=None, num_workers=W)`` worker ``w`` produces
the batches ``k`` with ``k % W == w`` and the DataLoader interleaves them back
in order: the stream is the same as without workers.  ``rank``/``world_size``
split the stream between data-parallel ranks (rank ``r`` gets global batches
``r, r + world_size, ...``).
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..engine import Engine, alloc, open_engine
from ..errors import FormatError, LLMTierError
from .indexed import bin_path, idx_path, read_index

ALIGN = 4096
TAG = "data:window"
#: bytes per engine call: consecutive batches are read as one group of about this size (at least one batch)
GATHER_BYTES = 4 << 20
_END = object()


class DataError(LLMTierError, ValueError):
    """A token file or loader setting that cannot work (too short, mismatched state)."""


class TokenDataset(torch.utils.data.IterableDataset):
    """Random windows of a token file as ``(x, y)`` int64 batches of shape ``(batch_size, seq_len)``.

    Args:
        path: a flat token file, or a Megatron ``.bin``/``.idx`` pair (prefix, ``.bin`` or ``.idx``).
        seq_len: tokens per sample (each window reads ``seq_len + 1``).
        batch_size: windows per batch.
        seed: the stream's seed.
        dtype: token dtype of a flat file (default uint16); a Megatron index brings its own.
        prefetch: batches read ahead by the background thread, at least (reads go out in groups of
            about :data:`GATHER_BYTES`, two groups or more in flight).
        batches: stop after this many batches of this rank's stream (default: never stop).
        engine: backend name for the engine each iterator opens (``"auto"``).
        rank, world_size: data-parallel split of the stream.
        io_nice: nice value for the engine's I/O threads (root or CAP_SYS_NICE), so that the
            training's compute threads do not keep the disk's queue from being refilled; None
            leaves them alone.
    """

    def __init__(self, path: str | os.PathLike[str], *, seq_len: int, batch_size: int, seed: int = 0,
                 dtype: Any = None, prefetch: int = 4, batches: int | None = None, engine: str = "auto",
                 rank: int = 0, world_size: int = 1, io_nice: int | None = -10) -> None:
        super().__init__()
        if seq_len <= 0 or batch_size <= 0 or prefetch <= 0:
            raise DataError(f"seq_len, batch_size and prefetch must be > 0, got {seq_len}, {batch_size}, {prefetch}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size), got {rank} of {world_size}")
        p = os.fspath(path)
        self.index = None
        if os.path.exists(idx_path(p)) and (p.endswith((".bin", ".idx")) or not os.path.exists(p)):
            self.index = read_index(p)
            self.path = bin_path(p)
            self.dtype = self.index.dtype
            data_bytes = self.index.tokens * self.dtype.itemsize
            if os.path.getsize(self.path) < data_bytes:
                raise FormatError(f"the index lists {data_bytes} bytes of tokens, the .bin has "
                                  f"{os.path.getsize(self.path)}", path=self.path, field="size")
        else:
            self.path = p
            self.dtype = np.dtype(dtype if dtype is not None else np.uint16)
            data_bytes = os.path.getsize(p) // self.dtype.itemsize * self.dtype.itemsize
        if self.dtype.kind not in "iu":
            raise DataError(f"token dtype must be an integer type, got {self.dtype}")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.prefetch, self.batches, self.engine_name = prefetch, batches, engine
        self.rank, self.world_size = rank, world_size
        self.io_nice = io_nice
        self.window_bytes = (seq_len + 1) * self.dtype.itemsize
        self.limit = data_bytes // ALIGN * ALIGN  # windows end before the last partial page
        self.max_start = (self.limit - self.window_bytes) // self.dtype.itemsize  # last window start, in tokens
        if self.max_start < 0:
            raise DataError(f"{self.path} holds {data_bytes} bytes of tokens; a window of {seq_len + 1} tokens needs "
                            f"{self.window_bytes} bytes within the first {self.limit} (whole 4 KiB pages)")
        self.span = -(-(self.window_bytes + ALIGN - self.dtype.itemsize) // ALIGN) * ALIGN  # most bytes one window reads
        if self.span > self.limit:
            raise DataError(f"{self.path} holds {self.limit} bytes of whole pages; a window reads {self.span}")
        self.position = 0

    # -- the stream ---------------------------------------------------------------------------------------------
    def starts(self, k: int) -> np.ndarray:
        """Token offsets of the windows of this rank's batch ``k``."""
        rng = np.random.default_rng([self.seed, k * self.world_size + self.rank])
        return rng.integers(0, self.max_start + 1, size=self.batch_size, dtype=np.int64)

    def extents(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(file offsets, window start within each extent)`` of the aligned reads of batch ``k``; every
        extent is ``self.span`` bytes (the most pages a window can touch), none past ``self.limit``."""
        off = self.starts(k) * self.dtype.itemsize
        lo = np.minimum(off // ALIGN * ALIGN, self.limit - self.span)
        return lo, off - lo

    def request_bytes(self, k: int) -> int:
        """Bytes batch ``k`` reads from the file (every window widened to ``span`` bytes of whole pages)."""
        return self.batch_size * self.span

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.position
        stop = self.batches
        ks = range(start + worker, stop if stop is not None else 1 << 62, workers)
        loader = BatchReader(self, ks)
        try:
            for x, y in loader:
                if info is None:
                    self.position += 1
                yield x, y
        finally:
            loader.close()

    # -- resuming -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: goes into the training checkpoint."""
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream at a saved position (the seed and shapes must match)."""
        for key in ("seed", "seq_len", "batch_size", "rank", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(f"saved loader state has {key}={state[key]}, this dataset {getattr(self, key)}")
        self.position = int(state["position"])

    def document(self, i: int, engine: Engine | None = None) -> np.ndarray:
        """The tokens of document ``i`` of a Megatron dataset (read through the engine)."""
        if self.index is None:
            raise DataError("a flat token file has no documents")
        if not 0 <= i < self.index.documents:
            raise DataError(f"document {i} out of range (0..{self.index.documents - 1})")
        s0, s1 = int(self.index.doc_index[i]), int(self.index.doc_index[i + 1])
        lo = int(self.index.pointers[s0]) if s1 > s0 else 0
        n = int(self.index.lengths[s0:s1].sum())
        out = np.empty(n, dtype=self.dtype)
        if n:
            eng = engine if engine is not None else open_engine(self.engine_name)
            try:
                with eng.open(self.path, "r") as f:
                    f.pread(out.view(np.uint8), lo, tag=TAG).result()
            finally:
                if engine is None:
                    eng.close()
        return out


class BatchReader:
    """Produces the batches ``ks`` of a :class:`TokenDataset` on a background thread, ``prefetch`` in flight.

    The windows of ``group`` consecutive batches (about :data:`GATHER_BYTES` of reads, at least one batch)
    go to the engine as **one** ``pread_pages``: the ring keeps its queue depth full across the batches of
    a group and drains once per group, and the engine hands back (and this thread wakes) once per group
    instead of once per batch.  ``max(2, ceil(prefetch / group))`` groups are in flight: the engine's
    worker reads the next one while this thread turns the previous one into tensors.
    """

    def __init__(self, ds: TokenDataset, ks: range) -> None:
        self.ds = ds
        self.ks = ks
        self.group = max(1, GATHER_BYTES // (ds.batch_size * ds.span))
        self.depth = max(2, -(-ds.prefetch // self.group))  # groups in flight
        self.engine = open_engine(ds.engine_name)
        #: why the I/O threads could not be given priority (None: they were, or io_nice is None)
        self.io_nice_note = self.engine.prioritize(ds.io_nice) if ds.io_nice is not None else None
        self.file = self.engine.open(ds.path, "r")
        self.out: queue.Queue = queue.Queue(maxsize=max(ds.prefetch, self.group))
        self._stop = threading.Event()
        self._free = [alloc(self.group * ds.batch_size * ds.span, huge=True) for _ in range(self.depth)]
        self.bytes_read = 0
        self.thread = threading.Thread(target=self._run, name="llmtier-tokens", daemon=True)
        self.thread.start()

    def _groups(self) -> Iterator[range]:
        ks, g = self.ks, self.group
        for i in range(0, len(ks), g):
            yield ks[i:i + g]

    def _run(self) -> None:
        inflight: deque = deque()
        ds = self.ds
        try:
            groups = self._groups()
            done = False
            while not self._stop.is_set():
                while not done and self._free:  # keep every free buffer reading
                    ks = next(groups, None)
                    if ks is None:
                        done = True
                        break
                    ext = [ds.extents(k) for k in ks]
                    lo = np.concatenate([e[0] for e in ext])
                    buf = self._free.pop()
                    view = buf[:len(lo) * ds.span]
                    fut = self.file.pread_pages(view, lo, ds.span, tag=TAG)  # the whole group: one engine call
                    inflight.append((buf, [e[1] for e in ext], fut, len(lo) * ds.span))
                if not inflight:
                    break
                self._finish(inflight.popleft())
            if not self._stop.is_set():
                self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)
        finally:
            for _, _, fut, _ in inflight:
                fut.exception()

    def _finish(self, item: tuple) -> None:
        buf, deltas, fut, nbytes = item
        # Wait without fut.result() on a pending future: that lends this thread to the engine, which then
        # runs every queued group here, synchronously, and the disk idles while this thread converts them.
        concurrent.futures.wait([fut])
        fut.result()
        self.bytes_read += nbytes
        ds = self.ds
        t, b = ds.seq_len, ds.batch_size
        flat = buf.view(ds.dtype)
        size = ds.dtype.itemsize
        per_batch = b * ds.span // size
        batches = []
        for j, delta in enumerate(deltas):
            x = np.empty((b, t), dtype=np.int64)
            y = np.empty((b, t), dtype=np.int64)
            base = j * per_batch + np.arange(b) * (ds.span // size) + delta // size
            for row, a in enumerate(base.tolist()):
                x[row] = flat[a:a + t]
                y[row] = flat[a + 1:a + 1 + t]
            batches.append((torch.from_numpy(x), torch.from_numpy(y)))
        self._free.append(buf)
        for xy in batches:
            self._put(xy)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> BatchReader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.out.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (reads in flight finish first) and close the engine. Idempotent."""
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()
        self.engine.close()

    def __enter__(self) -> BatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["ALIGN", "GATHER_BYTES", "TAG", "BatchReader", "DataError", "TokenDataset"]
