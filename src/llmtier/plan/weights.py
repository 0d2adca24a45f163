"""The weights' placement: which decoder layers stay resident, how many slots the streamed ones pass through.

The one place this is decided: :class:`llmtier.offload.layout.Layout` measures
a checkpoint's groups and asks :func:`make_plan` (CPU) or :func:`make_plan` +
:func:`plan_host_tier` (GPU) for the split; the planner
(:mod:`llmtier.plan.planner`) asks the same functions with sizes from the
memory model when there is no checkpoint yet.  Pure arithmetic: no I/O.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import BudgetError
from ..units import human

INFLIGHT_BYTES = 32 << 20  # what the read-ahead should keep in flight (engine default: 32 x 1 MiB)
MAX_SLOTS = 8
# Beyond the budget, a streamed model adds to the process's resident memory
# (measured in tests/test_offload_memory.py above a baseline with torch loaded):
# the skeleton, Python objects, activations and the KV cache of a small batch.
# Activations and KV grow with batch x context; docs/OFFLOAD.md has the formula.
RUN_OVERHEAD = 64 << 20


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
    # On a GPU (``device="cuda"``) the budget is GPU memory and two more tiers sit in host memory:
    device: str = "cpu"
    cached: list[int] = field(default_factory=list)  # streamed layers held in pinned host memory
    host_budget: int = 0
    host_layer_bytes: list[int] = field(default_factory=list)  # a layer's host buffer (its aligned reads)
    host_slots: int = 0  # pinned slots the disk reads of the other streamed layers land in
    host_slot_bytes: int = 0

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
    def from_disk(self) -> list[int]:
        """Streamed layers read from the disk on every pass (on a GPU: those not cached in host memory)."""
        cached = set(self.cached)
        return [i for i in self.streamed if i not in cached]

    @property
    def disk_bytes_per_pass(self) -> int:
        sizes = self.host_layer_bytes or self.layer_bytes
        return sum(sizes[i] for i in self.from_disk)

    @property
    def host_memory_bytes(self) -> int:
        """Pinned host memory of a GPU plan: cached layers and the disk's slots."""
        return sum(self.host_layer_bytes[i] for i in self.cached) + self.host_slots * self.host_slot_bytes

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
            where = "GPU " if self.device != "cpu" else ""
            lines.append(f"{self.slots} {where}slot buffers of {human(self.slot_bytes)} (prefetch depth {self.slots - 1}); "
                         f"weights take {human(self.memory_bytes)}{' of GPU memory' if where else ''}")
        if self.device != "cpu" and self.streamed:
            lines.append(f"host tier: {len(self.cached)} of {len(self.streamed)} streamed layers cached in pinned host "
                         f"memory, {len(self.from_disk)} read from the disk through {self.host_slots} pinned slots of "
                         f"{human(self.host_slot_bytes)}; {human(self.host_memory_bytes)} of host memory")
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
    reason = (f"resident layers {ranges(resident)} are spread between the streamed ones so their compute hides reads; "
              if resident else "no room for a resident layer beyond the slots: every layer streams; ")
    reason += "the embeddings and head are used every pass and never stream"
    return Plan(budget, outside, layers, resident, streamed, slots, slot_bytes, reason)


def plan_layers(budget: int, outside: int, embedding: int, layers: list[int], slot_bytes: int, prefetch: int | None = None,
                inflight_bytes: int = INFLIGHT_BYTES, on_demand: int | None = None) -> Plan:
    """The weights' plan with an input embedding table of ``embedding`` bytes (0: none, or tied to the head):
    everything resident when the whole model fits; otherwise the table is not held (each forward reads the rows
    of its tokens, ``on_demand`` bytes, default ``embedding``) and the rest is split by :func:`make_plan`."""
    if budget >= outside + embedding + sum(layers) or not embedding:
        return make_plan(budget, outside + embedding, layers, slot_bytes, prefetch, inflight_bytes)
    plan = make_plan(budget, outside, layers, slot_bytes, prefetch, inflight_bytes)
    plan.on_demand_bytes = embedding if on_demand is None else on_demand
    return plan


def adopt_plan(plan: Plan, outside: int, embedding: int, layers: list[int], slot_bytes: int | None = None) -> Plan:
    """``plan`` (made by the planner from the memory model's sizes) with a checkpoint's own sizes: the runtime's
    buffers (``outside`` bytes outside the layers, an untied ``embedding`` table, each layer's ``layers`` bytes) and
    the plan's decisions (resident layers, slot count, the embedding read by rows or held).  The sizes may differ by
    the reads' alignment; a plan made for another model (layer count) or whose resident set no longer fits its
    budget raises :class:`BudgetError`."""
    if len(layers) != len(plan.layer_bytes):
        raise BudgetError(f"the plan is for {len(plan.layer_bytes)} decoder layers, the checkpoint has {len(layers)}: "
                          "make the plan from this model")
    by_rows = bool(plan.on_demand_bytes) and embedding > 0
    out = dataclasses.replace(plan, outside_bytes=outside + (0 if by_rows else embedding), layer_bytes=list(layers),
                              resident=list(plan.resident), streamed=list(plan.streamed), cached=list(plan.cached),
                              slot_bytes=slot_bytes if slot_bytes is not None else max(layers, default=0),
                              on_demand_bytes=embedding if by_rows else 0)
    # the reads' alignment (a few KiB a layer) may pass the planner's sizes; more than 1% over is another model
    if out.memory_bytes > plan.budget + plan.budget // 100 + (out.slots + len(out.resident) + 1) * 8192:
        raise BudgetError(f"the plan's layers take {human(out.memory_bytes)} with this checkpoint's sizes, over its "
                          f"budget of {human(plan.budget)}: make the plan from this model directory")
    return out


def plan_host_tier(plan: Plan, host_layers: list[int], host_budget: int | None, prefetch: int | None = None,
                   inflight_bytes: int = INFLIGHT_BYTES) -> Plan:
    """Fill in the host tiers of a GPU ``plan``: which streamed layers stay in
    pinned host memory (``host_budget`` bytes; ``None``: none, every streamed
    layer comes from the disk) and the pinned slots the disk reads land in.
    Cached layers are spread over the streamed ones, as resident layers are
    over the depth, so that their copies alternate with disk reads."""
    plan.host_layer_bytes = list(host_layers)
    plan.host_budget = host_budget or 0
    streamed = plan.streamed
    if not streamed:
        return plan
    slot = max(host_layers[i] for i in streamed)
    total = sum(host_layers[i] for i in streamed)
    if host_budget is not None and total <= host_budget:
        plan.cached = list(streamed)
        plan.reason += "; every streamed layer fits the host budget: they are copied from pinned host memory"
        return plan
    want = prefetch + 1 if prefetch is not None else 1 + max(1, -(-inflight_bytes // max(1, slot)))
    slots = max(2, min(MAX_SLOTS, want, len(streamed) + 1))
    if host_budget is not None:
        if host_budget < 2 * slot:
            raise BudgetError(f"a host memory budget of {human(host_budget)} is below the least that streams from the "
                              f"disk to the GPU: 2 pinned slots of {human(slot)} = {human(2 * slot)}")
        slots = min(slots, host_budget // slot)
        room = host_budget - slots * slot
        for count in range(len(streamed) - 1, 0, -1):
            pick = [streamed[k] for k in spread(count, len(streamed))]
            if sum(host_layers[i] for i in pick) <= room:
                plan.cached = pick
                break
    plan.host_slots, plan.host_slot_bytes = slots, slot
    return plan


def ranges(xs: list[int]) -> str:
    out: list[str] = []
    for x in xs:
        if out and out[-1].split("-")[-1] == str(x - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        else:
            out.append(str(x))
    return ",".join(out)


__all__ = ["INFLIGHT_BYTES", "MAX_SLOTS", "RUN_OVERHEAD", "BudgetError", "Plan", "adopt_plan", "make_plan", "plan_host_tier",
           "plan_layers", "ranges", "spread"]
