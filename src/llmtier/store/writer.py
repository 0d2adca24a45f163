"""Write a store: stream tensors in, commit atomically.

A single-file store is written to a hidden temporary name beside the target
(``.NAME.tmp-PID-TOKEN``): a zero preamble, each tensor at the next 4 KiB
boundary, the index, ``fsync``, then the real preamble, ``fsync``, ``rename``
onto the target and ``fsync`` of the directory.  A reader therefore sees the
old store or the new one, never a mix, and a writer killed at any moment
leaves only a temporary file whose preamble is zero (never valid) or
complete.  Temporary files of dead writers are removed by the next writer of
the same target.

A sharded store (a directory) writes each shard the same way under a new
generation name, then replaces ``index.json`` atomically, then deletes the
previous generation's shards.

Bytes reach the disk through the engine with direct I/O: tensors are copied
into two page-aligned staging buffers (the CRC-32C is computed during the
copy), and one buffer is written while the other fills.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..engine import Engine, alloc, open_engine
from ..engine.buffers import as_bytes_view
from ..errors import DiskFullError, FormatError, LLMTierError
from . import dtypes
from .dtypes import DType
from .format import (
    ALIGN,
    PREAMBLE,
    SHARD_INDEX,
    SHARDED_FORMAT,
    TensorInfo,
    align_up,
    check_name,
    check_shape,
    crc32c,
    pack_index,
    pack_preamble,
)

STAGE_BYTES = 64 << 20  # per staging buffer (two of them)


class _Stream:
    """Append-only direct-I/O writer with two staging buffers."""

    def __init__(self, engine: Engine, path: str, stage_bytes: int, tag: Any = None) -> None:
        self.file = engine.open(path, "w")
        self.path = path
        self.tag = tag
        self.stages = [alloc(stage_bytes, huge=True), alloc(stage_bytes, huge=True)]
        self.pending: list[Any] = [None, None]
        self.cur = 0
        self.stage_off = PREAMBLE  # file offset of the current stage's first byte
        self.fill = 0

    @property
    def pos(self) -> int:
        return self.stage_off + self.fill

    def write(self, data: memoryview) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        stage = self.stages[self.cur]
        done = 0
        while done < src.nbytes:
            n = min(src.nbytes - done, stage.nbytes - self.fill)
            stage[self.fill : self.fill + n] = src[done : done + n]
            self.fill += n
            done += n
            if self.fill == stage.nbytes:
                self._flush()
                stage = self.stages[self.cur]

    def pad(self) -> None:
        """Zero-fill up to the next 4 KiB boundary."""
        end = align_up(self.fill)
        self.stages[self.cur][self.fill : end] = 0
        self.fill = end
        if self.fill == self.stages[self.cur].nbytes:
            self._flush()

    def _flush(self) -> None:
        if self.fill:
            self.pending[self.cur] = self.file.pwrite(self.stages[self.cur][: self.fill], self.stage_off, tag=self.tag)
        self.stage_off += self.fill
        self.fill = 0
        self.cur ^= 1
        if self.pending[self.cur] is not None:  # the buffer we switch to must be written out
            fut, self.pending[self.cur] = self.pending[self.cur], None
            # Wait without lending this thread to the engine: ``fut.result()`` would run the write just
            # submitted (still queued while a worker finishes this one) here, inline, and the next stage
            # would not fill while it is on its way: copy and write would take turns instead of overlapping.
            concurrent.futures.wait([fut])
            fut.result()

    def drain(self) -> None:
        self.pad()
        self._flush()
        for i, fut in enumerate(self.pending):
            if fut is not None:
                self.pending[i] = None
                fut.result()

    def close(self) -> None:
        for i, fut in enumerate(self.pending):
            if fut is not None:
                self.pending[i] = None
                with contextlib.suppress(Exception):
                    fut.result()
        self.file.close()


class _FileWriter:
    """One single-file store being written to a temporary name."""

    def __init__(self, engine: Engine, target: str, stage_bytes: int, tag: Any = None) -> None:
        self.target = target
        self.tmp = _temp_name(target)
        self.stream = _Stream(engine, self.tmp, stage_bytes, tag)
        self.tensors: list[TensorInfo] = []
        self.names: set[str] = set()

    @property
    def data_bytes(self) -> int:
        return self.stream.pos - PREAMBLE

    def commit(self, metadata: dict[str, Any]) -> None:
        s = self.stream
        s.pad()
        index_offset = s.pos
        index = pack_index(self.tensors, metadata)
        s.write(memoryview(index))
        s.drain()
        s.file.sync()
        head = alloc(PREAMBLE)
        head[:] = np.frombuffer(pack_preamble(index_offset, index), dtype=np.uint8)
        s.file.pwrite(head, 0, tag=s.tag).result()  # the store becomes valid only now
        s.file.sync()
        s.close()
        os.rename(self.tmp, self.target)
        fsync_dir(os.path.dirname(self.target) or ".")

    def abort(self) -> None:
        self.stream.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


class TensorSink:
    """Receives one tensor's bytes in order (see :meth:`StoreWriter.begin`)."""

    def __init__(self, writer: StoreWriter, fw: _FileWriter, name: str, dtype: DType, shape: tuple[int, ...],
                 tags: dict[str, Any]) -> None:
        self._writer = writer
        self._fw = fw
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.tags = tags
        self.nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize if shape else dtype.itemsize
        self.offset = fw.stream.pos
        self.written = 0
        self.crc = 0
        self.closed = False

    def write(self, chunk: Any) -> None:
        """Append the next bytes (any buffer: numpy, torch CPU tensor, bytes)."""
        view = as_bytes_view(chunk, writable=False)
        if self.written + view.nbytes > self.nbytes:
            self._writer._broken(ValueError(f"tensor {self.name!r}: got more than its {self.nbytes} bytes"))
        try:
            self._fw.stream.write(view)
        except BaseException as exc:  # noqa: BLE001 - aborts, then re-raises
            self._writer._broken(exc)
        self.crc = crc32c(view, self.crc)
        self.written += view.nbytes

    def close(self) -> TensorInfo:
        if self.closed:
            raise LLMTierError(f"tensor {self.name!r} already closed")
        if self.written != self.nbytes:
            self._writer._broken(ValueError(f"tensor {self.name!r}: got {self.written} of its {self.nbytes} bytes"))
        self.closed = True
        info = TensorInfo(self.name, self.dtype, self.shape, self.offset, self.nbytes, self.crc, self.tags,
                          self._fw.target)
        self._fw.tensors.append(info)
        self._fw.stream.pad()
        self._writer._sink = None
        return info


class StoreWriter:
    """Stream tensors into a new store at ``path``; commit on :meth:`close`.

    ``max_shard_bytes`` set: ``path`` is a directory of shards, a new shard
    starting once a shard would grow past it at a decoder-layer boundary
    (tag ``layer``); a layer is never split.  Otherwise ``path`` is one file.

    >>> with StoreWriter("model.lts") as w:       # doctest: +SKIP
    ...     w.add("embed.weight", tensor, tags={"kind": "embed"})

    ``tag``: the engine tag of every write (what a trace attributes the bytes to; a staging buffer
    holds several tensors, so the tag names the store, e.g. ``"ckpt:step-000000100"``).

    Leaving the ``with`` block normally commits; an exception aborts, leaving
    any previous store at ``path`` untouched.  A full disk raises
    :class:`~llmtier.errors.DiskFullError` after removing the temporary files.
    """

    def __init__(self, path: str | os.PathLike[str], *, metadata: dict[str, Any] | None = None,
                 max_shard_bytes: int | None = None, engine: Engine | None = None,
                 stage_bytes: int = STAGE_BYTES, tag: Any = None) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.tag = tag
        self.metadata = dict(metadata or {})
        _check_json(self.metadata, "metadata")
        self.sharded = max_shard_bytes is not None
        if self.sharded and max_shard_bytes <= 0:  # type: ignore[operator]
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.max_shard_bytes = max_shard_bytes
        self.stage_bytes = max(ALIGN, align_up(stage_bytes))
        self._own_engine = engine is None
        self.engine = engine or open_engine()
        self._names: set[str] = set()
        self._shards: list[_FileWriter] = []
        self._sink: TensorSink | None = None
        self._state = "open"
        self._last_layer: Any = None
        self.generation = secrets.token_hex(4)
        self._lock_fd: int | None = None
        try:
            self._prepare_target()
            self._shard = self._new_shard()
        except BaseException:
            self._release_engine()
            raise

    # -- public ---------------------------------------------------------------
    def add(self, name: str, tensor: Any, *, tags: dict[str, Any] | None = None) -> TensorInfo:
        """Write a whole numpy array or torch tensor (any dtype torch has)."""
        dt, shape, view = _tensor_bytes(tensor)
        sink = self.begin(name, dt, shape, tags=tags)
        sink.write(view)
        return sink.close()

    def begin(self, name: str, dtype: str | DType, shape: Iterable[int], *,
              tags: dict[str, Any] | None = None) -> TensorSink:
        """Start a tensor whose bytes arrive in pieces through ``sink.write``."""
        self._check_open()
        if self._sink is not None:
            raise LLMTierError(f"tensor {self._sink.name!r} is still being written; close it first")
        check_name(name, None, "name")
        if name in self._names:
            raise ValueError(f"tensor {name!r} was already added")
        dt = dtype if isinstance(dtype, DType) else dtypes.lookup(dtype)
        shape_t = check_shape(list(shape), None, "shape")
        tags = dict(tags or {})
        _check_json(tags, f"tags of {name!r}")
        nbytes = int(np.prod(shape_t, dtype=object)) * dt.itemsize if shape_t else dt.itemsize
        if self.sharded and self._shard.tensors and self._shard.data_bytes + nbytes > self.max_shard_bytes:  # type: ignore[operator]
            layer = tags.get("layer")
            if layer is None or layer != self._last_layer:
                try:
                    self._close_shard()
                    self._shard = self._new_shard()
                except BaseException as exc:  # noqa: BLE001 - aborts, then re-raises
                    self._broken(exc)
        self._last_layer = tags.get("layer")
        self._names.add(name)
        self._sink = TensorSink(self, self._shard, name, dt, shape_t, tags)
        return self._sink

    def close(self) -> None:
        """Commit: after this returns the new store is durable at ``path``."""
        if self._state != "open":
            return
        try:
            if self._sink is not None:
                raise LLMTierError(f"tensor {self._sink.name!r} was begun but not closed")
            if self.sharded:
                self._close_shard()
                self._commit_directory()
            else:
                self._shard.commit(self.metadata)
            self._state = "committed"
        except BaseException as exc:  # noqa: BLE001 - aborts, then re-raises
            self.abort()
            _reraise(exc, self.path)
        finally:
            self._release_engine()

    commit = close

    def abort(self) -> None:
        """Drop everything written so far; any previous store is left as it was."""
        if self._state == "committed":
            return
        self._state = "aborted"
        self._shard.abort()
        for fw in self._shards:  # committed shards of a generation never indexed
            with contextlib.suppress(OSError):
                os.unlink(fw.target)
        self._release_engine()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- internals ------------------------------------------------------------
    def _check_open(self) -> None:
        if self._state != "open":
            raise LLMTierError(f"store writer for {self.path} is {self._state}")

    def _broken(self, exc: BaseException) -> None:
        self.abort()
        _reraise(exc, self.path)

    def _release_engine(self) -> None:
        if self._own_engine:
            self.engine.close()
        if self._lock_fd is not None:  # the sharded store's directory lock
            os.close(self._lock_fd)
            self._lock_fd = None

    def _prepare_target(self) -> None:
        parent = os.path.dirname(self.path)
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"directory {parent} does not exist")
        if not self.sharded:
            if os.path.isdir(self.path):
                raise IsADirectoryError(f"{self.path} is a directory; pass max_shard_bytes to write a sharded store")
            _remove_stale_temps(parent, os.path.basename(self.path))
            return
        if os.path.exists(self.path):
            if not os.path.isdir(self.path):
                raise NotADirectoryError(f"{self.path} exists and is not a directory")
            foreign = [e for e in os.listdir(self.path) if not _TEMP.match(e) and e not in _shard_files(self.path)]
            if foreign and not _is_sharded_store(self.path):
                raise FileExistsError(f"{self.path} is a non-empty directory that is not an llmtier store; "
                                      "refusing to write into it")
        else:
            os.mkdir(self.path)
        self._lock_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise LLMTierError(f"another process is writing the sharded store {self.path}; try again when it "
                               "has finished") from None
        _remove_stale_temps(self.path, None)

    def _new_shard(self) -> _FileWriter:
        if self.sharded:
            target = os.path.join(self.path, f"shard-{self.generation}-{len(self._shards):05d}.lts")
        else:
            target = self.path
        return _FileWriter(self.engine, target, self.stage_bytes, self.tag)

    def _close_shard(self) -> None:
        self._shard.commit({})
        self._shards.append(self._shard)

    def _commit_directory(self) -> None:
        old = _shard_files(self.path)
        names = [os.path.basename(fw.target) for fw in self._shards]
        doc = {"format": SHARDED_FORMAT, "version": 1, "metadata": self.metadata, "shards": names,
               "tensors": {t.name: i for i, fw in enumerate(self._shards) for t in fw.tensors}}
        target = os.path.join(self.path, SHARD_INDEX)
        tmp = _temp_name(target)
        try:
            with open(tmp, "wb") as f:
                f.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # From here the new generation is the store: nothing may delete it.
        self._shards = []
        self._state = "committed"
        fsync_dir(self.path)
        # Under the directory lock no other writer is running: every shard
        # not in the new index is the previous generation or a dead writer's.
        for name in old - set(names):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.path, name))


def write_store(path: str | os.PathLike[str], tensors: dict[str, Any], *,
                tags: dict[str, dict[str, Any]] | None = None, **kwargs: Any) -> None:
    """Write ``{name: tensor}`` as a store in one call (see :class:`StoreWriter`)."""
    with StoreWriter(path, **kwargs) as w:
        for name, t in tensors.items():
            w.add(name, t, tags=(tags or {}).get(name))


# -- helpers -----------------------------------------------------------------
def _tensor_bytes(tensor: Any) -> tuple[DType, tuple[int, ...], memoryview]:
    if isinstance(tensor, np.generic):  # a numpy scalar such as np.float64(2.5)
        tensor = np.asarray(tensor)
    dt = dtypes.of(tensor)
    if isinstance(tensor, np.ndarray):
        arr = tensor if tensor.flags.c_contiguous else np.ascontiguousarray(tensor)  # (keeps 0-d arrays 0-d)
        if not arr.dtype.isnative:  # the format is little-endian (this machine's order)
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return dt, tuple(tensor.shape), memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return dt, tuple(t.shape), as_bytes_view(t, writable=False)


def _check_json(obj: Any, what: str) -> None:
    try:
        json.dumps(obj, allow_nan=False, ensure_ascii=False).encode("utf-8")  # as the index will be written
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from None


def _temp_name(target: str) -> str:
    d, base = os.path.split(target)
    return os.path.join(d, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


_TEMP = re.compile(r"^\.(?P<base>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def _remove_stale_temps(directory: str, base: str | None) -> None:
    """Delete temporary files left by writers that are no longer running."""
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            m = _TEMP.match(entry)
            if m and (base is None or m["base"] == base) and not _alive(int(m["pid"])):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, entry))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_sharded_store(path: str) -> bool:
    try:
        with open(os.path.join(path, SHARD_INDEX), "rb") as f:
            head = f.read(64 << 20)
    except OSError:
        return False
    try:
        doc = json.loads(head)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("format") == SHARDED_FORMAT


def _shard_files(path: str) -> set[str]:
    return {e for e in os.listdir(path) if e.startswith("shard-") and e.endswith(".lts")}


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reraise(exc: BaseException, path: str) -> None:
    """Raise ``exc``; a full disk becomes one clear DiskFullError naming the store."""
    new = _translate(exc, path)
    if new is exc:
        raise exc
    raise new from exc


def _translate(exc: BaseException, path: str) -> BaseException:
    if isinstance(exc, DiskFullError):
        return DiskFullError(f"no space left while writing store {path}; the partial files were removed and any "
                             "previous store is intact", path=exc.path, offset=exc.offset, size=exc.size,
                             errno=exc.errno)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left while writing store {path}; the partial files were removed and any "
                             "previous store is intact", path=path, errno=exc.errno)
    return exc


__all__ = ["FormatError", "StoreWriter", "TensorSink", "write_store"]
