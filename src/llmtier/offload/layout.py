"""How a model's weights lie in its checkpoint and what a budget can hold.

:func:`open_layout` builds the model on the meta device and groups its
checkpoint tensors by decoder layer, each group as few aligned reads as the
file allows; :func:`make_plan` splits a memory budget between resident
layers and the slots that streamed layers pass through.  Nothing here reads
tensor data; :mod:`llmtier.offload.weights` does.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..engine import Engine
from ..errors import LLMTierError
from ..store import dtypes
from ..store.format import ALIGN, TensorInfo
from ..store.reader import TensorSource, open_store
from ..units import human, resolve_size
from . import hf

_GAP = 64 << 10  # tensors of one group closer than this are read in one request
INFLIGHT_BYTES = 32 << 20  # what the read-ahead should keep in flight (engine default: 32 x 1 MiB)
MAX_SLOTS = 8
# Beyond the budget, a streamed model adds to the process's resident memory
# (measured in tests/test_offload_memory.py above a baseline with torch loaded):
# the skeleton, Python objects, activations and the KV cache of a small batch.
# Activations and KV grow with batch x context; docs/OFFLOAD.md has the formula.
RUN_OVERHEAD = 64 << 20


class BudgetError(LLMTierError, ValueError):
    """The memory budget cannot hold what streaming needs at the least."""


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
class Group:
    """The tensors read together: one decoder layer, or everything outside the layers."""

    name: str
    layer: int | None
    items: list[tuple[hf.Binding, TensorInfo, int]]  # binding, where on disk, offset in the group buffer
    runs: list[Run]
    nbytes: int  # size of the buffer the group needs
    data_bytes: int  # tensor bytes (what the model holds)


def make_group(name: str, layer: int | None, items: Sequence[tuple[hf.Binding, TensorInfo]]) -> Group:
    """Lay the tensors of a group out as few aligned reads as possible."""
    order = sorted(items, key=lambda bt: (bt[1].file, bt[1].offset))
    runs: list[Run] = []
    placed: list[tuple[hf.Binding, TensorInfo, int]] = []
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
    return Group(name, layer, placed, runs, nbytes, sum(t.nbytes for _, t in order))


# -- the plan ------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What stays in memory, what streams, and why."""

    budget: int
    outside_bytes: int  # head, norms (and a tied or fitting embedding table): always resident
    layer_bytes: list[int]
    resident: list[int]
    streamed: list[int]
    slots: int
    slot_bytes: int
    reason: str
    on_demand_bytes: int = 0  # the input embedding table, read row by row as tokens need it (0: resident)

    @property
    def resident_bytes(self) -> int:
        return self.outside_bytes + sum(self.layer_bytes[i] for i in self.resident)

    @property
    def memory_bytes(self) -> int:
        """What the weights take: resident data plus the slot pool."""
        return self.resident_bytes + self.slots * self.slot_bytes

    @property
    def streamed_bytes_per_pass(self) -> int:
        return sum(self.layer_bytes[i] for i in self.streamed)

    @property
    def resident_share(self) -> float:
        total = self.outside_bytes + sum(self.layer_bytes) + self.on_demand_bytes
        return self.resident_bytes / total if total else 1.0

    def describe(self) -> str:
        n = len(self.layer_bytes)
        lines = [f"budget {human(self.budget)}: {human(self.outside_bytes)} outside the layers (norm, head"
                 f"{'' if self.on_demand_bytes else ', embeddings'}) resident; {len(self.resident)} of {n} layers "
                 f"resident, {len(self.streamed)} streamed ({human(self.streamed_bytes_per_pass)} per forward pass)"]
        if self.on_demand_bytes:
            lines.append(f"the input embedding table ({human(self.on_demand_bytes)}) is not held: each forward reads "
                         "the rows of its tokens")
        if self.streamed:
            lines.append(f"{self.slots} slot buffers of {human(self.slot_bytes)} (prefetch depth {self.slots - 1}); "
                         f"weights take {human(self.memory_bytes)}")
        lines.append(self.reason)
        return "\n".join(lines)


def spread(count: int, n: int) -> list[int]:
    """``count`` of ``range(n)``, as evenly spaced as possible."""
    return sorted({int((j + 0.5) * n / count) for j in range(count)}) if count else []


def make_plan(budget: int, outside: int, layers: list[int], slot_bytes: int, prefetch: int | None = None,
              inflight_bytes: int = INFLIGHT_BYTES) -> Plan:
    """Choose resident layers and the slot count for ``budget`` bytes.

    The read-ahead slots must keep the device's queue full: enough of them
    that ``inflight_bytes`` (the engine's queue depth x chunk size) are being
    read while one slot computes -- two for layers of 32 MiB and more, up to
    :data:`MAX_SLOTS` for small layers -- but never so many that the budget
    cannot stream at all.  The rest of the budget goes to resident layers, a
    resident layer saving its reads on every pass.  ``prefetch`` sets the
    depth instead.  Resident layers are spread evenly so their compute
    overlaps the reads of the streamed ones.
    """
    n = len(layers)
    if outside + sum(layers) <= budget:
        return Plan(budget, outside, layers, list(range(n)), [], 0, slot_bytes,
                    "everything fits in the budget: nothing streams")
    if prefetch is not None and prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    if prefetch is not None:
        slots = prefetch + 1
    else:
        want = 1 + max(1, -(-inflight_bytes // max(1, slot_bytes)))
        fit = (budget - outside) // max(1, slot_bytes)
        slots = max(2, min(MAX_SLOTS, want, n + 1, fit))
    least = outside + slots * slot_bytes
    if budget < least:
        raise BudgetError(f"a memory budget of {human(budget)} is below the least this model streams with: "
                          f"{human(outside)} held outside the layers (head, norms) + {slots} layer buffers of "
                          f"{human(slot_bytes)} = {human(least)}")
    room = budget - least
    resident: list[int] = []
    for count in range(n - 1, 0, -1):
        pick = spread(count, n)
        if sum(layers[i] for i in pick) <= room:
            resident = pick
            break
    streamed = [i for i in range(n) if i not in set(resident)]
    reason = (f"resident layers {_ranges(resident) or 'none'} are spread between the streamed ones so their "
              f"compute hides reads; the embeddings and head are used every pass and never stream")
    return Plan(budget, outside, layers, resident, streamed, slots, slot_bytes, reason)


def _ranges(xs: list[int]) -> str:
    out: list[str] = []
    for x in xs:
        if out and out[-1].split("-")[-1] == str(x - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        else:
            out.append(str(x))
    return ",".join(out)


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
        if budget >= self.total_bytes or not self.embedding:
            return make_plan(budget, self.outside.nbytes + self.embedding_bytes, sizes, max(sizes, default=0),
                             prefetch)
        plan = make_plan(budget, self.outside.nbytes, sizes, max(sizes, default=0), prefetch)
        plan.on_demand_bytes = self.embedding_bytes
        return plan

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
        binds, _unused = hf.bindings(model, set(infos),
                                     lambda n: (infos[n].shape, dtypes.torch_dtype(infos[n].dtype)))
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
        if len(b.places) == 1 and b.places[0][0] is emb and b.places[0][1] == "weight" and len(t.shape) == 2:
            return (b, t)
    return None


__all__ = ["INFLIGHT_BYTES", "MAX_SLOTS", "RUN_OVERHEAD", "BudgetError", "Group", "Layout", "Plan", "Run",
           "make_group", "make_plan", "open_layout", "spread"]
