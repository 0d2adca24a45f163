"""Convert a checkpoint (safetensors file or Hugging Face model directory, or
another store) into an llmtier store, and describe any of them.

Conversion streams: each tensor is read in row chunks of at most
``chunk_bytes`` (direct I/O, no page cache), optionally cast, and written
through the store writer's staging buffers, so resident memory stays near the
chunk size plus the staging buffers whatever the model size.  Tensors are
reordered so that each decoder layer is one contiguous range of the store
(embeddings first, then layer 0, 1, ..., then the final norm and head) and
tagged with their layer index and kind.
"""
from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ..engine import Engine
from . import dtypes
from .format import ALIGN, crc32c
from .reader import TensorSource, open_store
from .writer import STAGE_BYTES, StoreWriter

CHUNK_BYTES = 64 << 20
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_KINDS = [  # first match wins
    ("embed", re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.|tok_embeddings")),
    ("lm_head", re.compile(r"lm_head|(?:^|\.)output\.weight$")),
    ("norm", re.compile(r"norm|(?:^|\.)ln_|(?:^|\.)ln\.")),
    ("attn", re.compile(r"attn|attention|(?:q|k|v|o|qkv)_proj")),
    ("mlp", re.compile(r"mlp|ffn|feed_forward|experts|(?:gate|up|down)_proj|(?:^|\.)w[123]\.")),
]
_FLOAT = {"float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
          "float8_e5m2fnuz"}


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def kind_of(name: str) -> str:
    for kind, rx in _KINDS:
        if rx.search(name):
            return kind
    return "other"


def tags_for(name: str) -> dict[str, Any]:
    layer = layer_of(name)
    tags: dict[str, Any] = {"kind": kind_of(name)}
    if layer is not None:
        tags["layer"] = layer
    return tags


def layer_order(names: list[str]) -> list[str]:
    """Embeddings, then each layer's tensors together in layer order, then the rest."""
    def key(item: tuple[int, str]) -> tuple[int, int, int]:
        i, n = item
        layer = layer_of(n)
        if layer is not None:
            return (1, layer, i)
        return (0 if kind_of(n) == "embed" else 2, 0, i)

    return [n for _, n in sorted(enumerate(names), key=key)]


@dataclass
class ConvertResult:
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    path: str

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, dtype: str | None = None,
            max_shard_bytes: int | None = None, chunk_bytes: int = CHUNK_BYTES, engine: Engine | None = None,
            progress: bool = True, stage_bytes: int = STAGE_BYTES) -> ConvertResult:
    """Convert ``src`` into a store at ``dst`` (committed atomically at the end).

    ``dtype``: cast floating-point tensors to this dtype (``"bfloat16"``,
    ``"float16"``, ...); integer and bool tensors are kept as they are.
    """
    to = dtypes.lookup(dtype) if dtype else None
    if to is not None and to.name not in _FLOAT:
        raise ValueError(f"--dtype must be a floating-point dtype, got {to.name}")
    t0 = time.perf_counter()
    with open_store(src, engine=engine) as source:
        names = layer_order(source.keys())
        total = source.nbytes
        meta = dict(source.metadata)
        meta.update({"source": os.path.basename(os.path.abspath(os.fspath(src))),
                     "source_format": getattr(source, "format", "?")})
        if to is not None:
            meta["cast_to"] = to.name
        written = 0
        with StoreWriter(dst, metadata=meta, max_shard_bytes=max_shard_bytes, engine=engine,
                         stage_bytes=stage_bytes) as w, \
                tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
            for name in names:
                written += _copy_tensor(source, w, name, to, chunk_bytes, bar)
    return ConvertResult(len(names), total, written, time.perf_counter() - t0, os.fspath(dst))


def _copy_tensor(source: TensorSource, w: StoreWriter, name: str, to: dtypes.DType | None, chunk_bytes: int,
                 bar: tqdm) -> int:
    info = source.info(name)
    cast = to if to is not None and info.dtype.name in _FLOAT and info.dtype != to else None
    out_dt = cast or info.dtype
    sink = w.begin(name, out_dt, info.shape, tags={**tags_for(name), **info.tags})
    crc = 0
    if not info.shape or info.nbytes == 0 or info.nbytes <= chunk_bytes:
        spans = [None]
    else:
        step = max(1, chunk_bytes // max(1, info.row_bytes))
        spans = [slice(a, min(a + step, info.shape[0])) for a in range(0, info.shape[0], step)]
    for rows in spans:
        if rows is None:
            raw = source.get(name, verify=True).reshape(-1).view("uint8") if info.nbytes else None
        else:
            raw = source.get(name, rows=rows).reshape(-1).view("uint8")
            crc = crc32c(raw, crc)
        if raw is None:
            continue
        sink.write(_cast(raw, info.dtype, cast) if cast else raw)
        bar.update(raw.nbytes)
    if spans[0] is not None and info.crc32c is not None and crc != info.crc32c:
        from ..errors import ChecksumError  # noqa: PLC0415

        raise ChecksumError(f"tensor {name!r}: CRC-32C mismatch while converting (damaged source)",
                            path=info.file, field=name)
    sink.close()
    return sink.nbytes


def _cast(raw: Any, src: dtypes.DType, dst: dtypes.DType) -> Any:
    import torch  # noqa: PLC0415 - casting needs torch (bf16, fp8)

    return torch.from_numpy(raw).view(dtypes.torch_dtype(src)).to(dtypes.torch_dtype(dst)).view(torch.uint8)


# -- inspect -------------------------------------------------------------------
def describe(path: str | os.PathLike[str], *, verify: bool = False) -> dict[str, Any]:
    """A summary of any readable source: tensors, bytes per layer and kind,
    alignment, checksum status (``verify``: read everything and check)."""
    with open_store(path, verify=False) as s:
        infos = s.infos()
        per_layer: dict[str, int] = defaultdict(int)
        per_kind: dict[str, int] = defaultdict(int)
        per_dtype: dict[str, int] = defaultdict(int)
        for t in infos:
            tags = t.tags or tags_for(t.name)
            layer = tags.get("layer")
            per_layer["-" if layer is None else str(layer)] += t.nbytes
            per_kind[str(tags.get("kind", kind_of(t.name)))] += t.nbytes
            per_dtype[t.dtype.name] += t.nbytes
        files = sorted({t.file for t in infos})
        aligned = sum(1 for t in infos if t.offset % ALIGN == 0)
        summary: dict[str, Any] = {
            "path": os.fspath(path), "format": getattr(s, "format", "?"), "files": len(files),
            "file_bytes": sum(os.path.getsize(f) for f in files), "tensors": len(infos), "bytes": s.nbytes,
            "aligned_tensors": aligned, "per_layer": dict(per_layer), "per_kind": dict(per_kind),
            "per_dtype": dict(per_dtype), "metadata_keys": sorted(s.metadata),
            "checksums": "CRC-32C per tensor (not verified; use --verify)" if s.has_checksums
            else "none (this format records no checksums)",
            "tensor_list": [t.to_json() | {"file": os.path.basename(t.file)} for t in infos],
        }
        if verify and s.has_checksums:
            bad = s.verify()
            summary["checksums"] = f"verified: {len(infos) - len(bad)} ok, {len(bad)} bad"
            summary["bad_tensors"] = bad
        return summary


__all__ = ["ConvertResult", "convert", "describe", "kind_of", "layer_of", "layer_order", "tags_for"]
