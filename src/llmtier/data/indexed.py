"""Megatron-style indexed datasets: a ``.bin`` of token ids and an ``.idx`` that says where each sequence lies.

Written from the format's description (Megatron-Core's ``IndexedDataset``), all
integers little-endian::

    .idx:  magic  b"MMIDIDX\\x00\\x00"                     9 bytes
           version                          uint64   (1)
           dtype code                       uint8    (1 uint8, 2 int8, 3 int16, 4 int32,
                                                      5 int64, 6 float64, 7 float32, 8 uint16)
           sequence count S                 uint64
           document count D                 uint64   (entries of the document index: documents + 1)
           sequence lengths                 int32[S] (tokens)
           sequence pointers                int64[S] (byte offsets into .bin)
           document index                   int64[D] (first sequence of each document, then S)
    .bin:  the sequences' tokens back to back, in the dtype above

The header is validated against the file size before anything is allocated
from it.  The index is small (16 bytes per sequence) and read whole; the
``.bin`` is read through the engine by :class:`~llmtier.data.TokenDataset`.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_HEAD = struct.Struct("<9sQBQQ")


@dataclass(frozen=True)
class IndexedInfo:
    """What an ``.idx`` says: token dtype, per-sequence lengths and byte offsets, document boundaries."""

    dtype: np.dtype
    lengths: np.ndarray  # int32[S], tokens
    pointers: np.ndarray  # int64[S], bytes into .bin
    doc_index: np.ndarray  # int64[D]

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    @property
    def documents(self) -> int:
        return max(0, len(self.doc_index) - 1)


def idx_path(prefix: str | os.PathLike[str]) -> str:
    """``prefix.idx`` for a prefix, a ``.bin`` or an ``.idx`` path."""
    p = os.fspath(prefix)
    return (p[:-4] if p.endswith((".bin", ".idx")) else p) + ".idx"


def bin_path(prefix: str | os.PathLike[str]) -> str:
    p = os.fspath(prefix)
    return (p[:-4] if p.endswith((".bin", ".idx")) else p) + ".bin"


def read_index(path: str | os.PathLike[str]) -> IndexedInfo:
    """Read and validate an ``.idx`` (``path`` may be the prefix, the ``.bin`` or the ``.idx``)."""
    p = idx_path(path)
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        head = f.read(_HEAD.size)
        if len(head) < _HEAD.size:
            raise FormatError(f"{size} bytes is shorter than the {_HEAD.size}-byte header", path=p, field="header")
        magic, version, code, seqs, docs = _HEAD.unpack(head)
        if magic != MAGIC:
            raise FormatError(f"magic {magic!r}, expected {MAGIC!r} (not a Megatron .idx)", path=p, field="magic")
        if version != VERSION:
            raise FormatError(f"version {version}, only {VERSION} is known", path=p, field="version")
        if code not in DTYPE_CODES:
            raise FormatError(f"dtype code {code} is none of {sorted(DTYPE_CODES)}", path=p, field="dtype")
        need = _HEAD.size + seqs * 12 + docs * 8
        if seqs > size or docs > size or size < need:
            raise FormatError(f"{seqs} sequences and {docs} document entries need {need} bytes, the file has {size}",
                              path=p, field="sequence_count")
        lengths = np.frombuffer(f.read(seqs * 4), dtype="<i4").astype(np.int32)
        pointers = np.frombuffer(f.read(seqs * 8), dtype="<i8").astype(np.int64)
        doc_index = np.frombuffer(f.read(docs * 8), dtype="<i8").astype(np.int64)
    dtype = np.dtype(DTYPE_CODES[code])
    if (lengths < 0).any():
        raise FormatError("a sequence length is negative", path=p, field="sequence_lengths")
    if seqs and (pointers[0] != 0 or (pointers[1:] != pointers[:-1] + lengths[:-1].astype(np.int64) * dtype.itemsize).any()):
        raise FormatError("sequence pointers are not the running byte offsets of the lengths", path=p,
                          field="sequence_pointers")
    if len(doc_index) and (doc_index[0] != 0 or doc_index[-1] != seqs or (np.diff(doc_index) < 0).any()):
        raise FormatError("the document index must rise from 0 to the sequence count", path=p, field="document_indices")
    return IndexedInfo(dtype, lengths, pointers, doc_index)


def write_indexed(prefix: str | os.PathLike[str], documents: Iterable[np.ndarray], dtype: type | np.dtype = np.uint16) -> IndexedInfo:
    """Write ``prefix.bin`` and ``prefix.idx`` with one sequence per document (for tests and synthetic data)."""
    dt = np.dtype(dtype)
    codes = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
    if dt not in codes:
        raise ValueError(f"dtype {dt} has no Megatron code; use one of {sorted(str(np.dtype(v)) for v in DTYPE_CODES.values())}")
    lengths: list[int] = []
    with open(bin_path(prefix), "wb") as f:
        for doc in documents:
            arr = np.ascontiguousarray(doc, dtype=dt)
            f.write(arr.tobytes())
            lengths.append(arr.size)
    lens = np.asarray(lengths, dtype=np.int32)
    ptrs = np.zeros(len(lens), dtype=np.int64)
    if len(lens) > 1:
        ptrs[1:] = np.cumsum(lens[:-1].astype(np.int64)) * dt.itemsize
    docs = np.arange(len(lens) + 1, dtype=np.int64)
    with open(idx_path(prefix), "wb") as f:
        f.write(_HEAD.pack(MAGIC, VERSION, codes[dt], len(lens), len(docs)))
        f.write(lens.astype("<i4").tobytes())
        f.write(ptrs.astype("<i8").tobytes())
        f.write(docs.astype("<i8").tobytes())
    return IndexedInfo(dt, lens, ptrs, docs)


__all__ = ["DTYPE_CODES", "MAGIC", "IndexedInfo", "bin_path", "idx_path", "read_index", "write_indexed"]
