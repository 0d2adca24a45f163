"""The on-disk format (``docs/FORMAT.md``): preamble, index, and their checks.

Everything here is pure: bytes in, validated Python objects out, or a
:class:`~llmtier.errors.FormatError` naming the field that failed.  The
reader checks every bound against the file's real size before it allocates
anything the file asks for.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import google_crc32c as _crc
import numpy as np

from ..errors import FormatError
from .dtypes import DTYPES, DType

MAGIC = b"LLMTSTOR"
VERSION = 1
ALIGN = 4096
PREAMBLE = 4096
MAX_INDEX = 64 << 20  # bytes of index a reader accepts
MAX_NAME = 1024  # bytes of a tensor name
MAX_NDIM = 32
_HEAD = struct.Struct("<8sIIQQII")  # magic, version, flags, index_offset, index_length, index_crc, preamble_crc
SHARD_INDEX = "index.json"
INDEX_FORMAT = "llmtier-store"
SHARDED_FORMAT = "llmtier-sharded-store"


def crc32c(data: Any, value: int = 0) -> int:
    """CRC-32C (Castagnoli) of ``data``, continuing from ``value``; hardware-accelerated."""
    if type(data) is memoryview:  # google_crc32c takes bytes and numpy arrays, not memoryviews
        data = np.frombuffer(data, dtype=np.uint8)
    return _crc.extend(value, data)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies and what it is."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    offset: int  # byte offset in ``file``
    nbytes: int
    crc32c: int | None  # None: the source records no checksum (safetensors)
    tags: dict[str, Any] = field(default_factory=dict)
    file: str = ""  # the file holding the bytes

    @property
    def row_bytes(self) -> int:
        """Bytes per index of the leading dimension (partial reads)."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape), "offset": self.offset,
                "nbytes": self.nbytes, "crc32c": self.crc32c, "tags": self.tags}


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# -- preamble ----------------------------------------------------------------
def pack_preamble(index_offset: int, index: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, 0, index_offset, len(index), crc32c(index), 0)
    body = head[:-4]
    return (body + struct.pack("<I", crc32c(body))).ljust(PREAMBLE, b"\0")


def parse_preamble(raw: bytes, file_size: int, path: str) -> tuple[int, int, int]:
    """Check the preamble; returns ``(index_offset, index_length, index_crc)``."""
    if file_size < PREAMBLE or len(raw) < _HEAD.size:
        raise FormatError(f"file is {file_size} bytes, shorter than the {PREAMBLE}-byte preamble "
                          "(truncated, or not a store)", path=path, field="preamble")
    magic, version, flags, ioff, ilen, icrc, pcrc = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise FormatError(f"bad magic {magic!r}, expected {MAGIC!r} (not an llmtier store, or an "
                          "unfinished write)", path=path, field="magic")
    if pcrc != crc32c(raw[: _HEAD.size - 4]):
        raise FormatError("preamble checksum mismatch (damaged file)", path=path, field="preamble_crc32c")
    if any(raw[_HEAD.size : PREAMBLE]):
        raise FormatError(f"preamble bytes {_HEAD.size}-{PREAMBLE - 1} must be zero (damaged file)", path=path,
                          field="preamble")
    if version != VERSION:
        raise FormatError(f"format version {version}; this llmtier reads version {VERSION}", path=path,
                          field="version")
    if flags:
        raise FormatError(f"unknown flags 0x{flags:x}", path=path, field="flags")
    if ioff % ALIGN or ioff < PREAMBLE:
        raise FormatError(f"index_offset {ioff} is not a multiple of {ALIGN} past the preamble", path=path,
                          field="index_offset")
    if ilen == 0 or ilen > MAX_INDEX:
        raise FormatError(f"index_length {ilen} outside 1..{MAX_INDEX}", path=path, field="index_length")
    if ioff > file_size:
        raise FormatError(f"index_offset {ioff} is past the end of the {file_size}-byte file (truncated?)", path=path,
                          field="index_offset")
    if ilen > file_size - ioff:
        raise FormatError(f"index [{ioff}, {ioff + ilen}) runs past the end of the {file_size}-byte file "
                          "(truncated?)", path=path, field="index_length")
    return ioff, ilen, icrc


# -- index -------------------------------------------------------------------
def pack_index(tensors: list[TensorInfo], metadata: dict[str, Any]) -> bytes:
    doc = {"format": INDEX_FORMAT, "version": VERSION, "metadata": metadata,
           "tensors": [t.to_json() for t in tensors]}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class _DuplicateKey(ValueError):
    """Raised by the JSON decoder hook when one object names a key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return obj


def load_json(raw: bytes, path: str, what: str) -> Any:
    """Parse JSON bytes; any failure (bad UTF-8, syntax, nesting, a key twice in one object) is a FormatError."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise FormatError(f"key {str(exc.args[0])[:80]!r} appears twice in one object (ambiguous)", path=path,
                          field=what) from None
    except UnicodeDecodeError as exc:
        raise FormatError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", path=path, field=what) from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"not valid JSON ({str(exc)[:120]})", path=path, field=what) from None


def parse_index(raw: bytes, index_offset: int, path: str) -> tuple[list[TensorInfo], dict[str, Any]]:
    """Validate the index of a single-file store; tensors in index order."""
    doc = load_json(raw, path, "index")
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise FormatError(f"index is not an {INDEX_FORMAT!r} document", path=path, field="index.format")
    if not _is_int(doc.get("version")) or doc["version"] != VERSION:
        raise FormatError(f"index version {doc.get('version')!r}, expected {VERSION}", path=path,
                          field="index.version")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise FormatError("metadata must be an object", path=path, field="index.metadata")
    entries = doc.get("tensors")
    if not isinstance(entries, list):
        raise FormatError("tensors must be a list", path=path, field="index.tensors")
    tensors = [check_entry(e, i, path, limit=index_offset) for i, e in enumerate(entries)]
    check_unique_and_disjoint(tensors, path)
    return tensors, metadata


_KEYS = {"name", "dtype", "shape", "offset", "nbytes", "crc32c", "tags"}


def check_entry(e: Any, i: int, path: str, *, limit: int) -> TensorInfo:
    """Validate one index entry against the data region ``[PREAMBLE, limit)``."""
    where = f"tensors[{i}]"
    if not isinstance(e, dict) or set(e) != _KEYS:
        raise FormatError(f"entry must be an object with keys {sorted(_KEYS)}", path=path, field=where)
    name = check_name(e["name"], path, f"{where}.name")
    where = f"tensors[{i}] ({name!r})"
    dtype = DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
    if dtype is None:
        raise FormatError(f"unknown dtype {e['dtype']!r}", path=path, field=f"{where}.dtype")
    shape = check_shape(e["shape"], path, f"{where}.shape")
    offset, nbytes, crc = e["offset"], e["nbytes"], e["crc32c"]
    for key, v, hi in (("offset", offset, limit), ("nbytes", nbytes, limit), ("crc32c", crc, 0xFFFFFFFF)):
        if not _is_int(v) or v < 0 or v > hi:
            raise FormatError(f"{key} must be an integer in 0..{hi}, got {v!r}", path=path, field=f"{where}.{key}")
    if math.prod(shape) * dtype.itemsize != nbytes:
        raise FormatError(f"shape {list(shape)} of {dtype.name} is {math.prod(shape) * dtype.itemsize} bytes, "
                          f"but nbytes is {nbytes}", path=path, field=f"{where}.nbytes")
    if offset % ALIGN or offset < PREAMBLE or offset + nbytes > limit:
        raise FormatError(f"extent [{offset}, {offset + nbytes}) must start on a {ALIGN}-byte boundary and lie "
                          f"inside the data region [{PREAMBLE}, {limit})", path=path, field=f"{where}.offset")
    tags = e["tags"]
    if not isinstance(tags, dict) or not all(isinstance(k, str) for k in tags):
        raise FormatError("tags must be an object", path=path, field=f"{where}.tags")
    return TensorInfo(name, dtype, shape, offset, nbytes, crc, tags, path)


def check_name(name: Any, path: str | None, where: str) -> str:
    if not isinstance(name, str) or not name:
        raise FormatError(f"tensor name must be a non-empty string, got {name!r}", path=path, field=where)
    if "\0" in name or "/" in name or "\\" in name:
        raise FormatError(f"tensor name {name!r} contains NUL or a path separator", path=path, field=where)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        raise FormatError(f"tensor name longer than {MAX_NAME} bytes", path=path, field=where)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"tensor name {name!r} is not valid UTF-8", path=path, field=where) from None
    return name


def check_shape(shape: Any, path: str | None, where: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM or not all(
            _is_int(d) and 0 <= d < 1 << 62 for d in shape):
        raise FormatError(f"shape must be a list of at most {MAX_NDIM} non-negative integers, got "
                          f"{str(shape)[:80]}", path=path, field=where)
    return tuple(shape)


def check_unique_and_disjoint(tensors: list[TensorInfo], path: str) -> None:
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise FormatError(f"tensor {t.name!r} appears twice", path=path, field="tensors")
        seen.add(t.name)
    end, prev = 0, None
    for t in sorted((t for t in tensors if t.nbytes), key=lambda t: t.offset):
        if t.offset < end:
            raise FormatError(f"tensor {t.name!r} overlaps {prev!r}", path=path, field="tensors")
        end, prev = t.offset + t.nbytes, t.name


def _is_int(v: Any) -> bool:
    return type(v) is int  # not bool, not float
