"""How a model's weights lie in its checkpoint and what a budget can hold.

:func:`open_layout` builds the model on the meta device and groups its
checkpoint tensors by decoder layer, each group as few aligned reads as the
file allows; :func:`llmtier.plan.weights.make_plan` splits a memory budget between resident
layers and the slots that streamed layers pass through.  Nothing here reads
tensor data; :mod:`llmtier.offload.weights` does.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine import Engine
from ..plan.weights import (  # the decision lives in the planner; re-exported for the runtimes
    INFLIGHT_BYTES,
    MAX_SLOTS,
    RUN_OVERHEAD,
    BudgetError,
    Plan,
    make_plan,
    plan_host_tier,
    plan_layers,
    spread,
)
from ..store import dtypes
from ..store.format import ALIGN, TensorInfo
from ..store.reader import TensorSource, open_store
from ..units import resolve_size
from . import hf, mapping

_GAP = 64 << 10  # tensors of one group closer than this are read in one request


# -- what to read --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One read: ``length`` bytes of ``file`` at ``start`` into the group buffer at ``pos``."""

    file: str
    start: int
    length: int
    pos: int
    need: int  # bytes that must arrive (the rest is alignment padding past the data)


@dataclass
class FusedInfo:
    """A parameter transformers assembles from several checkpoint tensors (an
    MoE layer's experts): its pieces, each read straight to its place."""

    name: str
    dtype: Any  # the store dtype of its sources
    shape: tuple[int, ...]
    nbytes: int
    pieces: list[tuple[TensorInfo, mapping.Piece]]
    converter: str = ""
    crc32c: int | None = None  # checked per source tensor (Group.checks)
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return self.pieces[0][0].file

    @property
    def offset(self) -> int:
        return self.pieces[0][0].offset + self.pieces[0][1].src

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def fused_info(f: mapping.Fused, infos: dict[str, TensorInfo]) -> FusedInfo:
    srcs = [infos[p.source] for p in f.pieces]
    return FusedInfo(f.name, srcs[0].dtype, tuple(f.shape), sum(p.nbytes for p in f.pieces),
                     list(zip(srcs, f.pieces)), f.converter)


@dataclass
class Group:
    """The tensors read together: one decoder layer, or everything outside the layers."""

    name: str
    layer: int | None
    items: list[tuple[hf.Binding, Any, int]]  # binding, where on disk (TensorInfo, FusedInfo), offset in the buffer
    runs: list[Run]
    nbytes: int  # size of the buffer the group needs
    data_bytes: int  # tensor bytes (what the model holds)
    # checksums of the sources of fused tensors: (source, [(buffer position, bytes)] in source order)
    checks: list[tuple[TensorInfo, list[tuple[int, int]]]] = field(default_factory=list)


def make_group(name: str, layer: int | None, items: Sequence[tuple[hf.Binding, Any]]) -> Group:
    """Lay the tensors of a group out as few aligned reads as possible; a fused
    tensor gets a region of its own after them, each piece read to its place."""
    fused = [(b, t) for b, t in items if isinstance(t, FusedInfo)]
    order = sorted(((b, t) for b, t in items if not isinstance(t, FusedInfo)), key=lambda bt: (bt[1].file, bt[1].offset))
    runs: list[Run] = []
    placed: list[tuple[hf.Binding, Any, int]] = []
    pos = 0
    cur: Run | None = None
    for b, t in order:
        if cur is None or t.file != cur.file or t.offset - (cur.start + cur.need) > _GAP \
                or t.offset < cur.start + cur.need:
            if cur is not None:
                pos = cur.pos + cur.length
            start = t.offset - t.offset % ALIGN
            cur = Run(t.file, start, 0, pos, 0)
            runs.append(cur)
        cur.need = max(cur.need, t.offset + t.nbytes - cur.start)
        cur.length = -(-cur.need // ALIGN) * ALIGN
        placed.append((b, t, cur.pos + t.offset - cur.start))
    nbytes = runs[-1].pos + runs[-1].length if runs else 0
    spans: dict[str, tuple[TensorInfo, list[tuple[int, int, int]]]] = {}
    for b, t in fused:
        region = -(-nbytes // ALIGN) * ALIGN
        placed.append((b, t, region))
        for src, p in sorted(t.pieces, key=lambda sp: (sp[0].file, sp[0].offset + sp[1].src)):
            last = runs[-1] if runs else None
            at = src.offset + p.src
            if last is not None and last.file == src.file and last.start + last.need == at \
                    and last.pos + last.need == region + p.dst and last.length == last.need:
                last.length += p.nbytes
                last.need += p.nbytes
            else:
                runs.append(Run(src.file, at, p.nbytes, region + p.dst, p.nbytes))
            spans.setdefault(src.name, (src, []))[1].append((p.src, region + p.dst, p.nbytes))
        nbytes = region + t.nbytes
    checks = []
    for src, parts in spans.values():  # a source read whole (in pieces) can be checked whole
        parts.sort()
        if src.crc32c is not None and sum(n for _, _, n in parts) == src.nbytes and parts[0][0] == 0:
            checks.append((src, [(pos, n) for _, pos, n in parts]))
    return Group(name, layer, placed, runs, nbytes, sum(t.nbytes for _, t in items), checks)


DEVICE_ALIGN = 256  # where each tensor starts in a GPU buffer: what the allocator gives a parameter of its own


def device_items(g: Group) -> tuple[list[tuple[hf.Binding, TensorInfo, int, int]], int]:
    """Group ``g`` laid out in device memory: ``(binding, tensor, host pos, device pos)``
    per tensor, each at a :data:`DEVICE_ALIGN` boundary (the kernels see the
    alignment they would see in a model loaded onto the GPU), and the size."""
    out, pos = [], 0
    for b, t, hpos in g.items:
        out.append((b, t, hpos, pos))
        pos += -(-t.nbytes // DEVICE_ALIGN) * DEVICE_ALIGN
    return out, pos


@dataclass
class Layout:
    """A model skeleton matched with its checkpoint: what each group reads."""

    source: TensorSource
    model: Any
    layers_prefix: str
    groups: list[Group]
    outside: Group  # without the input embedding table when that can be read by rows
    embedding: tuple[hf.Binding, TensorInfo] | None = None  # an untied nn.Embedding table

    @property
    def embedding_bytes(self) -> int:
        return self.embedding[1].nbytes if self.embedding else 0

    def plan(self, memory: int | str, prefetch: int | None = None) -> Plan:
        """The plan for ``memory`` (bytes, ``"4GiB"``, ``"50%"`` of the weights or
        ``"25%ram"`` of the memory available): everything resident when the whole model
        fits; otherwise the embedding table (if untied) is read by rows and the
        rest of the budget is split by :func:`make_plan`."""
        budget = resolve_size(memory, whole=self.total_bytes, what="the weights")
        sizes = [g.nbytes for g in self.groups]
        return plan_layers(budget, self.outside.nbytes, self.embedding_bytes, sizes, max(sizes, default=0), prefetch)

    def device_plan(self, memory: int | str, host_memory: int | str | None = None,
                    prefetch: int | None = None) -> Plan:
        """The plan on a GPU: ``memory`` bytes of GPU memory hold the layers
        outside, resident layers spread over the depth and the GPU slots the
        streamed layers are copied into (three: one computing, one being
        copied, one queued); ``host_memory`` bytes of pinned host memory cache
        streamed layers and hold the disk's slots (see :func:`plan_host_tier`)."""
        budget = resolve_size(memory, whole=self.total_bytes, what="the weights")
        sizes = [device_items(g)[1] for g in self.groups]
        outside = device_items(self.outside)[1]
        emb = -(-self.embedding_bytes // DEVICE_ALIGN) * DEVICE_ALIGN
        slot = max(sizes, default=0)
        plan = plan_layers(budget, outside, emb, sizes, slot, prefetch, inflight_bytes=2 * slot,
                           on_demand=self.embedding_bytes)
        plan.device = "cuda"
        host = resolve_size(host_memory, whole=self.total_bytes, what="the weights") if host_memory is not None else None
        return plan_host_tier(plan, [g.nbytes for g in self.groups], host, prefetch)

    @property
    def least_memory(self) -> int:
        """The smallest budget that streams (everything outside the layers but
        the embedding table + two slots)."""
        return self.outside.nbytes + 2 * max((g.nbytes for g in self.groups), default=0)

    @property
    def total_bytes(self) -> int:
        return self.outside.nbytes + self.embedding_bytes + sum(g.nbytes for g in self.groups)


def open_layout(path: str | os.PathLike[str], *, dtype: Any = None, engine: Engine | None = None) -> Layout:
    """Open ``path`` (model directory or store), build the model on the meta
    device and group its tensors by decoder layer; reads no tensor data.
    Close ``layout.source`` when not handing it to a :class:`WeightStreamer`."""
    import torch  # noqa: PLC0415

    p = os.fspath(path)
    hf.check_model_path(p)
    source = open_store(p, verify=False, engine=engine)
    try:
        config = hf.load_config(p, source.metadata)
        infos = {t.name: t for t in source.infos()}
        if dtype is not None:  # a compute dtype other than the checkpoint's: floating-point tensors are cast at load
            dtype = dtypes.as_torch(dtype)
            if not dtype.is_floating_point:
                raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        else:  # the checkpoint's: that of its largest floating-point tensor
            big = max((t for t in infos.values() if t.dtype.name.startswith(("float", "bfloat"))),
                      key=lambda t: t.nbytes, default=None)
            dtype = dtypes.torch_dtype(big.dtype) if big is not None else torch.float32
        model = hf.build_skeleton(config, dtype)
        hf.load_generation_config(model, p)
        prefix, layer_list = hf.decoder_layers(model)
        smap = mapping.source_map(model, set(infos), lambda n: infos[n].shape, lambda n: infos[n].dtype.itemsize)
        for target, src in smap.items():
            if isinstance(src, mapping.Fused):
                infos[target] = fused_info(src, infos)  # type: ignore[assignment]
        renames = {k: (v if isinstance(v, str) else k) for k, v in smap.items()}
        binds, _unused = hf.bindings(model, set(infos),
                                     lambda n: (infos[n].shape, dtypes.torch_dtype(infos[n].dtype)), renames)
        per_layer: dict[int, list] = {i: [] for i in range(len(layer_list))}
        outside: list = []
        layer_of = {id(m): i for i, layer in enumerate(layer_list) for m in layer.modules()}
        for name, b in binds.items():
            idx = {layer_of.get(id(m)) for m, _, _ in b.places}
            i = next(iter(idx)) if len(idx) == 1 else None
            (per_layer[i] if i is not None else outside).append((b, infos[name]))
        groups = [make_group(f"{prefix}.{i}", i, per_layer[i]) for i in range(len(layer_list))]
        embedding = _row_readable_embedding(model, outside)
        if embedding is not None:
            outside.remove(embedding)
        return Layout(source, model, prefix, groups, make_group("outside", None, outside), embedding)
    except BaseException:
        source.close()
        raise


def _row_readable_embedding(model: Any, outside: list) -> tuple[hf.Binding, TensorInfo] | None:
    """The input embedding's (binding, tensor) when it is a plain ``nn.Embedding``
    whose table is used nowhere else (not tied to the head): then only the
    rows of the tokens at hand are needed, and the table need not be held."""
    import torch  # noqa: PLC0415

    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # no input embedding to speak of: the table is held
        return None
    if not isinstance(emb, torch.nn.Embedding) or emb.max_norm is not None:
        return None
    for b, t in outside:
        if isinstance(t, FusedInfo):
            continue
        if len(b.places) == 1 and b.places[0][0] is emb and b.places[0][1] == "weight" and len(t.shape) == 2:
            return (b, t)
    return None


__all__ = ["INFLIGHT_BYTES", "MAX_SLOTS", "RUN_OVERHEAD", "BudgetError", "DEVICE_ALIGN", "Group", "Layout", "Plan", "Run",
           "FusedInfo", "device_items", "fused_info", "make_group", "make_plan", "open_layout", "plan_host_tier", "spread"]
