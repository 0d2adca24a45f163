"""Read safetensors files in place, through the engine, without the page cache.

A safetensors file is an 8-byte little-endian header length ``N``, ``N``
bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``
plus an optional ``"__metadata__"`` of strings), then the data; offsets count
from byte ``8 + N``.  Tensor offsets are not 4 KiB aligned, so reads are
widened to the aligned cover and the tensor handed out as a view into it.
The header is checked as strictly as our own index: bounds against the real
file size before anything is allocated, dtypes, shapes, overlaps.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

from ..engine import Engine
from ..errors import FormatError
from .dtypes import FROM_SAFETENSORS
from .format import TensorInfo, check_shape, load_json
from .reader import SafetensorsSource, open_parsed

MAX_HEADER = 100 << 20  # what the safetensors library itself accepts
HF_INDEX = "model.safetensors.index.json"


def read_header(path: str, fd: int | None = None) -> tuple[list[TensorInfo], dict[str, Any]]:
    """Validate a safetensors header; returns tensor infos (absolute offsets) and
    ``__metadata__``.  Reads through ``fd`` if given (an open descriptor of ``path``)."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise FormatError(f"file is {size} bytes; a safetensors file starts with an 8-byte header length",
                              path=path, field="header_length")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER or n > size - 8:
            raise FormatError(f"header length {n} is outside 2..{min(MAX_HEADER, max(size - 8, 0))} (file is {size} "
                              "bytes)", path=path, field="header_length")
        raw = os.pread(fd, n, 8)
    finally:
        if own:
            os.close(fd)
    doc = load_json(raw, path, "header")
    if not isinstance(doc, dict):
        raise FormatError("header must be a JSON object", path=path, field="header")
    meta = doc.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) and _unicode(k + v) for k, v in meta.items()):
        raise FormatError("__metadata__ must map strings to strings", path=path, field="__metadata__")
    base, data_len = 8 + n, size - 8 - n
    infos = []
    for name, e in doc.items():
        where = f"{name!r}"
        if not name or "\0" in name or not _unicode(name):
            raise FormatError("tensor names must be non-empty, valid Unicode and free of NUL", path=path, field=where)
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise FormatError("entry needs dtype, shape and data_offsets", path=path, field=where)
        dt = FROM_SAFETENSORS.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        if dt is None:
            raise FormatError(f"unsupported dtype {e['dtype']!r}", path=path, field=f"{where}.dtype")
        shape = check_shape(e["shape"], path, f"{where}.shape")
        offs = e["data_offsets"]
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(v) is int for v in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise FormatError(f"data_offsets {str(offs)[:60]} must be [begin, end] inside the {data_len}-byte data "
                              "section", path=path, field=f"{where}.data_offsets")
        if offs[1] - offs[0] != math.prod(shape) * dt.itemsize:
            raise FormatError(f"shape {list(shape)} of {dt.name} needs {math.prod(shape) * dt.itemsize} bytes, "
                              f"data_offsets give {offs[1] - offs[0]}", path=path, field=f"{where}.data_offsets")
        infos.append(TensorInfo(name, dt, shape, base + offs[0], offs[1] - offs[0], None, {}, path))
    end, prev = 0, None
    for t in sorted((t for t in infos if t.nbytes), key=lambda t: t.offset):
        if t.offset < end:
            raise FormatError(f"tensor {t.name!r} overlaps {prev!r}", path=path, field="data_offsets")
        end, prev = t.offset + t.nbytes, t.name
    return infos, meta


def _unicode(s: str) -> bool:
    """False for strings JSON can carry but UTF-8 cannot (lone surrogates from ``\\ud800`` escapes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def open_safetensors(path: str | os.PathLike[str], *, verify: bool | str = True,
                     engine: Engine | None = None) -> SafetensorsSource:
    """Read one ``.safetensors`` file in place (it has no checksums to verify)."""
    p = os.fspath(path)

    def parse(fp: str, fd: int) -> tuple[list[TensorInfo], dict[str, Any]]:
        infos, meta = read_header(fp, fd)
        return infos, {"safetensors": meta}

    return open_parsed(SafetensorsSource, p, [p], parse, verify, engine)


def hf_files(path: str) -> list[str]:
    """The safetensors files of a Hugging Face model directory, in index order."""
    index = os.path.join(path, HF_INDEX)
    if os.path.exists(index):
        with open(index, "rb") as f:
            doc = load_json(f.read(MAX_HEADER + 1), index, "index")
        wmap = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise FormatError("weight_map must map tensor names to file names", path=index, field="weight_map")
        names = list(dict.fromkeys(wmap.values()))
        for n in names:
            if "/" in n or "\\" in n or n in (".", ".."):
                raise FormatError(f"bad shard file name {n!r}", path=index, field="weight_map")
        return [os.path.join(path, n) for n in names]
    files = sorted(e for e in os.listdir(path) if e.endswith(".safetensors"))
    if not files:
        raise FormatError("no llmtier index.json, model.safetensors.index.json or *.safetensors files here",
                          path=path, field="directory")
    return [os.path.join(path, n) for n in files]


def open_hf_dir(path: str, *, verify: bool | str = True, engine: Engine | None = None) -> SafetensorsSource:
    """Read a Hugging Face model directory's safetensors shards in place."""
    files = hf_files(path)
    for f in files:
        if not os.path.isfile(f):
            raise FormatError(f"shard {os.path.basename(f)} listed in the index is missing", path=path, field="shards")

    def check(infos: list[TensorInfo]) -> None:
        seen: dict[str, str] = {}
        for t in infos:
            if t.name in seen:
                raise FormatError(f"tensor {t.name!r} is in both {seen[t.name]} and {t.file}", path=path,
                                  field="shards")
            seen[t.name] = t.file

    meta: dict[str, Any] = {}
    config = os.path.join(path, "config.json")
    if os.path.isfile(config) and os.path.getsize(config) < 1 << 20:
        with open(config, "rb") as fh:
            try:
                meta["hf_config"] = json.loads(fh.read())
            except ValueError as exc:  # the weights are still readable; say why the config is missing
                meta["hf_config_error"] = f"config.json is not valid JSON: {str(exc)[:120]}"
    return open_parsed(SafetensorsSource, path, files, read_header, verify, engine, meta=meta, check=check)


__all__ = ["hf_files", "open_hf_dir", "open_safetensors", "read_header"]
