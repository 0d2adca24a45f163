"""Save and load nested training state: durable, crash-safe, asynchronous, one shard per rank.

See docs/CHECKPOINT.md for the format, the guarantees and a training-loop example.
"""
from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine import Engine, alloc, open_engine
from ..errors import CheckpointError, LLMTierError
from ..store import StoreWriter, dtypes, open_store
from ..store.writer import STAGE_BYTES, _check_json, fsync_dir
from . import layout
from .dist import Ranks
from .readahead import ReadAhead
from .readinto import read_tensors, typed
from .staging import CHUNK, Packer, ParallelCopy, StagingPool, host_pieces
from .tree import LazyTensor, Leaf, _is_torch, decode, encode, lookup

META_KEY = "llmtier_checkpoint"
_END, _DONE, _ABORT = object(), object(), object()
_LIST_TRIES = 5  # listings of the directory one load() tries before it gives up


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped on load (incomplete or damaged); the message names it and says why."""


@dataclass
class CheckpointInfo:
    """What one save did (this rank's view)."""

    step: int
    path: str  # the step directory
    bytes: int = 0  # size of this rank's file
    seconds: float = 0.0  # call to durable commit
    stall_seconds: float = 0.0  # how long the caller was blocked (== seconds for a synchronous save)
    staging_bytes: int = 0  # host staging memory in use by this save (pool + writer buffers)
    deleted: list[int] = field(default_factory=list)  # steps removed by keep-last-N retention


class AsyncSave:
    """Handle of a save running in the background (from :meth:`Checkpointer.save_async`)."""

    def __init__(self, info: CheckpointInfo) -> None:
        self.info = info
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._reported = False  # the error was raised once already (by this handle's wait)

    def done(self) -> bool:
        """True once the checkpoint is durable (or failed)."""
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> CheckpointInfo:
        """Block until the checkpoint is committed; raise the background error if it failed."""
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            self._reported = True
            raise self.error
        return self.info


def _spec(value: Any) -> tuple[dtypes.DType, tuple[int, ...]]:
    if isinstance(value, LazyTensor):
        return value.store_dtype, tuple(int(d) for d in value.shape)
    return dtypes.of(value), tuple(int(d) for d in value.shape)


def _state_bytes(leaves: list[Leaf]) -> int:
    """The bytes of the tensor values among ``leaves`` (what a snapshot copies)."""
    total = 0
    for x in leaves:
        dt, shape = _spec(x.value)
        total += dt.itemsize * int(np.prod(shape, dtype=object))
    return total


class Checkpointer:
    """Checkpoints of one training run in ``directory``.

    ``keep_last``: keep this many newest complete checkpoints (``None``: keep
    all); the one just written is never deleted.  ``staging_bytes``: the
    bound on host memory an asynchronous save may use to snapshot tensors
    (``None``: as much as the state's tensors, so the caller stalls only for
    the copy; smaller values make the snapshot wait for the disk once the
    pool is full).  ``copy_threads``: threads that copy the snapshot (default:
    the CPU count, at most 4).  ``group``: the torch.distributed group whose ranks each
    save one shard (default: the world when a process group is initialised).

    >>> with Checkpointer("ckpt", keep_last=3) as ck:            # doctest: +SKIP
    ...     ck.save_async({"model": model.state_dict(), "step": 100}, step=100)
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep_last: int | None = None,
                 staging_bytes: int | None = None, engine: Engine | None = None, group: Any = None,
                 chunk_bytes: int = CHUNK, copy_threads: int | None = None) -> None:
        if keep_last is not None and keep_last < 1:
            raise CheckpointError(f"keep_last must be >= 1, got {keep_last}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep_last = keep_last
        self.staging_limit = staging_bytes
        self._ranks = Ranks(group)
        self._bg_ranks: Ranks | None = None
        self._group = group
        self._chunk = chunk_bytes
        self._pool: StagingPool | None = None
        self._copy_threads = copy_threads if copy_threads is not None else min(4, os.cpu_count() or 1)
        self._copier: ParallelCopy | None = None
        self._pending: AsyncSave | None = None
        self._lock: layout.DirLock | None = None
        self._own_engine = engine is None
        self.engine = engine or open_engine()
        self.loaded: CheckpointInfo | None = None

    @property
    def rank(self) -> int:
        return self._ranks.rank

    @property
    def world_size(self) -> int:
        return self._ranks.world

    @property
    def staging_bytes(self) -> int:
        """Host staging memory held for asynchronous saves (the pool's chunks)."""
        return self._pool.allocated if self._pool is not None else 0

    # -- saving ---------------------------------------------------------------
    def save(self, state: Any, step: int, *, metadata: dict[str, Any] | None = None) -> CheckpointInfo:
        """Save ``state`` as checkpoint ``step``; returns once it is durable and committed on every rank."""
        self.wait()
        t0 = time.perf_counter()
        err, size = None, 0
        step_dir = os.path.join(self.directory, layout.step_name(step))
        try:
            tree, leaves = encode(state)
            step_dir = self._prepare(step, metadata)
            cuda = any(_is_torch(x.value) and x.value.device.type != "cpu" for x in leaves)
            bounce = alloc(CHUNK) if cuda else None
            with ReadAhead([x.value for x in leaves]) as ra:
                size = self._write(step_dir, step, tree, leaves, lambda leaf: ra.pieces(leaf.value)
                                   if ra.handles(leaf.value) else host_pieces(leaf.value, bounce))
        except BaseException as exc:  # noqa: BLE001 - every rank must learn of it before anyone raises
            err = exc
        deleted = self._commit(self._ranks, step, step_dir, err, size, metadata)
        dt = time.perf_counter() - t0
        return CheckpointInfo(step, step_dir, size, dt, dt, 2 * STAGE_BYTES, deleted)

    def save_async(self, state: Any, step: int, *, metadata: dict[str, Any] | None = None) -> AsyncSave:
        """Snapshot ``state``'s tensors into the staging pool and return; the write and commit go on in
        the background.  A previous asynchronous save is waited for first (its error is raised here)."""
        self.wait()
        t0 = time.perf_counter()
        step_dir = os.path.join(self.directory, layout.step_name(step))
        if self._bg_ranks is None:
            self._bg_ranks = Ranks(self._group, separate=True)
        try:
            tree, leaves = encode(state)
            total = _state_bytes(leaves)
            step_dir = self._prepare(step, metadata)
        except BaseException as exc:
            self._commit(self._bg_ranks, step, step_dir, exc, 0, metadata)
            raise
        pool = self._staging_pool(total)
        handle = AsyncSave(CheckpointInfo(step, step_dir))
        q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        th = threading.Thread(target=self._background, args=(handle, q, pool, step_dir, step, tree, leaves,
                                                              metadata, t0), name=f"llmtier-ckpt-{step}", daemon=True)
        handle._thread = th
        pool.reserve(total)  # once per Checkpointer: later saves reuse the chunks
        # When the pool holds the whole state, the writer starts after the snapshot: the copy then has the
        # memory bandwidth and the CPU to itself, which is what the caller waits for.  Otherwise the
        # writer must free chunks while the snapshot runs.
        overlap = pool.limit < total  # the packer fills chunks back to back: ceil(total / chunk) of them
        if overlap:
            th.start()
        if self._copier is None:
            self._copier = ParallelCopy(self._copy_threads)
        ra = ReadAhead([x.value for x in leaves])
        packer = Packer(pool, q.put, self._copier, ra)
        try:
            for leaf in leaves:
                packer.add(leaf.value)
                q.put(_END)
            packer.finish()
            q.put(_DONE)
        except BaseException:
            packer.finish()
            q.put(_ABORT)
            if not overlap:
                th.start()
            th.join()
            raise
        finally:
            ra.close()
        if not overlap:
            th.start()
        handle.info.stall_seconds = time.perf_counter() - t0
        handle.info.staging_bytes = pool.allocated + 2 * STAGE_BYTES
        self._pending = handle
        return handle

    def reserve(self, state: Any) -> int:
        """Allocate and fault in the staging pool for states like ``state`` (or for ``state`` bytes) now,
        before the training loop, so that the first :meth:`save_async` stalls only for its copy: otherwise
        that first call also faults the pool in (2.6 s for 2 GiB on the development VM, where the kernel
        compacts memory for its huge pages, against 0.15 s for the copy).  Returns the pool's bytes."""
        if isinstance(state, int):
            total = state
        else:
            _, leaves = encode(state)
            total = _state_bytes(leaves)
        if total < 0:
            raise CheckpointError(f"reserve: {total} bytes")
        pool = self._staging_pool(total)
        pool.reserve(total)
        return pool.allocated

    def wait(self) -> CheckpointInfo | None:
        """Wait for the pending asynchronous save, if any; raises its error."""
        pending, self._pending = self._pending, None
        if pending is None or (pending._reported and pending.done()):
            return None
        return pending.wait()

    def _staging_pool(self, total: int) -> StagingPool:
        limit = self.staging_limit if self.staging_limit is not None else max(total, self._chunk)
        if self._pool is None:
            self._pool = StagingPool(limit, self._chunk)
        elif self.staging_limit is None:
            self._pool.grow_limit(limit)
        return self._pool

    def _prepare(self, step: int, metadata: dict[str, Any] | None) -> str:
        if metadata is not None:
            _check_json(metadata, "metadata")
        step_dir = os.path.join(self.directory, layout.step_name(step))
        if self.rank == 0:
            os.makedirs(self.directory, exist_ok=True)
            if self._lock is None:
                self._lock = layout.DirLock(self.directory)
        if os.path.exists(os.path.join(step_dir, layout.MANIFEST)):
            raise CheckpointError(f"checkpoint {step_dir} already exists; choose another step or delete it")
        os.makedirs(step_dir, exist_ok=True)  # its entry in the directory is fsynced at the commit
        return step_dir

    def _writer(self, step_dir: str, step: int, tree: Any) -> StoreWriter:
        meta = {META_KEY: {"tree": tree, "step": step, "rank": self.rank, "world_size": self.world_size}}
        return StoreWriter(os.path.join(step_dir, layout.rank_file(self.rank)), metadata=meta, engine=self.engine,
                           tag=f"ckpt:{layout.step_name(step)}")

    def _write(self, step_dir: str, step: int, tree: Any, leaves: list[Leaf], pieces: Any) -> int:
        with self._writer(step_dir, step, tree) as w:
            for leaf in leaves:
                dt, shape = _spec(leaf.value)
                sink = w.begin(leaf.name, dt, shape)
                for piece in pieces(leaf):
                    sink.write(piece)
                sink.close()
        return os.stat(os.path.join(step_dir, layout.rank_file(self.rank))).st_size

    def _background(self, handle: AsyncSave, q: Any, pool: StagingPool, step_dir: str, step: int, tree: Any,
                    leaves: list[Leaf], metadata: dict[str, Any] | None, t0: float) -> None:
        finished = False

        def pieces(leaf: Leaf) -> Any:
            nonlocal finished
            while True:
                item = q.get()
                if item is _END:
                    return
                if item is _ABORT:
                    finished = True
                    raise CheckpointError(f"the snapshot of checkpoint step {step} failed in the caller")
                if item[0] == "release":
                    pool.release(item[1])
                    continue
                _, buf, a, b = item
                yield buf[a:b]

        err, size = None, 0
        try:
            size = self._write(step_dir, step, tree, leaves, pieces)
            while True:  # the last chunk's release, then _DONE (or _ABORT: the snapshot failed late)
                item = q.get()
                if item is _DONE or item is _ABORT:
                    break
                if type(item) is tuple and item[0] == "release":
                    pool.release(item[1])
            finished = True
        except BaseException as exc:  # noqa: BLE001 - kept for wait()
            err = exc
        while not finished:  # give back every chunk the caller still sends
            item = q.get()
            if item is _DONE or item is _ABORT:
                break
            if type(item) is tuple and item[0] == "release":
                pool.release(item[1])
        try:
            handle.info.deleted = self._commit(self._bg_ranks or self._ranks, step, step_dir, err, size, metadata)
            handle.info.bytes = size
            handle.info.seconds = time.perf_counter() - t0
        except BaseException as exc:  # noqa: BLE001 - kept for wait()
            handle.error = exc

    def _commit(self, ranks: Ranks, step: int, step_dir: str, err: BaseException | None, size: int,
                metadata: dict[str, Any] | None) -> list[int]:
        """Every rank's file is durable -> rank 0 writes the manifest, ``latest`` and applies retention."""
        statuses = ranks.gather((None if err is None else f"{type(err).__name__}: {err}", size))
        failed = [(r, e) for r, (e, _) in enumerate(statuses) if e]
        if failed:  # nothing is committed: every rank removes its shard, rank 0 the directory
            with contextlib.suppress(OSError):
                if err is None:
                    os.unlink(os.path.join(step_dir, layout.rank_file(ranks.rank)))
            if ranks.rank == 0 and not os.path.exists(os.path.join(step_dir, layout.MANIFEST)):
                shutil.rmtree(step_dir, ignore_errors=True)
            ranks.from_rank0(None)  # nobody returns before the directory is gone
            if err is not None:
                raise err
            r, e = failed[0]
            raise CheckpointError(f"checkpoint {step_dir} was not committed: rank {r} failed: {e}")
        result: tuple[str, list[int]] = ("", [])
        mine: BaseException | None = None
        if ranks.rank == 0:
            try:
                files = [{"name": layout.rank_file(r), "bytes": s} for r, (_, s) in enumerate(statuses)]
                fsync_dir(self.directory)  # the step directory's entry, before the manifest inside it
                layout.write_manifest(step_dir, step=step, files=files, world_size=ranks.world, user=metadata)
                layout.write_latest(self.directory, step)
                result = ("", layout.apply_retention(self.directory, self.keep_last, step))
            except BaseException as exc:  # noqa: BLE001 - every rank must learn of it
                mine, result = exc, (f"{type(exc).__name__}: {exc}", [])
        result = ranks.from_rank0(result)
        if mine is not None:
            raise mine
        if result[0]:
            raise CheckpointError(f"checkpoint {step_dir} was not committed: rank 0 failed: {result[0]}")
        return result[1]

    # -- loading --------------------------------------------------------------
    def load(self, step: int | None = None, *, into: Any = None, verify: bool = True) -> Any:
        """Load checkpoint ``step`` (default: the newest complete one) and return the state.

        Without ``step``, incomplete or damaged checkpoints are skipped with a
        :class:`CheckpointWarning` naming them and saying why; when saves
        beside this load retire every step it listed, the directory is listed
        again (up to five times, while the listing changes).  ``into``: a
        state of the same structure whose tensors (CPU, contiguous, same
        dtype and shape) are filled in place, straight from the disk;
        non-tensor values and tensors absent from ``into`` are returned new.
        """
        self.wait()
        skipped: dict[str, str] = {}
        listed: list[int] | None = None
        for _ in range(_LIST_TRIES):  # saves beside this load may commit new steps and retire the ones listed
            candidates = [step] if step is not None else self._ranks.from_rank0(layout.list_steps(self.directory))
            if candidates == listed:
                break
            listed = candidates
            for s in candidates:
                step_dir = os.path.join(self.directory, layout.step_name(s))
                state, err = None, None
                try:
                    state, size = self._load_one(step_dir, into, verify)
                except (LLMTierError, OSError, ValueError, KeyError, TypeError) as exc:
                    err = exc
                problems = [(r, e) for r, e in enumerate(self._ranks.gather(None if err is None else str(err))) if e]
                if not problems:
                    self.loaded = CheckpointInfo(s, step_dir, size)
                    return state
                why = "; ".join(f"rank {r}: {e}" if self.world_size > 1 else e for r, e in problems)
                if step is not None:
                    raise CheckpointError(f"checkpoint {step_dir} cannot be loaded: {why}") from err
                if step_dir not in skipped:
                    warnings.warn(f"skipping checkpoint {step_dir}: {why}", CheckpointWarning, stacklevel=2)
                skipped[step_dir] = why
        detail = (" (skipped: " + " | ".join(f"{d}: {w}" for d, w in skipped.items()) + ")") if skipped else ""
        raise CheckpointError(f"no complete checkpoint in {self.directory}{detail}")

    def _load_one(self, step_dir: str, into: Any, verify: bool) -> tuple[Any, int]:
        man = layout.read_manifest(step_dir)
        if man["world_size"] != self.world_size:
            raise CheckpointError(f"{step_dir} was saved by {man['world_size']} ranks and this job has "
                                  f"{self.world_size}; load it with the same world size, or save with "
                                  "torch.distributed.checkpoint and llmtier.checkpoint.DCPWriter to reshard")
        path = os.path.join(step_dir, layout.rank_file(self.rank))
        with open_store(path, verify=verify, engine=self.engine) as st:
            meta = st.metadata.get(META_KEY)
            if not isinstance(meta, dict) or "tree" not in meta:
                raise CheckpointError(f"{path} is not a checkpoint shard (no {META_KEY!r} metadata)")
            tree = meta["tree"]
            found: list[tuple[dict[str, Any], list[str]]] = []
            decode(tree, lambda leaf, p: found.append((leaf, p)))
            outs: dict[str, Any] = {}
            later: dict[str, Any] = {}
            for leaf, p in found:
                dst = lookup(into, p) if into is not None else None
                if dst is None:
                    continue
                name, info = leaf["tensor"], st.info(leaf["tensor"])
                if not (isinstance(dst, np.ndarray) or _is_torch(dst)) or dtypes.of(dst) != info.dtype \
                        or tuple(dst.shape) != info.shape:
                    raise CheckpointError(f"into{''.join(f'[{x!r}]' for x in p)}: the checkpoint holds "
                                          f"{info.dtype.name}{list(info.shape)}, into has "
                                          f"{getattr(dst, 'dtype', type(dst).__name__)}{list(getattr(dst, 'shape', []))}")
                cpu = isinstance(dst, np.ndarray) or dst.device.type == "cpu"
                if cpu and (dst.flags.c_contiguous if isinstance(dst, np.ndarray) else dst.is_contiguous()):
                    outs[name] = dst.detach() if _is_torch(dst) else dst
                else:
                    later[name] = dst
            fresh = [lf["tensor"] for lf, _ in found if lf["tensor"] not in outs]
            raw = read_tensors(st, [(st.info(n), d) for n, d in outs.items()] + [(st.info(n), None) for n in fresh],
                               verify=verify)
            kinds = {lf["tensor"]: lf["kind"] for lf, _ in found}
            got = {n: typed(raw[n], st.info(n), "torch" if kinds[n] == "torch" else "numpy") for n in fresh}
            for name, dst in later.items():
                src = got[name]
                if isinstance(dst, np.ndarray):
                    dst[...] = src
                else:
                    dst.detach().copy_(src)
                got[name] = dst

            def value(leaf: dict[str, Any], p: list[str]) -> Any:
                name = leaf["tensor"]
                if name in outs:
                    return lookup(into, p)
                return got[name]

            return decode(tree, value), os.stat(path).st_size

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Wait for a pending save (raising its error), then release the lock, pool and engine."""
        try:
            self.wait()
        finally:
            if self._lock is not None:
                self._lock.close()
                self._lock = None
            if self._pool is not None:
                self._pool.close()
            if self._copier is not None:
                self._copier.close()
                self._copier = None
            if self._own_engine:
                self.engine.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save(state: Any, directory: str | os.PathLike[str], step: int, *, keep_last: int | None = None,
         metadata: dict[str, Any] | None = None, engine: Engine | None = None) -> CheckpointInfo:
    """Save ``state`` (nested dicts/lists of tensors and plain data) as checkpoint ``step`` in ``directory``.

    Returns once the checkpoint is durable: data, manifest, ``latest`` and the
    directories fsynced.  On torch.distributed every rank calls it and writes
    its own shard; the checkpoint is committed when every shard is durable.
    """
    with Checkpointer(directory, keep_last=keep_last, engine=engine) as ck:
        return ck.save(state, step, metadata=metadata)


def load(directory: str | os.PathLike[str], step: int | None = None, *, into: Any = None, verify: bool = True,
         engine: Engine | None = None) -> Any:
    """Load checkpoint ``step`` of ``directory`` (default: the newest complete one); see :meth:`Checkpointer.load`."""
    with Checkpointer(directory, engine=engine) as ck:
        return ck.load(step, into=into, verify=verify)


def latest_step(directory: str | os.PathLike[str]) -> int | None:
    """The newest step whose manifest is complete (files present, sizes right; data not read), or ``None``."""
    d = os.fspath(directory)
    for s in layout.list_steps(d):
        try:
            layout.read_manifest(os.path.join(d, layout.step_name(s)))
            return s
        except CheckpointError:
            continue
    return None
