"""A storage layer for ``torch.distributed.checkpoint`` on llmtier's engine and store format.

>>> import torch.distributed.checkpoint as dcp                                  # doctest: +SKIP
>>> dcp.save(state, storage_writer=DCPWriter("ckpt/dcp-100"))
>>> dcp.load(state, storage_reader=DCPReader("ckpt/dcp-100"))               # any world size: DCP reshards

Each rank writes one llmtier store (``rank-NNNNN.lts``: direct I/O,
4 KiB-aligned, CRC-32C per item, fsync + atomic rename).  DCP calls
:meth:`DCPWriter.finish` on the coordinator only after every rank's
``write_data`` has returned, i.e. after every shard is durable; ``finish``
then writes ``.metadata.json`` (JSON, not pickle; temporary name, fsync,
rename, fsync of the directory): the checkpoint exists from that moment.
Reading checks every CRC; a damaged item raises ``ChecksumError``.
DCP's own planner turns non-tensor values into bytes with ``torch.save``
(that is DCP's format for them, not ours); the loader reads them back with
DCP's ``load_bytes``, which uses ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ..engine import Engine, alloc, open_engine
from ..errors import CheckpointError
from ..store import StoreWriter, dtypes, open_store
from ..store.format import crc32c
from ..store.writer import fsync_dir
from . import layout
from .staging import CHUNK, host_pieces
from .tree import decode, encode

METADATA = ".metadata.json"
FORMAT = "llmtier-dcp"


@dataclass(frozen=True)
class _Loc:
    """Where one DCP item lies: the rank file and the tensor's name in it."""

    file: str
    name: str


class DCPWriter(StorageWriter):
    """``torch.distributed.checkpoint`` StorageWriter writing llmtier stores into ``path``.

    ``overwrite=False`` refuses a directory that already holds a complete
    checkpoint; ``True`` removes its metadata before any shard is written,
    so a crash midway leaves an incomplete checkpoint, never a mixed one.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False, engine: Engine | None = None) -> None:
        super().__init__()
        self.path = os.path.abspath(os.fspath(path))
        self.overwrite = overwrite
        self._engine = engine
        self.is_coordinator = False
        self.rank = 0
        self.save_id = uuid.uuid4().hex

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id:
            self.path = os.path.abspath(os.fspath(checkpoint_id))
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = kwargs.get("rank") or 0

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        os.makedirs(self.path, exist_ok=True)
        if os.path.exists(os.path.join(self.path, METADATA)) and not self.overwrite:
            raise CheckpointError(f"{self.path} already holds a checkpoint; pass DCPWriter(..., overwrite=True)")
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        with contextlib.suppress(FileNotFoundError):  # from here the directory holds no complete checkpoint
            os.unlink(os.path.join(self.path, METADATA))
            fsync_dir(self.path)
        return [_replace_storage(p, layout.rank_file(i)) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        fname = plan.storage_data
        results = []
        bounce = None
        engine = self._engine or open_engine()
        try:
            with StoreWriter(os.path.join(self.path, fname), metadata={"format": FORMAT}, engine=engine,
                             tag=f"ckpt:dcp:{os.path.basename(self.path)}") as w:
                for k, item in enumerate(plan.items):
                    name = f"item{k:07d}"
                    data = planner.resolve_data(item)
                    if item.type == WriteItemType.BYTE_IO:
                        raw = np.frombuffer(data.getbuffer(), dtype=np.uint8)
                        w.add(name, raw, tags={"fqn": item.index.fqn})
                        n = raw.nbytes
                    else:
                        t = data.detach()
                        if t.device.type != "cpu" and bounce is None:
                            bounce = alloc(CHUNK)
                        sink = w.begin(name, dtypes.of(t), tuple(t.shape), tags={"fqn": item.index.fqn})
                        for piece in host_pieces(t, bounce):
                            sink.write(piece)
                        sink.close()
                        n = t.numel() * t.element_size()
                    results.append(WriteResult(index=item.index, size_in_bytes=n, storage_data=_Loc(fname, name)))
        finally:
            if self._engine is None:
                engine.close()
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rs in results for r in rs}
        metadata.storage_meta = self.storage_meta()
        body = _metadata_to_json(metadata)
        doc = {"crc32c": crc32c(layout.canonical(body)), "metadata": body}
        layout.write_atomic(os.path.join(self.path, METADATA), json.dumps(doc).encode())

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


class DCPReader(StorageReader):
    """``torch.distributed.checkpoint`` StorageReader for checkpoints written by :class:`DCPWriter`.

    Items whose stored chunk is exactly the requested one and whose target is
    a contiguous CPU tensor are read straight into the target; resharded
    requests read the stored chunk and copy the overlapping part.
    """

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True, engine: Engine | None = None) -> None:
        super().__init__()
        self.path = os.path.abspath(os.fspath(path))
        self.verify = verify
        self._engine = engine
        self.storage_data: dict[MetadataIndex, _Loc] = {}
        self.load_id = uuid.uuid4().hex

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.storage_data = {}
        if checkpoint_id:
            self.path = os.path.abspath(os.fspath(checkpoint_id))
        self.load_id = uuid.uuid4().hex

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = os.path.join(self.path, METADATA)
        try:
            with open(path, "rb") as f:
                raw = f.read(layout.MAX_MANIFEST + 1)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} holds no complete DCP checkpoint (no {METADATA})") from None
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("crc32c") != crc32c(layout.canonical(doc.get("metadata"))):
                raise ValueError("its CRC-32C does not match its content")
            md = _metadata_from_json(doc["metadata"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path} is damaged: {exc}") from None
        md.storage_meta = md.storage_meta or StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            per_file.setdefault(self.storage_data[req.storage_index].file, []).append(req)
        engine = self._engine or open_engine()
        try:
            for fname, reqs in per_file.items():
                if "/" in fname or fname.startswith("."):
                    raise CheckpointError(f"{self.path}: bad file name {fname!r} in the metadata")
                with open_store(os.path.join(self.path, fname), verify=self.verify, engine=engine) as st:
                    for req in reqs:
                        self._read_one(st, req, planner)
        finally:
            if self._engine is None:
                engine.close()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _read_one(self, st: Any, req: Any, planner: LoadPlanner) -> None:
        name = self.storage_data[req.storage_index].name
        if req.type == LoadItemType.BYTE_IO:
            planner.load_bytes(req, io.BytesIO(st.get(name).tobytes()))
            return
        info = st.info(name)
        target = planner.resolve_tensor(req).detach()
        whole = tuple(req.lengths) == info.shape and not any(req.storage_offsets)
        if whole and target.device.type == "cpu" and target.is_contiguous() and dtypes.of(target) == info.dtype \
                and tuple(target.shape) == info.shape:
            st.get(name, out=target)
        else:
            src = st.get_torch(name)
            for dim, (off, n) in enumerate(zip(req.storage_offsets, req.lengths)):
                src = src.narrow(dim, off, n)
            if target.shape != src.shape:
                raise CheckpointError(f"{req.storage_index.fqn}: stored chunk gives {list(src.shape)}, the target "
                                      f"wants {list(target.shape)}")
            target.copy_(src)
        planner.commit_tensor(req, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _replace_storage(plan: SavePlan, fname: str) -> SavePlan:
    import dataclasses  # noqa: PLC0415

    return dataclasses.replace(plan, storage_data=fname)


# -- Metadata <-> JSON ----------------------------------------------------------
def _size(x: Any) -> list[int] | None:
    return None if x is None else [int(v) for v in x]


def _metadata_to_json(md: Metadata) -> dict[str, Any]:
    sd = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, BytesStorageMetadata):
            sd[fqn] = {"bytes": True}
            continue
        p = m.properties
        sd[fqn] = {"dtype": str(p.dtype).removeprefix("torch."), "layout": str(p.layout).removeprefix("torch."),
                   "requires_grad": bool(p.requires_grad), "memory_format": str(p.memory_format).removeprefix("torch."),
                   "pin_memory": bool(p.pin_memory), "size": _size(m.size),
                   "chunks": [[_size(c.offsets), _size(c.sizes)] for c in m.chunks]}
    storage = [[i.fqn, _size(i.offset), i.index, loc.file, loc.name] for i, loc in md.storage_data.items()]
    planner, _ = encode(md.planner_data)  # plain data only (DCP's default planner: fqn -> key path)
    sm = md.storage_meta
    meta = None if sm is None else {"checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
                                    "save_id": sm.save_id, "modules": list(sm.modules)}
    return {"format": FORMAT, "version": 1, "dcp_version": md.version, "state_dict": sd, "storage": storage,
            "planner": planner, "storage_meta": meta}


def _metadata_from_json(doc: dict[str, Any]) -> Metadata:
    if doc.get("format") != FORMAT or doc.get("version") != 1:
        raise ValueError(f"not a version-1 {FORMAT} metadata file")
    sd: dict[str, Any] = {}
    for fqn, m in doc["state_dict"].items():
        if m.get("bytes"):
            sd[fqn] = BytesStorageMetadata()
            continue
        props = TensorProperties(dtype=getattr(torch, m["dtype"]), layout=getattr(torch, m["layout"]),
                                 requires_grad=m["requires_grad"], memory_format=getattr(torch, m["memory_format"]),
                                 pin_memory=m["pin_memory"])
        sd[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(m["size"]),
                                        chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
                                                for o, s in m["chunks"]])
    storage = {MetadataIndex(fqn=f, offset=None if o is None else torch.Size(o), index=i): _Loc(fn, n)
               for f, o, i, fn, n in doc["storage"]}
    planner = decode(doc["planner"], lambda leaf, path: (_ for _ in ()).throw(ValueError("tensor in planner data")))
    sm = doc.get("storage_meta")
    meta = None if sm is None else StorageMeta(checkpoint_id=sm["checkpoint_id"], save_id=sm["save_id"],
                                                modules=list(sm["modules"]))
    return Metadata(state_dict_metadata=sd, planner_data=planner, storage_data=storage, storage_meta=meta,
                    version=doc.get("dcp_version"))
