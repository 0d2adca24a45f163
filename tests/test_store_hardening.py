"""Hardening of the tensor store against damaged and hostile files, killed writers and full disks.

Four families, all on real files under ``tmp_path`` (no mocked disks, no
timing assertions):

1. The two header parsers (our preamble + JSON index, and safetensors
   headers) fed random bytes, truncations, byte flips and hand-crafted
   hostile headers whose checksums are *correct*: every one must end in a
   :class:`FormatError` naming the file and the field, and a failing open
   must not allocate more than the file's size (plus a small constant).
2. A writer process killed with SIGKILL at seeded random moments while it
   replaces an existing store: the store then holds exactly the old or
   exactly the new content, leftover temporary files never open with wrong
   data, and the next writer removes them.
3. A full disk (a small loop-mounted ext4 or a tmpfs): DiskFullError, no
   temporary files left, the previous store intact.
4. What the user sees: messages name the file and the field.
"""
from __future__ import annotations

import errno
import importlib.util
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmtier.errors import ChecksumError, DiskFullError, FormatError, LLMTierError
from llmtier.store import StoreWriter, open_store, read_index, write_store
from llmtier.store.dtypes import DTYPES, FROM_SAFETENSORS
from llmtier.store.format import (
    MAGIC,
    MAX_INDEX,
    PREAMBLE,
    align_up,
    crc32c,
    pack_preamble,
)
from llmtier.store.safetensors import MAX_HEADER, read_header

# A failing open may allocate the file's size plus this much.  It covers what
# any open costs whatever the file claims: the 4 KiB preamble buffer (read
# even from a 10-byte file), the buffer of the ``open()`` that sniffs the
# magic, the exception, its traceback and message, and the JSON decoder's
# scratch for a small index.  Measured peaks for the small hostile files here
# are at most ~22 KiB in all; every enormous claim tested is >= 4 GiB, so a
# parser that trusted one would overshoot by five orders of magnitude.
ALLOC_SLACK = 64 << 10

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- building files by hand ---------------------------------------------------
def raw_preamble(index_offset: int, index_length: int, index_crc: int, *, magic: bytes = MAGIC, version: int = 1,
                 flags: int = 0, preamble_crc: int | None = None, reserved: bytes = b"") -> bytes:
    """A preamble with any field values (u64 fields may hold anything pack_preamble would refuse)."""
    body = struct.pack("<8sIIQQI", magic, version, flags, index_offset, index_length, index_crc)
    pcrc = crc32c(body) if preamble_crc is None else preamble_crc
    return (body + struct.pack("<I", pcrc) + reserved).ljust(PREAMBLE, b"\0")


def index_bytes(doc: Any) -> bytes:
    """JSON text of ``doc`` (non-ASCII escaped, so lone surrogates survive as ``\\ud800``-style escapes)."""
    return doc if isinstance(doc, bytes) else json.dumps(doc).encode()


def store_bytes(doc: Any, data: bytes = b"", **preamble: Any) -> bytes:
    """A single-file store: preamble, ``data`` from offset 4096, then the index of ``doc``.

    The preamble is right for the bytes (both CRCs correct) unless a field is
    overridden through ``preamble`` (``index_offset``, ``index_length``,
    ``index_crc``, ``magic``, ``version``, ``flags``, ``preamble_crc``,
    ``reserved``); overridden fields keep a correct preamble CRC unless
    ``preamble_crc`` is given too.
    """
    index = index_bytes(doc)
    region = data.ljust(align_up(len(data)), b"\0")
    ioff = PREAMBLE + len(region)
    if preamble:
        fields = {"index_offset": ioff, "index_length": len(index), "index_crc": crc32c(index), **preamble}
        head = raw_preamble(fields.pop("index_offset"), fields.pop("index_length"), fields.pop("index_crc"), **fields)
    else:
        head = pack_preamble(ioff, index)
    body = head + region + index
    return body.ljust(align_up(len(body)), b"\0")


def st_bytes(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: u64 header length, header JSON, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


A = np.arange(32, dtype=np.float32).reshape(4, 8)  # 128 bytes at 4096
B = np.array([1, -2, 3], dtype=np.int64)  # 24 bytes at 8192
DATA = A.tobytes().ljust(4096, b"\0") + B.tobytes()  # the data region: two pages
IOFF = PREAMBLE + 2 * 4096  # where store_bytes puts the index of DATA


def entry(name: str, arr: np.ndarray, offset: int, /, **over: Any) -> dict[str, Any]:
    e = {"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes,
         "crc32c": crc32c(arr.tobytes()), "tags": {}}
    e.update(over)
    return e


def base_doc(**over: Any) -> dict[str, Any]:
    doc = {"format": "llmtier-store", "version": 1, "metadata": {"source": "test"},
           "tensors": [entry("a", A, 4096), entry("b", B, 8192)]}
    doc.update(over)
    return doc


def with_a(**over: Any) -> dict[str, Any]:
    """The base document with fields of tensor ``a`` replaced."""
    return base_doc(tensors=[entry("a", A, 4096, **over), entry("b", B, 8192)])


def without_key(key: str) -> dict[str, Any]:
    e = entry("a", A, 4096)
    del e[key]
    return base_doc(tensors=[e, entry("b", B, 8192)])


ST_A = np.arange(6, dtype=np.float32).reshape(2, 3)  # data_offsets [0, 24]
ST_B = np.array([7, 8, 9, 10, 11], dtype=np.int16)  # data_offsets [24, 34]
ST_DATA = ST_A.tobytes() + ST_B.tobytes()


def st_header(**over_a: Any) -> dict[str, Any]:
    a = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    a.update(over_a)
    return {"__metadata__": {"format": "pt"}, "a": a, "b": {"dtype": "I16", "shape": [5], "data_offsets": [24, 34]}}


# -- checking -----------------------------------------------------------------
def write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def open_fails(path: Path, field: str | None = None) -> FormatError:
    """``open_store(path)`` must raise FormatError (and nothing else); returns it.

    ``field``: a regular expression the error's ``field`` must match in full.
    """
    with pytest.raises(FormatError) as ei:
        src = open_store(path)
        src.close()
    err = ei.value
    assert err.path is not None and str(err.path) in str(err), f"the message must name the file: {err}"
    if field is not None:
        assert err.field is not None and re.fullmatch(field, err.field), f"field {err.field!r} !~ {field!r}: {err}"
        assert err.field in str(err)
    return err


def peak_alloc(fn: Callable[[], Any]) -> tuple[int, BaseException | None]:
    """Peak bytes Python (and numpy) allocate while ``fn`` runs; the exception it raised."""
    tracemalloc.start()
    try:
        fn()
        exc = None
    except Exception as e:  # noqa: BLE001 - handed to the caller
        exc = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, exc


def open_and_close(path: Path) -> None:
    open_store(path).close()


def assert_bounded_failure(path: Path) -> int:
    """A failing open allocates at most the file's size + ALLOC_SLACK; returns the peak."""
    peak_alloc(lambda: open_and_close(path))  # warm caches (struct, re, first-use imports)
    peak, exc = peak_alloc(lambda: open_and_close(path))
    assert isinstance(exc, FormatError), f"expected FormatError, got {exc!r}"
    size = path.stat().st_size
    assert peak <= size + ALLOC_SLACK, f"failing open of a {size}-byte file allocated {peak} bytes"
    return peak


def check_consistent(src: Any, path: Path, *, llmtier: bool) -> None:
    """What a parse that succeeded promises: every tensor lies inside the file, is
    what its dtype and shape say, does not overlap another, and reads back as the
    file's bytes (or, for our stores, raises ChecksumError)."""
    size = path.stat().st_size
    raw = path.read_bytes()
    infos = src.infos()
    assert len({t.name for t in infos}) == len(infos)
    for t in infos:
        assert isinstance(t.name, str) and t.name and "\0" not in t.name
        t.name.encode("utf-8")  # valid Unicode
        assert t.dtype.name in DTYPES
        assert all(type(d) is int and d >= 0 for d in t.shape)
        assert t.nbytes == math.prod(t.shape) * t.dtype.itemsize
        assert 0 <= t.offset and t.offset + t.nbytes <= size
        if llmtier:
            assert "/" not in t.name and "\\" not in t.name
            assert t.offset % 4096 == 0 and t.offset >= PREAMBLE
    live = sorted((t for t in infos if t.nbytes), key=lambda t: t.offset)
    for x, y in itertools.pairwise(live):
        assert x.offset + x.nbytes <= y.offset
    got = src.get_many(verify=False)
    for t in infos:
        assert got[t.name].shape == t.shape
        assert np.ascontiguousarray(got[t.name]).tobytes() == raw[t.offset : t.offset + t.nbytes]
    bad = src.verify()
    for t in infos:
        if t.name in bad:
            with pytest.raises(ChecksumError):
                src.get(t.name)
        else:
            src.get(t.name)


def open_fails_or_consistent(path: Path, *, llmtier: bool) -> None:
    """Either a FormatError within the allocation bound, or a parse that keeps its promises."""
    peak, exc = peak_alloc(lambda: (read_index(str(path)) if llmtier else read_header(str(path))))
    if exc is not None:
        assert isinstance(exc, FormatError), f"{type(exc).__name__}: {exc}"
        assert peak <= path.stat().st_size + ALLOC_SLACK
        assert exc.path == str(path) and exc.field
        open_fails(path)
        return
    with open_store(path) as src:
        check_consistent(src, path, llmtier=llmtier)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# -- the helpers themselves ---------------------------------------------------
def test_hand_built_files_are_valid(tmp_path: Path) -> None:
    """The builders produce files the parsers accept, so each hostile case differs by one field only."""
    idx = index_bytes(base_doc())
    assert raw_preamble(IOFF, len(idx), crc32c(idx)) == pack_preamble(IOFF, idx)
    p = write(tmp_path / "ok.lts", store_bytes(base_doc(), DATA))
    with open_store(p) as s:
        assert s.keys() == ["a", "b"]
        assert np.array_equal(s.get("a"), A) and np.array_equal(s.get("b"), B)
        assert s.verify() == []
    # An overridden-but-equal field still gives a valid file (own packer == pack_preamble).
    assert store_bytes(base_doc(), DATA, flags=0) == store_bytes(base_doc(), DATA)
    q = write(tmp_path / "ok.safetensors", st_bytes(st_header(), ST_DATA))
    with open_store(q) as s:
        assert np.array_equal(s.get("a"), ST_A) and np.array_equal(s.get("b"), ST_B)
        assert s.metadata == {"safetensors": {"format": "pt"}}


# -- 1a. random bytes -----------------------------------------------------------
@FUZZ
@given(st.one_of(st.binary(max_size=9000), st.binary(max_size=9000).map(lambda b: MAGIC + b)))
def test_random_bytes_are_not_a_store(fuzz_dir: Path, blob: bytes) -> None:
    path = write(fuzz_dir / "random.lts", blob)
    peak, exc = peak_alloc(lambda: read_index(str(path)))
    assert isinstance(exc, FormatError), repr(exc)
    assert peak <= len(blob) + ALLOC_SLACK
    open_fails(path)


@FUZZ
@given(st.binary(min_size=1, max_size=6000))
def test_random_index_under_a_valid_preamble(fuzz_dir: Path, index: bytes) -> None:
    """Both CRCs right, so the random bytes reach the JSON parser and the schema checks."""
    path = write(fuzz_dir / "random-index.lts", store_bytes(index, DATA))
    peak, exc = peak_alloc(lambda: read_index(str(path)))
    assert isinstance(exc, FormatError), repr(exc)
    assert exc.field is not None and exc.field.startswith(("index", "tensors"))
    assert peak <= path.stat().st_size + ALLOC_SLACK


@FUZZ
@given(st.one_of(
    st.binary(max_size=4000),
    # a plausible length followed by random bytes, so the JSON parser is reached
    st.tuples(st.integers(0, 80), st.binary(max_size=200)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
    st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=200)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
))
def test_random_bytes_as_safetensors(fuzz_dir: Path, blob: bytes) -> None:
    """Tiny valid files exist (``\\x02\\0...\\0{}`` is an empty one), so: FormatError, or a parse that is sound."""
    open_fails_or_consistent(write(fuzz_dir / "random.safetensors", blob), llmtier=False)


# -- 1b. truncation -------------------------------------------------------------
def _layout(path: Path) -> tuple[int, int]:
    _, _, _, ioff, ilen, _, _ = struct.unpack_from("<8sIIQQII", path.read_bytes())
    return ioff, ilen


def test_truncated_store_at_every_boundary(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    content = {"big": rng.standard_normal(3000).astype(np.float32), "small": np.arange(5, dtype=np.int16),
               "empty": np.zeros((0, 3), np.uint8), "scalar": np.array(2.5),
               "last": rng.integers(0, 1 << 60, 700, dtype=np.int64)}
    full = tmp_path / "full.lts"
    write_store(full, content)
    raw = full.read_bytes()
    size = len(raw)
    ioff, ilen = _layout(full)
    assert size % 4096 == 0 and ioff + ilen < size  # the index is followed by padding
    cuts = set(range(0, size, 4096)) | {1, 7, 8, 12, 16, 24, 32, 35, 36, 39, 40, 41, 2048, 4095, 4097,
                                         ioff - 1, ioff + 1, ioff + ilen // 2, ioff + ilen - 1,
                                         ioff + ilen, ioff + ilen + 1, size - 1}
    for cut in sorted(cuts):
        p = write(tmp_path / f"cut-{cut}.lts", raw[:cut])
        if cut < ioff + ilen:  # cuts into the preamble, data or index
            field = "preamble" if cut < PREAMBLE else "index_offset" if cut < ioff else "index_length"
            open_fails(p, field)
        else:  # only the index's zero padding is gone: nothing the store needs is missing
            with open_store(p) as s:
                assert sorted(s.keys()) == sorted(content)
                for name, arr in content.items():
                    got = s.get(name)
                    assert got.dtype == arr.dtype and got.shape == arr.shape and got.tobytes() == arr.tobytes()
                assert s.verify() == []
        p.unlink()
    assert_bounded_failure(write(tmp_path / "cut.lts", raw[: ioff + ilen - 1]))


def test_truncated_safetensors_everywhere(tmp_path: Path) -> None:
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(4)
    content = {"embed": rng.standard_normal((40, 64)).astype(np.float32), "bias": np.arange(7, dtype=np.int64),
               "mask": np.array([True, False, True]), "half": rng.standard_normal(300).astype(np.float16)}
    full = tmp_path / "full.safetensors"
    safetensors_numpy.save_file(content, str(full), metadata={"k": "v"})
    raw = full.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    with open_store(full) as s:
        for name, arr in content.items():
            assert s.get(name).tobytes() == arr.tobytes()
    cuts = set(range(0, len(raw), 4096)) | set(range(17)) | {8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1,
                                                                 8 + n + 100, len(raw) - 1}
    for cut in sorted(c for c in cuts if c < len(raw)):
        p = write(tmp_path / f"cut-{cut}.safetensors", raw[:cut])
        # the last tensor ends at the end of the file, so every cut loses part of it
        open_fails(p, "header_length" if cut < 8 + n else r"'\w+'\.data_offsets")
        p.unlink()
    assert_bounded_failure(write(tmp_path / "cut.safetensors", raw[: 8 + n - 1]))


# -- 1c. single-byte flips ------------------------------------------------------
class FlipStore(NamedTuple):
    raw: bytes
    content: dict[str, np.ndarray]
    ioff: int
    ilen: int
    extents: list[tuple[str, int, int]]  # (name, start, end)


@pytest.fixture(scope="module")
def flip_store(tmp_path_factory: pytest.TempPathFactory) -> FlipStore:
    rng = np.random.default_rng(5)
    content = {"x": rng.standard_normal((10, 100)).astype(np.float32), "y": rng.integers(0, 9, 5000, np.int8),
               "z": np.arange(3, dtype=np.float64)}
    p = tmp_path_factory.mktemp("flip") / "store.lts"
    write_store(p, content, metadata={"about": "flips"})
    ioff, ilen = _layout(p)
    with open_store(p) as s:
        extents = [(t.name, t.offset, t.offset + t.nbytes) for t in s.infos()]
    return FlipStore(p.read_bytes(), content, ioff, ilen, extents)


def _check_flip(path: Path, fs: FlipStore, pos: int) -> None:
    content, ioff, ilen, extents = fs.content, fs.ioff, fs.ilen, fs.extents
    hit = [name for name, a, b in extents if a <= pos < b]
    if pos < 8:
        open_fails(path, "magic")
    elif pos < 40:
        open_fails(path, "preamble_crc32c")
    elif pos < PREAMBLE:
        open_fails(path, "preamble")  # the reserved bytes must stay zero
    elif ioff <= pos < ioff + ilen:
        open_fails(path, "index_crc32c")
    elif hit:  # tensor data: the store opens, the tensor's CRC catches it
        (name,) = hit
        with open_store(path) as s:
            assert s.verify() == [name]
            with pytest.raises(ChecksumError) as ei:
                s.get(name)
            assert ei.value.field == name and ei.value.path == str(path) and name in str(ei.value)
            with pytest.raises(ChecksumError):
                s.get_many()
            for other in content.keys() - {name}:
                assert s.get(other).tobytes() == content[other].tobytes()
    else:  # zero padding between extents or after the index: read by nobody
        with open_store(path) as s:
            assert s.verify() == []
            for name, arr in content.items():
                assert s.get(name).tobytes() == arr.tobytes()


def test_every_preamble_byte_flip_is_caught(tmp_path: Path, flip_store: FlipStore) -> None:
    p = tmp_path / "s.lts"
    for pos in [*range(48), 100, 4000, 4095]:
        for x in (0x01, 0x80, 0xFF):
            b = bytearray(flip_store.raw)
            b[pos] ^= x
            _check_flip(write(p, bytes(b)), flip_store, pos)


@FUZZ
@given(st.data())
def test_random_byte_flips(fuzz_dir: Path, flip_store: FlipStore, data: Any) -> None:
    raw, ioff, ilen = flip_store.raw, flip_store.ioff, flip_store.ilen
    # weight the draw towards the interesting regions; anywhere in the file is possible
    pos = data.draw(st.one_of(
        st.integers(0, len(raw) - 1), st.integers(ioff, ioff + ilen - 1), st.integers(0, 39),
        *(st.integers(a, b - 1) for _, a, b in flip_store.extents)), label="pos")
    b = bytearray(raw)
    b[pos] ^= data.draw(st.integers(1, 255), label="xor")
    _check_flip(write(fuzz_dir / "flip.lts", bytes(b)), flip_store, pos)


@FUZZ
@given(st.data())
def test_random_byte_flips_in_safetensors(fuzz_dir: Path, data: Any) -> None:
    """No checksums here: a flip in the header is a FormatError or a header that is still sound;
    a flip in the data section leaves the header exactly as it was."""
    raw = st_bytes(st_header(), ST_DATA)
    n = len(raw) - 8 - len(ST_DATA)
    pos = data.draw(st.one_of(st.integers(0, len(raw) - 1), st.integers(0, 7 + n)), label="pos")
    b = bytearray(raw)
    b[pos] ^= data.draw(st.integers(1, 255), label="xor")
    p = write(fuzz_dir / "flip.safetensors", bytes(b))
    open_fails_or_consistent(p, llmtier=False)
    if pos >= 8 + n:
        infos = {t.name: (t.offset, t.nbytes, t.shape) for t in read_header(str(p))[0]}
        assert infos == {"a": (8 + n, 24, (2, 3)), "b": (8 + n + 24, 10, (5,))}


# -- 1d. hostile headers with correct checksums -----------------------------------
HUGE = [2**32, 2**63, 2**64 - 1]
T0 = r"tensors\[0\]"  # the field prefix of the first entry, before its name is known
TA = r"tensors\[0\] \('a'\)"  # ... and after

_size_of_base = len(store_bytes(base_doc(), DATA))

PREAMBLE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("magic", {"magic": b"LLMTSTOX"}, "magic"),
    ("magic-zero", {"magic": b"\0" * 8}, "magic"),
    ("magic-safetensors-like", {"magic": struct.pack("<Q", 100)}, "magic"),
    ("preamble-crc", {"preamble_crc": 0xDEADBEEF}, "preamble_crc32c"),
    ("version-0", {"version": 0}, "version"),
    ("version-2", {"version": 2}, "version"),
    ("version-max", {"version": 2**32 - 1}, "version"),
    ("flags-1", {"flags": 1}, "flags"),
    ("flags-high", {"flags": 1 << 31}, "flags"),
    ("reserved-byte", {"reserved": b"\x01"}, "preamble"),
    ("reserved-far", {"reserved": b"\0" * 4000 + b"\x07"}, "preamble"),
    ("index-offset-0", {"index_offset": 0}, "index_offset"),
    ("index-offset-unaligned", {"index_offset": IOFF + 1}, "index_offset"),
    ("index-offset-in-preamble", {"index_offset": 2048}, "index_offset"),
    ("index-offset-past-eof", {"index_offset": _size_of_base + 4096}, "index_offset"),
    ("index-offset-huge", {"index_offset": 2**64 - 4096}, "index_offset"),
    ("index-offset-2**63", {"index_offset": 2**63}, "index_offset"),
    ("index-offset-into-data", {"index_offset": PREAMBLE}, "index_crc32c"),
    # CRCs that vouch for tensor bytes: intact, but not an index
    ("index-is-tensor-data", {"index_offset": PREAMBLE, "index_length": A.nbytes, "index_crc": crc32c(A.tobytes())},
     "index"),
    ("index-length-0", {"index_length": 0}, "index_length"),
    *((f"index-length-{v}", {"index_length": v}, "index_length") for v in HUGE),
    ("index-length-max+1", {"index_length": MAX_INDEX + 1}, "index_length"),
    ("index-length-past-eof", {"index_length": _size_of_base - IOFF + 1}, "index_length"),
    ("index-length-short", {"index_length": 10}, "index_crc32c"),
    ("index-crc", {"index_crc": 0}, "index_crc32c"),
]

_DEEP = 100_000
_BAD_NAME = b'{"format":"llmtier-store","version":1,"metadata":{},"tensors":[{"name":"a\xc3\x28","dtype":"float32"}]}'
_OVERLONG_SLASH = b'{"format":"llmtier-store","version":1,"metadata":{},"tensors":[{"name":"a\xc0\xafb"}]}'
_DUP_KEY = (b'{"format":"llmtier-store","version":1,"metadata":{},"tensors":[{"name":"a","dtype":"float32",'
            b'"shape":[4,8],"offset":4096,"offset":8192,"nbytes":128,"crc32c":0,"tags":{}}]}')
_BIG_INT = json.dumps(base_doc()).replace('"offset": 4096', '"offset": ' + "9" * 5000).encode()

INDEX_CASES: list[tuple[str, Any, str]] = [
    # not JSON / not UTF-8 / pathological JSON
    ("empty-object", b"{}", r"index\.format"),
    ("truncated-json", index_bytes(base_doc())[:-1], "index"),
    ("nul-bytes", b"\0" * 64, "index"),
    ("not-utf8", b'{"format":"llmtier-store","x":"\xff\xfe"}', "index"),
    ("not-utf8-in-name", _BAD_NAME, "index"),
    ("overlong-utf8-slash-in-name", _OVERLONG_SLASH, "index"),
    ("utf16", json.dumps(base_doc()).encode("utf-16"), "index"),
    ("nesting-arrays", b"[" * _DEEP, "index"),
    ("nesting-objects", b'{"a":' * _DEEP, "index"),
    ("nesting-in-metadata", b'{"format":"llmtier-store","version":1,"metadata":' + b"[" * _DEEP, "index"),
    ("duplicate-json-key", _DUP_KEY, "index"),
    ("int-5000-digits", _BIG_INT, "index"),
    # document level
    ("list", [base_doc()], r"index\.format"),
    ("format-missing", {k: v for k, v in base_doc().items() if k != "format"}, r"index\.format"),
    ("format-other", base_doc(format="llmtier-sharded-store"), r"index\.format"),
    *((f"version-{v!r}", base_doc(version=v), r"index\.version") for v in (2, 0, "1", True, 1.0, None, [1])),
    *((f"metadata-{v!r}", base_doc(metadata=v), r"index\.metadata") for v in ([], "x", 1, None)),
    *((f"tensors-{v!r}", base_doc(tensors=v), r"index\.tensors") for v in ({}, "a", None, 3)),
    # entry level
    ("entry-list", base_doc(tensors=[["a"]]), T0),
    ("entry-string", base_doc(tensors=["a"]), T0),
    *((f"entry-missing-{k}", without_key(k), T0) for k in ("name", "dtype", "shape", "offset", "nbytes", "crc32c",
                                                           "tags")),
    ("entry-extra-key", with_a(extra=1), T0),
    *((f"name-{v!r}", with_a(name=v), T0 + r"\.name")
      for v in ("", 5, None, ["a"], "a/b", "/etc/passwd", "../x", "a\\b", "a\0b", "\0", "\ud800", "x" * 1025)),
    *((f"dtype-{v!r}", with_a(dtype=v), TA + r"\.dtype") for v in ("float128", "F32", "bf16", "", 5, None, ["f"])),
    *((f"shape-{v!r}"[:40], with_a(shape=v), TA + r"\.shape")
      for v in ([-1, 32], [2**70], [2**62, 1], [1] * 100, [1] * 33, [4.0, 8], ["4", 8], [True, 32], [[4], 8], "48",
                None, {"0": 4}, 32)),
    *((f"nbytes-{v!r}", with_a(nbytes=v), TA + r"\.nbytes")
      for v in (127, 129, 0, -128, 2**63, 2**64, 128.0, True, "128", None)),
    *((f"offset-{v!r}", with_a(offset=v), TA + r"\.offset")
      for v in (-4096, -1, 2**63, 2**64, 4096.0, True, "4096", None, 4097, 0, 2048, IOFF, IOFF - 64, float("nan"),
                float("inf"))),
    *((f"crc-{v!r}", with_a(crc32c=v), TA + r"\.crc32c") for v in (-1, 2**32, None, "0", 1.5)),
    *((f"tags-{v!r}", with_a(tags=v), TA + r"\.tags") for v in ([], "x", None, 1)),
    # zero-size and huge-dim shapes whose byte count matches: the extent checks still apply
    ("shape-huge-product-nbytes-huge", with_a(shape=[2**31, 2**31], nbytes=2**64), TA + r"\.nbytes"),
    ("shape-2**40-past-index", with_a(shape=[2**40], dtype="uint8", nbytes=2**40), TA + r"\.nbytes"),
    ("extent-crosses-index", base_doc(tensors=[entry("a", A, 4096), entry("b", np.zeros(600, np.int64), 8192)]),
     r"tensors\[1\] \('b'\)\.offset"),
    # between entries
    ("duplicate-names", base_doc(tensors=[entry("a", A, 4096), entry("a", B, 8192)]), "tensors"),
    ("same-offset", base_doc(tensors=[entry("a", A, 4096), entry("b", B, 4096)]), "tensors"),
    ("overlap-reversed-order", base_doc(tensors=[entry("b", B, 8192), entry("a", np.zeros(1025, np.float32), 4096)]),
     "tensors"),
]


@pytest.mark.parametrize(("fields", "field"), [c[1:] for c in PREAMBLE_CASES], ids=[c[0] for c in PREAMBLE_CASES])
def test_hostile_preamble(tmp_path: Path, fields: dict[str, Any], field: str) -> None:
    p = write(tmp_path / "hostile.lts", store_bytes(base_doc(), DATA, **fields))
    err = open_fails(p, field)
    assert not isinstance(err, ChecksumError) or field.endswith("crc32c")
    with pytest.raises(FormatError):
        read_index(str(p))
    assert_bounded_failure(p)


@pytest.mark.parametrize(("doc", "field"), [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_hostile_index(tmp_path: Path, doc: Any, field: str) -> None:
    p = write(tmp_path / "hostile.lts", store_bytes(doc, DATA))
    open_fails(p, field)
    # The JSON parser holds the raw index and its decoded text at once: allow twice
    # the index (the nesting cases are ~100 KiB of brackets) on top of the bound.
    peak_alloc(lambda: open_and_close(p))
    peak, exc = peak_alloc(lambda: open_and_close(p))
    assert isinstance(exc, FormatError)
    assert peak <= p.stat().st_size + len(index_bytes(doc)) + ALLOC_SLACK


def test_overlap_with_a_larger_extent(tmp_path: Path) -> None:
    """A partial overlap (not just equal offsets): a 2-page tensor and one on its second page."""
    big = np.ones(2048, np.float32)  # 8192 bytes: [4096, 12288)
    data = big.tobytes() + b"\0" * 4096
    doc = base_doc(tensors=[entry("big", big, 4096), entry("b", B, 8192)])
    open_fails(write(tmp_path / "o.lts", store_bytes(doc, data)), "tensors")
    doc = base_doc(tensors=[entry("big", big, 4096), entry("b", B, 12288)])  # adjacent: fine
    with open_store(write(tmp_path / "ok.lts", store_bytes(doc, big.tobytes() + B.tobytes()))) as s:
        assert s.get("big").tobytes() == big.tobytes() and s.get("b").tobytes() == B.tobytes()


def test_zero_size_tensors_may_share_an_offset(tmp_path: Path) -> None:
    z = np.zeros((0, 4), np.float32)
    doc = base_doc(tensors=[entry("a", A, 4096), entry("z1", z, 4096), entry("z2", z, 8192), entry("b", B, 8192)])
    with open_store(write(tmp_path / "z.lts", store_bytes(doc, DATA))) as s:
        assert s.get("z1").shape == (0, 4) and s.get("b").tobytes() == B.tobytes()


def _st_entry(dtype: str = "F32", shape: Any = (2, 3), offs: Any = (0, 24)) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offs) if isinstance(offs, tuple) else offs}


_ST_LEN = len(json.dumps(st_header()).encode())
ST_NAME_A = r"'a'"

SAFETENSORS_CASES: list[tuple[str, bytes, str]] = [
    ("empty-file", b"", "header_length"),
    ("seven-bytes", b"\x02\0\0\0\0\0\0", "header_length"),
    *((f"length-{v}", st_bytes(st_header(), ST_DATA, length=v), "header_length")
      for v in (0, 1, 2**32, 2**63, 2**64 - 1, MAX_HEADER + 1, _ST_LEN + len(ST_DATA) + 1)),
    ("length-short", st_bytes(st_header(), ST_DATA, length=_ST_LEN - 1), "header"),
    ("length-long", st_bytes(st_header(), ST_DATA, length=_ST_LEN + 4), "header"),
    ("not-utf8", st_bytes(b'{"a\xff":{}}'), "header"),
    ("not-json", st_bytes(b"{" * 10), "header"),
    ("nesting", st_bytes(b"[" * _DEEP), "header"),
    ("nesting-objects", st_bytes(b'{"a":' * _DEEP), "header"),
    ("list", st_bytes([st_header()]), "header"),
    ("duplicate-name", st_bytes(b'{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
                                b'"a":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}}', b"x" * 6), "header"),
    *((f"metadata-{v!r}", st_bytes({**st_header(), "__metadata__": v}, ST_DATA), "__metadata__")
      for v in ({"k": 1}, {"k": None}, {"k": ["v"]}, [], [["k", "v"]], "x", 0, False, {"k": "\udc80"})),
    ("name-empty", st_bytes({"": _st_entry()}, ST_DATA), "''"),
    ("name-nul", st_bytes({"a\0b": _st_entry()}, ST_DATA), re.escape(repr("a\0b"))),
    ("name-lone-surrogate", st_bytes({"\ud800": _st_entry()}, ST_DATA), re.escape(repr("\ud800"))),
    ("entry-not-object", st_bytes({"a": [1, 2]}, ST_DATA), ST_NAME_A),
    ("entry-missing-offsets", st_bytes({"a": {"dtype": "F32", "shape": [2, 3]}}, ST_DATA), ST_NAME_A),
    *((f"dtype-{v!r}", st_bytes(st_header(dtype=v), ST_DATA), ST_NAME_A + r"\.dtype")
      for v in ("F128", "float32", "f32", "", 1, None, ["F32"])),
    *((f"shape-{v!r}"[:40], st_bytes(st_header(shape=v), ST_DATA), ST_NAME_A + r"\.shape")
      for v in ([-2, -3], [2**70], [1] * 100, [2.0, 3], ["2", 3], [True, 6], "23", None, {"a": 1})),
    *((f"offsets-{v!r}"[:40], st_bytes(st_header(data_offsets=v), ST_DATA), ST_NAME_A + r"\.data_offsets")
      for v in ([0, 35], [0, 2**63], [2**64 - 1, 2**64 - 1], [-24, 0], [-1, 23], [24, 0], [0.0, 24.0], [False, 24],
                ["0", "24"], [0], [0, 24, 48], None, "0-24", {"0": 24})),
    ("shape-mismatch", st_bytes(st_header(shape=[2, 2]), ST_DATA), ST_NAME_A + r"\.data_offsets"),
    ("shape-mismatch-huge", st_bytes(st_header(shape=[2**40, 2**20]), ST_DATA), ST_NAME_A + r"\.data_offsets"),
    ("overlap", st_bytes(st_header(shape=[3, 3], data_offsets=[0, 36]) | {
        "b": _st_entry("I16", [5], [24, 34])}, ST_DATA + b"\0" * 2), "data_offsets"),
    ("overlap-same", st_bytes(st_header() | {"b": _st_entry("F32", [2, 3], [0, 24])}, ST_DATA), "data_offsets"),
]


@pytest.mark.parametrize(("raw", "field"), [c[1:] for c in SAFETENSORS_CASES], ids=[c[0] for c in SAFETENSORS_CASES])
def test_hostile_safetensors(tmp_path: Path, raw: bytes, field: str) -> None:
    p = write(tmp_path / "hostile.safetensors", raw)
    open_fails(p, field)
    with pytest.raises(FormatError):
        read_header(str(p))
    peak_alloc(lambda: open_and_close(p))
    peak, exc = peak_alloc(lambda: open_and_close(p))
    assert isinstance(exc, FormatError)
    assert peak <= 2 * len(raw) + ALLOC_SLACK  # the file, plus the header's decoded text


def test_safetensors_leniencies_that_are_sound(tmp_path: Path) -> None:
    """What the parser accepts on purpose: ``null`` metadata (as the safetensors library
    does), names with ``/`` (legal in safetensors, nothing is created from them), zero-size
    tensors and bytes after the last tensor."""
    raw = st_bytes({"__metadata__": None, "a/b": _st_entry(), "z": _st_entry("F32", [0, 3], [24, 24]),
                    "b": _st_entry("I16", [5], [24, 34])}, ST_DATA + b"trailing")
    p = write(tmp_path / "lenient.safetensors", raw)
    with open_store(p) as s:
        assert s.get("a/b").tobytes() == ST_A.tobytes() and s.get("b").tobytes() == ST_B.tobytes()
        assert s.get("z").shape == (0, 3)
        check_consistent(s, p, llmtier=False)


@pytest.mark.parametrize("case", ["index-length", "index-offset", "header-length", "header-past-eof",
                                  "shape-2**70", "huge-extent"])
def test_enormous_claims_allocate_nothing(tmp_path: Path, case: str) -> None:
    """A parser that trusted these numbers would allocate gigabytes (or exabytes); the
    bound is the file's size plus ALLOC_SLACK, checked with tracemalloc."""
    if case == "index-length":
        raw = store_bytes(base_doc(), DATA, index_length=2**63)
    elif case == "index-offset":
        raw = store_bytes(base_doc(), DATA, index_offset=2**63, index_length=MAX_INDEX)
    elif case == "header-length":
        raw = st_bytes(st_header(), ST_DATA, length=2**63)
    elif case == "header-past-eof":
        raw = st_bytes(st_header(), ST_DATA, length=MAX_HEADER)
    elif case == "shape-2**70":
        raw = store_bytes(with_a(shape=[2**61, 2**9], dtype="uint8", nbytes=2**70), DATA)
    else:
        raw = st_bytes(st_header(shape=[2**31, 2**31], data_offsets=[0, 2**64 - 1]), ST_DATA)
    suffix = ".safetensors" if case.startswith(("header", "huge")) else ".lts"
    p = write(tmp_path / f"claim{suffix}", raw)
    peak = assert_bounded_failure(p)
    assert peak < 1 << 20


@FUZZ
@given(st.binary(min_size=0, max_size=3000))
def test_random_safetensors_header_with_exact_length(fuzz_dir: Path, header: bytes) -> None:
    open_fails_or_consistent(write(fuzz_dir / "rh.safetensors", st_bytes(header, ST_DATA)), llmtier=False)


# -- 1e. structured fuzz: documents mixing valid and hostile values ------------------
_JUNK = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.integers())


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], percent: int = 85) -> st.SearchStrategy[Any]:
    """``good`` ``percent``% of the time (``one_of`` would weight every branch of ``bad`` like ``good``)."""
    return st.integers(0, 99).flatmap(lambda i: good if i < percent else bad)


_NAMES = mostly(st.sampled_from(["a", "b", "c"]), st.one_of(
    st.sampled_from(["a/b", "a\\b", "a\0b", "", "\ud800", "é", "x" * 1025]), st.text(max_size=6), _JUNK), 80)
_INTS = st.one_of(st.integers(-5, 5), st.sampled_from([4095, 4097, 8192, 12288, 16384, 2**32, 2**63, 2**64, -4096]),
                  st.integers())
_SHAPES = mostly(st.lists(st.integers(0, 12), max_size=3), st.one_of(
    st.lists(st.one_of(st.integers(0, 40), st.sampled_from([-1, 2**62, 2**70]), st.floats(), st.booleans()),
             max_size=4),
    st.lists(st.integers(0, 2), min_size=33, max_size=40), _JUNK))
FUZZ_DATA = np.random.default_rng(6).integers(0, 256, 3 * 4096, np.uint8).tobytes()  # data region: 3 pages


@st.composite
def _entries(draw: Any) -> Any:
    """An index entry, each field usually valid and sometimes hostile."""
    e: dict[str, Any] = {
        "name": draw(_NAMES),
        "dtype": draw(mostly(st.sampled_from(sorted(DTYPES)), st.one_of(st.sampled_from(["F32", "bf16"]), _JUNK))),
        "shape": draw(_SHAPES),
        "offset": draw(mostly(st.sampled_from([4096, 8192, 12288]), st.one_of(_INTS, _JUNK), 80)),
        "nbytes": draw(st.one_of(_INTS, _JUNK)),
        "crc32c": draw(mostly(st.integers(0, 2**32 - 1), _JUNK)),
        "tags": draw(mostly(st.one_of(st.just({}), st.dictionaries(st.text(max_size=3), _JUNK, max_size=2)), _JUNK)),
    }
    dt = DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
    if dt and isinstance(e["shape"], list) and all(type(d) is int for d in e["shape"]) and draw(mostly(
            st.just(True), st.just(False), 75)):
        e["nbytes"] = math.prod(e["shape"]) * dt.itemsize
    off, n = e["offset"], e["nbytes"]
    if type(off) is int and type(n) is int and 0 <= off - PREAMBLE <= off - PREAMBLE + n <= len(FUZZ_DATA) \
            and draw(st.booleans()):
        e["crc32c"] = crc32c(FUZZ_DATA[off - PREAMBLE : off - PREAMBLE + n])  # so reads can succeed
    if draw(st.integers(0, 19)) == 0:
        e.pop(draw(st.sampled_from(sorted(e))))
    return draw(mostly(st.just(e), _JUNK, 95))


_DOCS = st.fixed_dictionaries({
    "format": mostly(st.just("llmtier-store"), _JUNK, 95),
    "version": mostly(st.just(1), _JUNK, 95),
    "metadata": mostly(st.dictionaries(st.text(max_size=3), _JUNK, max_size=2), _JUNK, 95),
    "tensors": mostly(st.lists(_entries(), min_size=1, max_size=4), st.one_of(st.just([]), _JUNK), 95),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOCS)
def test_structured_index_fuzz(fuzz_dir: Path, doc: dict[str, Any]) -> None:
    path = write(fuzz_dir / "structured.lts", store_bytes(doc, FUZZ_DATA))
    open_fails_or_consistent(path, llmtier=True)


_ST_CODES = sorted(FROM_SAFETENSORS)
ST_FUZZ_DATA = bytes(range(64))


@st.composite
def _st_headers(draw: Any) -> Any:
    """A safetensors header, each field usually valid and sometimes hostile."""
    doc: dict[str, Any] = {}
    offsets = mostly(st.integers(0, 64), st.one_of(st.integers(-2, 70), st.sampled_from([2**63, 2**64 - 1]), _JUNK))
    for _ in range(draw(mostly(st.integers(1, 4), st.just(0), 95))):
        name = draw(mostly(st.sampled_from(["a", "b", "c"]), st.one_of(
            st.sampled_from(["a/b", "", "a\0", "\udfff"]), st.text(max_size=4)), 80))
        dtype = draw(mostly(st.sampled_from(_ST_CODES), _JUNK))
        shape = draw(_SHAPES)
        b, e_ = draw(offsets), draw(offsets)
        dt = FROM_SAFETENSORS.get(dtype) if isinstance(dtype, str) else None
        if dt and type(b) is int and isinstance(shape, list) and all(type(d) is int for d in shape) \
                and draw(mostly(st.just(True), st.just(False), 75)):
            e_ = b + math.prod(shape) * dt.itemsize
        entry_ = {"dtype": dtype, "shape": shape, "data_offsets": draw(mostly(st.just([b, e_]), _JUNK, 90))}
        doc[name] = draw(mostly(st.just(entry_), _JUNK, 95))
    if draw(st.booleans()):
        doc["__metadata__"] = draw(mostly(st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                                          _JUNK))
    return doc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_st_headers(), st.integers(0, len(ST_FUZZ_DATA)))
def test_structured_safetensors_fuzz(fuzz_dir: Path, header: dict[str, Any], data_len: int) -> None:
    path = write(fuzz_dir / "structured.safetensors", st_bytes(header, ST_FUZZ_DATA[:data_len]))
    open_fails_or_consistent(path, llmtier=False)


# -- sharded stores: damage to the directory ------------------------------------------
def test_damaged_sharded_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    content = {f"l{i}": rng.standard_normal(3000).astype(np.float32) for i in range(4)}
    d = tmp_path / "sharded"
    write_store(d, content, tags={n: {"layer": i} for i, n in enumerate(content)}, max_shard_bytes=16 << 10)
    index = json.loads((d / "index.json").read_text())
    assert len(index["shards"]) > 1
    pristine = {p.name: p.read_bytes() for p in d.iterdir()}

    def restore() -> None:
        for name, raw in pristine.items():
            (d / name).write_bytes(raw)

    raw_index = pristine["index.json"]
    for cut in (0, 1, len(raw_index) // 2, len(raw_index) - 1):
        (d / "index.json").write_bytes(raw_index[:cut])
        open_fails(d)
    restore()
    shard = d / index["shards"][1]
    shard.write_bytes(pristine[shard.name][: len(pristine[shard.name]) - 4096])
    open_fails(d, "index_length")
    shard.unlink()
    open_fails(d, r"shards\[1\]")
    restore()
    for bad in ("../" + index["shards"][0], "/etc/passwd", "..", "", 5):
        doc = dict(index, shards=[bad, *index["shards"][1:]])
        (d / "index.json").write_text(json.dumps(doc))
        open_fails(d, r"shards\[0\]")
    (d / "index.json").write_text(json.dumps(dict(index, tensors={**index["tensors"], "l0": 1})))
    open_fails(d, "tensors")
    restore()
    with open_store(d) as s:
        for name, arr in content.items():
            assert s.get(name).tobytes() == arr.tobytes()


# -- 2. writers killed with SIGKILL ---------------------------------------------------------
HELPER = Path(__file__).with_name("store_kill_writer.py")
_spec = importlib.util.spec_from_file_location("store_kill_writer", HELPER)
assert _spec and _spec.loader
kill_writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_writer)

SINGLE_TRIALS = 20
SHARDED_TRIALS = 6
SHARD_BYTES = 10 << 20


@pytest.fixture(scope="module")
def contents() -> dict[str, dict[str, np.ndarray]]:
    return {"old": kill_writer.content("old"), "new": kill_writer.content("new")}


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and got[k].tobytes() == want[k].tobytes()
        for k in want)


def _read_all(path: Path) -> dict[str, np.ndarray]:
    with open_store(path) as s:
        return s.get_many()  # checks every tensor's CRC-32C


def _which(path: Path, contents: dict[str, dict[str, np.ndarray]]) -> str:
    got = _read_all(path)
    for which in ("old", "new"):
        if _same(got, contents[which]):
            return which
    raise AssertionError(f"{path} opens as a valid store holding neither the old nor the new content "
                         f"(keys {sorted(got)})")


def _spawn(path: Path, which: str, shard: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(HELPER), str(path), which, str(shard)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "ready\n":
        _, err = proc.communicate()
        raise AssertionError(f"writer did not start: {line!r} {err}")
    return proc


def _write_duration(path: Path, shard: int, old: dict[str, np.ndarray]) -> float:
    """How long an uninterrupted write of the new content over the old one takes here
    (median of three, to spread the kills; nothing is asserted about it)."""
    kw: dict[str, Any] = {"max_shard_bytes": shard} if shard else {}
    times = []
    for _ in range(3):
        write_store(path, old, tags=kill_writer.tags("old"), **kw)
        proc = _spawn(path, "new", shard)
        t0 = time.perf_counter()
        out, err = proc.communicate()
        assert proc.returncode == 0 and out == "done\n", err
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def _delays(n: int, duration: float, seed: int) -> list[float]:
    """n kill delays stratified over 0..1.25x the write's duration (some land after the commit)."""
    rng = random.Random(seed)
    out = [duration * 1.25 * (i + rng.random()) / n for i in range(n)]
    rng.shuffle(out)
    return out


def _temps(directory: Path, base: str | None) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if ".tmp-" in p.name and (base is None or p.name.startswith(f".{base}.tmp-")))


def _check_leftover_file(p: Path, contents: dict[str, dict[str, np.ndarray]], *, must_open: bool) -> None:
    """A left-over file either is not a store, or holds exactly one content's tensors (a subset, for a shard)."""
    try:
        got = _read_all(p)
    except FormatError:
        assert not must_open, f"{p} should be a complete store"
        return
    assert any(got.keys() <= contents[w].keys() and _same(got, {k: contents[w][k] for k in got})
               for w in ("old", "new")), f"{p} opens with wrong data"


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
def test_writer_killed_at_random_moments(tmp_path: Path, contents: dict[str, dict[str, np.ndarray]],
                                         sharded: bool) -> None:
    shard = SHARD_BYTES if sharded else 0
    trials = SHARDED_TRIALS if sharded else SINGLE_TRIALS
    target = tmp_path / ("store" if sharded else "store.lts")
    kw: dict[str, Any] = {"max_shard_bytes": SHARD_BYTES} if sharded else {}
    duration = _write_duration(target, shard, contents["old"])
    write_store(target, contents["old"], tags=kill_writer.tags("old"), **kw)
    seen: dict[str, int] = {"old": 0, "new": 0, "killed": 0, "temp files left": 0}
    for trial, delay in enumerate(_delays(trials, duration, seed=1234 + sharded)):
        proc = _spawn(target, "new", shard)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), f"trial {trial}: writer failed ({proc.returncode}): {err}"
        seen[_which(target, contents)] += 1
        seen["killed"] += proc.returncode == -signal.SIGKILL
        seen["temp files left"] += bool(_temps(target if sharded else tmp_path, None if sharded else target.name))
        if sharded:
            listed = set(json.loads((target / "index.json").read_text())["shards"])
            for p in sorted(target.iterdir()):
                if p.name == "index.json" or p.name.startswith(".index.json.tmp-"):
                    continue
                assert p.name.startswith(("shard-", ".shard-")), p.name
                _check_leftover_file(p, contents, must_open=not p.name.startswith("."))
            assert listed <= {p.name for p in target.iterdir()}
        else:
            for p in _temps(tmp_path, target.name):  # never valid, or valid only once complete
                try:
                    got = _read_all(p)
                except FormatError:
                    continue
                assert _same(got, contents["new"]), f"{p} opens but is not the complete new store"
        # The next writer (in this process; the killed one is dead) cleans up after it.
        write_store(target, contents["old"], tags=kill_writer.tags("old"), **kw)
        assert _which(target, contents) == "old"
        if sharded:
            listed = set(json.loads((target / "index.json").read_text())["shards"])
            assert {p.name for p in target.iterdir()} == listed | {"index.json"}, "stale shards or temps left"
        else:
            assert _temps(tmp_path, target.name) == [], "stale temporary files left"
    print(f"kill outcomes ({'sharded' if sharded else 'single-file'}, write ~{duration * 1e3:.0f} ms): {seen}")


# -- 3. a full disk -----------------------------------------------------------------------
def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture(params=["ext4-loop", "tmpfs"])
def small_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A real, small file system mounted under tmp_path (needs root)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if request.param == "ext4-loop":
        if not shutil.which("mkfs.ext4"):
            pytest.skip("mkfs.ext4 is not installed")
        img = tmp_path / "fs.img"
        with open(img, "wb") as f:
            f.truncate(48 << 20)
        r = _run("mkfs.ext4", "-q", "-F", str(img))
        if r.returncode:
            pytest.skip(f"mkfs.ext4 failed: {r.stderr.strip()}")
        r = _run("mount", "-o", "loop", str(img), str(mnt))
    else:
        r = _run("mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt))
    if r.returncode:
        pytest.skip(f"cannot mount a {request.param} file system here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if _run("umount", str(mnt)).returncode:
            _run("umount", "-l", str(mnt))


def _store_files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()} - {"lost+found"}


def test_disk_full_single_file(small_fs: Path) -> None:
    path = small_fs / "model.lts"
    old = {"x": np.arange(250_000, dtype=np.float32), "y": np.arange(10, dtype=np.int64)}
    write_store(path, old, metadata={"v": "old"})
    big = {f"big{i}": np.full(5 << 20, i + 1, np.float32) for i in range(3)}  # 60 MiB > the file system
    with pytest.raises(DiskFullError) as ei:
        write_store(path, big)
    err = ei.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(path) in str(err) and "no space left" in str(err)
    assert _store_files(small_fs) == {"model.lts"}, "temporary files left behind"
    with open_store(path) as s:
        assert s.metadata == {"v": "old"} and _same(s.get_many(), old)
    # The failed write's blocks really were released: a store needing most of the disk fits now.
    fits = {"fits": np.full(5 << 20, 7, np.float32)}  # 20 MiB
    write_store(path, fits)
    with open_store(path) as s:
        assert _same(s.get_many(), fits)
    assert _store_files(small_fs) == {"model.lts"}


def test_disk_full_sharded(small_fs: Path) -> None:
    d = small_fs / "model"
    old = {f"l{i}": np.full(100_000, i, np.int32) for i in range(3)}
    write_store(d, old, tags={n: {"layer": i} for i, n in enumerate(old)}, max_shard_bytes=500_000)
    before = _store_files(d)
    big = {f"big{i}": np.full(5 << 20, i + 1, np.float32) for i in range(3)}
    with pytest.raises(DiskFullError) as ei:
        write_store(d, big, tags={n: {"layer": i} for i, n in enumerate(big)}, max_shard_bytes=8 << 20)
    assert isinstance(ei.value, OSError) and ei.value.errno == errno.ENOSPC
    assert _store_files(d) == before, "temporary files or orphan shards left behind"
    with open_store(d) as s:
        assert _same(s.get_many(), old)


def test_disk_full_sharded_message(small_fs: Path) -> None:
    d = small_fs / "model"
    big = {f"big{i}": np.full(5 << 20, i + 1, np.float32) for i in range(3)}
    with pytest.raises(DiskFullError) as ei:
        write_store(d, big, tags={n: {"layer": i} for i, n in enumerate(big)}, max_shard_bytes=8 << 20)
    assert "no space left while writing store" in str(ei.value) and str(d) in str(ei.value)


# -- bad input to the writer never costs the previous store ---------------------------------
Kw = dict[str, Any]


def _bad_inputs() -> list[tuple[str, Callable[[Path, Kw], None], type[BaseException]]]:
    def name_sep(p: Path, kw: Kw) -> None:
        write_store(p, {"a/b": np.arange(3)}, **kw)

    def name_nul(p: Path, kw: Kw) -> None:
        write_store(p, {"a\0": np.arange(3)}, **kw)

    def duplicate(p: Path, kw: Kw) -> None:
        with StoreWriter(p, **kw) as w:
            w.add("x", np.arange(3))
            w.add("x", np.arange(3))

    def object_dtype(p: Path, kw: Kw) -> None:
        write_store(p, {"x": np.array([object()])}, **kw)

    def short_sink(p: Path, kw: Kw) -> None:
        with StoreWriter(p, **kw) as w:
            s = w.begin("x", "float32", (10,))
            s.write(np.zeros(5, np.float32))
            s.close()

    def long_sink(p: Path, kw: Kw) -> None:
        with StoreWriter(p, **kw) as w:
            w.begin("x", "float32", (2,)).write(np.zeros(5, np.float32))

    def bad_shape(p: Path, kw: Kw) -> None:
        with StoreWriter(p, **kw) as w:
            w.begin("x", "float32", (-1, 3))

    def bad_metadata(p: Path, kw: Kw) -> None:
        write_store(p, {"x": np.arange(3)}, metadata={"x": object()}, **kw)

    def interrupted(p: Path, kw: Kw) -> None:
        with StoreWriter(p, **kw) as w:
            w.add("x", np.arange(1 << 20))
            w.add("y", np.arange(1 << 20))
            raise KeyboardInterrupt

    return [("name-separator", name_sep, FormatError), ("name-nul", name_nul, FormatError),
            ("duplicate", duplicate, ValueError), ("object-dtype", object_dtype, TypeError),
            ("short-sink", short_sink, ValueError), ("long-sink", long_sink, ValueError),
            ("negative-dim", bad_shape, FormatError), ("metadata-not-json", bad_metadata, ValueError),
            ("interrupted", interrupted, KeyboardInterrupt)]


@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
@pytest.mark.parametrize(("fn", "exc"), [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()])
def test_bad_writer_input_keeps_previous_store(tmp_path: Path, fn: Callable[[Path, Kw], None],
                                               exc: type[BaseException], sharded: bool) -> None:
    old = {"keep": np.arange(1000, dtype=np.float64), "more": np.arange(3000, dtype=np.int16)}
    kw: Kw = {"max_shard_bytes": 4096} if sharded else {}
    p = tmp_path / ("dir" if sharded else "s.lts")
    write_store(p, old, **kw)
    before = sorted(x.name for x in (p.iterdir() if sharded else tmp_path.iterdir()))
    with pytest.raises(exc):
        fn(p, kw)
    with open_store(p) as s:
        assert _same(s.get_many(), old)
    after = sorted(x.name for x in (p.iterdir() if sharded else tmp_path.iterdir()))
    assert after == before, "temporary files or shards left behind"


def test_unencodable_metadata_rejected_up_front(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metadata"):
        StoreWriter(tmp_path / "s.lts", metadata={"k": "\ud800"})


# -- 4. what the user sees -------------------------------------------------------------------
def test_error_messages_name_file_and_field(tmp_path: Path) -> None:
    text = write(tmp_path / "notes.lts", b"just some text, " * 512)
    err = open_fails(text, "magic")
    assert err.field == "magic" and err.path == str(text)
    assert "LLMTSTOR" in str(err) and "not an llmtier store" in str(err)
    assert isinstance(err, ValueError) and isinstance(err, LLMTierError)

    tiny = write(tmp_path / "tiny.lts", b"LLMTSTOR")
    err = open_fails(tiny, "preamble")
    assert "8 bytes" in str(err)

    p = write(tmp_path / "s.lts", store_bytes(with_a(shape=[4, 9]), DATA))
    err = open_fails(p)
    assert err.field == "tensors[0] ('a').nbytes" and "[4, 9]" in str(err) and "128" in str(err)

    st_path = write(tmp_path / "m.safetensors", st_bytes(st_header(), ST_DATA, length=2**63))
    err = open_fails(st_path, "header_length")
    assert str(2**63) in str(err)

    raw = bytearray(store_bytes(base_doc(), DATA))
    raw[PREAMBLE + 5] ^= 1  # inside tensor a
    p = write(tmp_path / "damaged.lts", bytes(raw))
    with open_store(p) as s:
        with pytest.raises(ChecksumError) as ei:
            s.get("a")
        assert ei.value.field == "a" and ei.value.path == str(p)
        assert "'a'" in str(ei.value) and str(p) in str(ei.value) and "damaged" in str(ei.value)
        assert np.array_equal(s.get("b"), B)  # the rest is still readable
        assert s.verify() == ["a"]
