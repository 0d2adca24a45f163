"""Read tensors from a store, a sharded store, or safetensors files in place.

Every source is a :class:`TensorSource`: a map of names to
:class:`~llmtier.store.format.TensorInfo` plus the reading machinery, which is
the same for all of them.  Reads go through the engine with direct I/O.  A
tensor is read into fresh page-aligned memory covering its aligned extent
and handed out as a view (no copy); :meth:`TensorSource.get_many` reads
neighbouring tensors in windows, one engine batch per window, and checks the
CRC-32C of window *k* while window *k+1* is already on its way from the disk.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..engine import Engine, File, alloc, open_engine
from ..engine.buffers import as_bytes_view
from ..errors import ChecksumError, FormatError, TensorNotFoundError
from .dtypes import DType, torch_dtype
from .format import ALIGN, MAX_INDEX, PREAMBLE, SHARD_INDEX, SHARDED_FORMAT, TensorInfo, crc32c, load_json, parse_index, parse_preamble

WINDOW_BYTES = 256 << 20  # bytes per get_many read window
_GAP = 1 << 20  # tensors closer than this share a window read


class TensorSource:
    """What every readable collection of tensors offers. Use as a context manager."""

    kind = "weights"  # the tag of window reads, for the tracer

    def __init__(self, path: str, infos: list[TensorInfo], metadata: dict[str, Any], *, verify: bool | str,
                 engine: Engine | None, files: dict[str, File] | None = None, own_engine: bool | None = None) -> None:
        self.path = path
        self.metadata = metadata
        self.verify_default = verify_mode(verify)
        self._verified: set[str] = set()  # tensors whose checksum matched (verify="first")
        self._infos = {t.name: t for t in infos}
        self._own_engine = engine is None if own_engine is None else own_engine
        self.engine = engine or open_engine()
        # The files whose index was read, kept open: a store renamed over the
        # path later never mixes with the index read here.
        self._files: dict[str, File] = dict(files or {})

    # -- mapping-like ---------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __getitem__(self, name: str) -> Any:
        """``store[name]``: the tensor as :meth:`get` returns it (``TensorNotFoundError``, a ``KeyError``, if absent)."""
        return self.get(name)

    def items(self) -> Iterator[tuple[str, Any]]:
        """``(name, tensor)`` pairs, each read when reached."""
        for name in self._infos:
            yield name, self.get(name)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise TensorNotFoundError(f"no tensor {name!r} in {self.path}") from None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._infos.values())

    @property
    def has_checksums(self) -> bool:
        return all(t.crc32c is not None for t in self._infos.values())

    # -- reading --------------------------------------------------------------
    def get(self, name: str, out: Any = None, *, rows: slice | None = None, verify: bool | str | None = None) -> Any:
        """Tensor ``name`` as a numpy array (bf16/fp8 as their raw bits).

        ``out``: a caller-given buffer of exactly the tensor's size (numpy,
        torch CPU tensor, memoryview) filled in place and returned.  ``rows``:
        a slice of the leading dimension, read alone (not checksum-verified:
        the CRC covers the whole tensor).  ``verify``: ``"always"`` (or True),
        ``"first"`` (the first read of each tensor) or ``"never"`` (or False);
        default: the store's.
        """
        info = self.info(name)
        raw = self._get_raw(info, out, rows, verify)
        if out is not None:
            return out
        return self._typed(raw, info, _rows_shape(info, rows) if rows is not None else None)

    def get_torch(self, name: str, out: Any = None, *, rows: slice | None = None, verify: bool | str | None = None,
                  device: Any = None) -> Any:
        """Tensor ``name`` as a torch tensor of its real dtype: on the CPU without a copy, or copied to
        ``device`` (``"cuda:0"`` ...) when given."""
        info = self.info(name)
        if out is not None and device is not None:
            raise ValueError("give out= (a buffer to fill) or device= (where the tensor goes), not both")
        raw = self._get_raw(info, out, rows, verify)
        if out is not None:
            return out
        t = _torch(raw, info, _rows_shape(info, rows) if rows is not None else info.shape)
        return t if device is None else t.to(device)

    def _get_raw(self, info: TensorInfo, out: Any, rows: slice | None, verify: bool | str | None) -> np.ndarray | None:
        verify = self.verify_default if verify is None else verify_mode(verify)
        if rows is not None:
            return self._read_rows(info, rows, out)
        if out is None:
            return self._read_windows([info], verify)[info.name]
        view = as_bytes_view(out, writable=True)
        if view.nbytes != info.nbytes:
            raise ValueError(f"out has {view.nbytes} bytes; tensor {info.name!r} has {info.nbytes}")
        if info.nbytes:
            self.file(info.file).pread(out, info.offset, tag=info.name).result()
        self._maybe_check(info, view, verify)
        return None

    def get_many(self, names: Iterable[str] | None = None, *, out: dict[str, Any] | None = None,
                 torch: bool = False, verify: bool | str | None = None) -> dict[str, Any]:
        """Read many tensors (default: all, or the keys of ``out``) in windowed engine batches.

        Without ``out`` each window of tensors is read into fresh page-aligned
        memory and the tensors are views of it.  ``out`` maps names to
        caller-given buffers (numpy arrays, torch CPU tensors) of exactly the
        tensors' sizes, filled in place and returned: reusing memory that is
        already resident avoids the page faults of fresh memory, which on
        some machines cost more than the read (see docs/BENCHMARKS.md).
        """
        if names is None:
            names = self._infos if out is None else out
        infos = [self.info(n) for n in names]
        verify = self.verify_default if verify is None else verify_mode(verify)
        if out is not None:
            for t in infos:
                if t.name not in out:
                    raise ValueError(f"out has no buffer for tensor {t.name!r}")
                n = as_bytes_view(out[t.name], writable=True).nbytes
                if n != t.nbytes:
                    raise ValueError(f"out[{t.name!r}] has {n} bytes; the tensor has {t.nbytes}")
        raws = self._read_windows(infos, verify, out)
        if out is not None:
            return {t.name: out[t.name] for t in infos}
        if torch:
            return {t.name: _torch(raws[t.name], t, t.shape) for t in infos}
        return {t.name: self._typed(raws[t.name], t) for t in infos}

    def verify(self, names: Iterable[str] | None = None) -> list[str]:
        """Read tensors and check their CRC-32C; return the names that do not match."""
        infos = [self.info(n) for n in (self._infos if names is None else names)]
        bad = []
        for w in _windows(infos):
            raws = self._read_windows(w, "never")
            bad.extend(t.name for t in w if t.crc32c is not None and crc32c(raws[t.name]) != t.crc32c)
        return bad

    # -- internals ------------------------------------------------------------
    def file(self, path: str) -> File:
        """The open engine file behind one of this source's tensors (``info.file``),
        for callers that read tensor extents themselves (the runtimes)."""
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = self.engine.open(path, "r")
        return f

    def _read_windows(self, infos: list[TensorInfo], verify: str,
                      dest: dict[str, Any] | None = None) -> dict[str, Any]:
        """Read ``infos`` window by window: wait for window k, submit k+1,
        then check k's checksums while k+1 is on its way."""
        got: dict[str, Any] = {}
        pending = None
        try:
            for w in _windows(infos):
                if pending is not None:
                    self._wait_window(*pending)
                nxt = self._submit_window(w, dest)
                if pending is not None:
                    done, pending = pending, nxt
                    self._keep_window(done[1], verify, got)
                else:
                    pending = nxt
            if pending is not None:
                done, pending = pending, None
                self._wait_window(*done)
                self._keep_window(done[1], verify, got)
        except BaseException:
            if pending is not None:  # never return while a read still writes into buffers
                with contextlib.suppress(Exception):
                    pending[0].result()
            raise
        return got

    def _submit_window(self, w: list[TensorInfo], dest: dict[str, Any] | None) -> tuple[Any, list, list[int]]:
        f = self.file(w[0].file)
        if dest is not None:
            # Into the caller's buffers: one request per tensor (the engine
            # bounces what O_DIRECT cannot take as it is).
            reqs = [t for t in w if t.nbytes]
            fut = f.pread_many([dest[t.name] for t in reqs], [t.offset for t in reqs], tags=[t.name for t in reqs],
                               exact=False)
            views = [(t, as_bytes_view(dest[t.name], writable=True)) for t in w]
            return fut, views, [t.nbytes for t in reqs]
        start = w[0].offset - w[0].offset % ALIGN
        end = -(-max(t.offset + t.nbytes for t in w) // ALIGN) * ALIGN
        arena = alloc(end - start, huge=True)
        views = [(t, arena[t.offset - start : t.offset - start + t.nbytes]) for t in w]
        if all(t.offset % ALIGN == 0 for t in w):
            # One request per tensor (its padded extent), tagged with its name.
            reqs = [t for t in w if t.nbytes]
            fut = f.pread_many([arena[t.offset - start : -(-(t.offset + t.nbytes) // ALIGN) * ALIGN - start]
                                for t in reqs], [t.offset for t in reqs], tags=[t.name for t in reqs], exact=False)
            need = [t.nbytes for t in reqs]
        else:
            # Unaligned extents (safetensors): one widened read of the window.
            fut = f.pread(arena, start, tag=self.kind, exact=False)
            need = [max(t.offset + t.nbytes for t in w) - start]
        return fut, views, need

    @staticmethod
    def _wait_window(fut: Any, views: list, need: list[int]) -> None:
        got = fut.result()
        if isinstance(got, int):
            got = [got]
        if any(g < n for g, n in zip(got, need)):
            t = views[0][0]
            raise FormatError(f"the file ends before tensor data that its index lists (truncated after it was "
                              f"opened?): {sum(got)} of {sum(need)} bytes read", path=t.file, field="size")

    def _keep_window(self, views: list, verify: str, got: dict[str, Any]) -> None:
        for t, v in views:
            self._maybe_check(t, v, verify)
            got[t.name] = v

    def _maybe_check(self, info: TensorInfo, view: Any, verify: str) -> None:
        if verify == "always" or (verify == "first" and info.name not in self._verified):
            self._check(info, view)
            self._verified.add(info.name)

    def _check(self, info: TensorInfo, view: Any) -> None:
        if info.crc32c is None:
            return
        got = crc32c(view)
        if got != info.crc32c:
            raise ChecksumError(f"tensor {info.name!r}: CRC-32C 0x{got:08x}, index says 0x{info.crc32c:08x} "
                                "(the data on disk is damaged)", path=info.file, field=info.name)

    def _read_rows(self, info: TensorInfo, rows: slice, out: Any) -> np.ndarray:
        if not info.shape:
            raise ValueError(f"tensor {info.name!r} is 0-dimensional; rows= needs a leading dimension")
        a, b, step = rows.indices(info.shape[0])
        if step != 1:
            raise ValueError("rows= must be a contiguous slice (step 1)")
        b = max(a, b)
        off, n = info.offset + a * info.row_bytes, (b - a) * info.row_bytes
        if out is not None:
            view = as_bytes_view(out, writable=True)
            if view.nbytes != n:
                raise ValueError(f"out has {view.nbytes} bytes; rows {a}:{b} of {info.name!r} are {n}")
            if n:
                self.file(info.file).pread(out, off, tag=info.name).result()
            return np.frombuffer(view, dtype=np.uint8)
        start = off - off % ALIGN
        arena = alloc(-(-(off + n) // ALIGN) * ALIGN - start, huge=True)
        if n:
            got = self.file(info.file).pread(arena, start, tag=info.name, exact=False).result()
            if got < off - start + n:
                raise FormatError(f"the file ends inside tensor {info.name!r} (truncated after it was opened?)",
                                  path=info.file, field="size")
        return arena[off - start : off - start + n]

    @staticmethod
    def _typed(raw: np.ndarray, info: TensorInfo, shape: tuple[int, ...] | None = None) -> np.ndarray:
        return raw.view(np.dtype(info.dtype.numpy)).reshape(info.shape if shape is None else shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._own_engine:
            self.engine.close()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}: {len(self)} tensors, {self.nbytes / 2**30:.2f} GiB>"


class Store(TensorSource):
    """A single-file or sharded llmtier store (see ``docs/FORMAT.md``)."""

    format = "llmtier"


class SafetensorsSource(TensorSource):
    """One or more safetensors files read in place (offsets widened to 4 KiB)."""

    format = "safetensors"


def _rows_shape(info: TensorInfo, rows: slice) -> tuple[int, ...]:
    a, b, _ = rows.indices(info.shape[0]) if info.shape else (0, 0, 1)
    return (max(0, b - a), *info.shape[1:])


def _torch(raw: np.ndarray, info: TensorInfo, shape: tuple[int, ...]) -> Any:
    import torch  # noqa: PLC0415 - optional dependency

    if raw.nbytes == 0:
        return torch.empty(shape, dtype=torch_dtype(info.dtype))
    return torch.from_numpy(raw).view(torch_dtype(info.dtype)).reshape(shape)


def _windows(infos: list[TensorInfo]) -> Iterator[list[TensorInfo]]:
    """Group tensors of one file, in file order, into reads of up to WINDOW_BYTES."""
    by_file: dict[str, list[TensorInfo]] = {}
    for t in infos:
        by_file.setdefault(t.file, []).append(t)
    for group in by_file.values():
        group.sort(key=lambda t: t.offset)
        w: list[TensorInfo] = []
        w_start = w_end = 0
        for t in group:
            if w and (t.offset - w_end > _GAP or t.offset + t.nbytes - w_start > WINDOW_BYTES or t.offset < w_end):
                yield w
                w = []
            if not w:
                w_start = t.offset
            w.append(t)
            w_end = max(w_end, t.offset + t.nbytes) if len(w) > 1 else t.offset + t.nbytes
        if w:
            yield w


# -- opening -----------------------------------------------------------------
def verify_mode(verify: bool | str) -> str:
    """The one meaning of ``verify=`` across llmtier: ``"always"`` (True) checks a tensor's CRC-32C
    on every read, ``"first"`` on its first read, ``"never"`` (False) not at all."""
    if verify is True:
        return "always"
    if verify is False:
        return "never"
    if verify in ("always", "first", "never"):
        return str(verify)
    raise ValueError(f"verify must be 'always', 'first', 'never' (or True / False), got {verify!r}")


def open_store(path: str | os.PathLike[str], *, verify: bool | str = True, engine: Engine | None = None) -> TensorSource:
    """Open a store for reading: an ``.lts`` file, a sharded store directory,
    a ``.safetensors`` file, or a Hugging Face model directory (its
    safetensors shards, read in place).

    ``verify`` (default ``True``, i.e. ``"always"``) checks each tensor's CRC-32C as it is read;
    ``"first"`` only the first time, ``"never"`` (False) not (see :func:`verify_mode`).
    Every structural problem raises :class:`~llmtier.errors.FormatError`.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        if os.path.exists(os.path.join(p, SHARD_INDEX)):
            return _open_sharded(p, verify, engine)
        from .safetensors import open_hf_dir  # noqa: PLC0415 - avoids an import cycle

        return open_hf_dir(p, verify=verify, engine=engine)
    with open(p, "rb") as f:
        head = f.read(8)
    if head == b"LLMTSTOR" or not p.endswith(".safetensors"):
        return open_parsed(Store, p, [p], read_index, verify, engine)
    from .safetensors import open_safetensors  # noqa: PLC0415

    return open_safetensors(p, verify=verify, engine=engine)


def open_parsed(cls: type[TensorSource], path: str, files: list[str], parse: Any, verify: bool | str,
                engine: Engine | None, meta: dict[str, Any] | None = None, check: Any = None) -> Any:
    """Open ``files`` through the engine, parse each one's index from the open
    descriptor (``parse(path, fd) -> (infos, meta)``) and build ``cls``; on any
    failure close what was opened."""
    eng = engine or open_engine()
    opened: dict[str, File] = {}
    try:
        infos: list[TensorInfo] = []
        for fp in files:
            opened[fp] = eng.open(fp, "r")
            got, m = parse(fp, opened[fp]._fd)
            infos.extend(got)
            if meta is None:
                meta = m
        if check is not None:
            check(infos)
        return cls(path, infos, meta or {}, verify=verify, engine=eng, files=opened, own_engine=engine is None)
    except BaseException:
        for f in opened.values():
            f.close()
        if engine is None:
            eng.close()
        raise


def read_index(path: str, fd: int | None = None) -> tuple[list[TensorInfo], dict[str, Any]]:
    """Validate a single-file store's preamble and index (reads at most the
    index), through ``fd`` if given (an open descriptor of ``path``)."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        raw = os.pread(fd, PREAMBLE, 0)
        ioff, ilen, icrc = parse_preamble(raw, size, path)
        index = os.pread(fd, ilen, ioff)
    finally:
        if own:
            os.close(fd)
    if len(index) != ilen:
        raise FormatError("index shorter than recorded (file changed while reading?)", path=path, field="index")
    if crc32c(index) != icrc:
        raise FormatError("index checksum mismatch (damaged file)", path=path, field="index_crc32c")
    return parse_index(index, ioff, path)


def _open_sharded(path: str, verify: bool | str, engine: Engine | None) -> Store:
    index_path = os.path.join(path, SHARD_INDEX)
    size = os.path.getsize(index_path)
    if size > MAX_INDEX:
        raise FormatError(f"index.json is {size} bytes (limit {MAX_INDEX})", path=index_path, field="size")
    with open(index_path, "rb") as f:
        doc = load_json(f.read(MAX_INDEX + 1), index_path, "index")
    if not isinstance(doc, dict) or doc.get("format") != SHARDED_FORMAT or type(doc.get("version")) is not int \
            or doc["version"] != 1:
        raise FormatError(f"not an {SHARDED_FORMAT!r} version 1 index", path=index_path, field="format")
    shards, mapping, meta = doc.get("shards"), doc.get("tensors"), doc.get("metadata", {})
    if not isinstance(shards, list) or not isinstance(mapping, dict) or not isinstance(meta, dict):
        raise FormatError("shards must be a list, tensors and metadata objects", path=index_path, field="shards")
    paths = []
    for i, name in enumerate(shards):
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise FormatError(f"bad shard file name {name!r}", path=index_path, field=f"shards[{i}]")
        shard_path = os.path.join(path, name)
        if not os.path.isfile(shard_path):
            raise FormatError(f"shard {name} is missing", path=index_path, field=f"shards[{i}]")
        paths.append(shard_path)
    number = {p: i for i, p in enumerate(paths)}

    def check(infos: list[TensorInfo]) -> None:
        for t in infos:
            if mapping.get(t.name) != number[t.file]:
                raise FormatError(f"tensor {t.name!r} is in shard {number[t.file]} but the index maps it to "
                                  f"{mapping.get(t.name)!r}", path=index_path, field="tensors")
        if len(infos) != len(mapping) or len({t.name for t in infos}) != len(infos):
            raise FormatError("the index's tensor map does not match the shards' contents", path=index_path,
                              field="tensors")

    return open_parsed(Store, path, paths, read_index, verify, engine, meta=meta, check=check)


__all__ = ["DType", "SafetensorsSource", "Store", "TensorSource", "open_store", "read_index"]
