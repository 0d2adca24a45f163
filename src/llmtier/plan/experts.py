"""Resident MoE experts: how one DRAM budget splits between the dense weights and the expert cache.

Expert-granular streaming (:mod:`llmtier.offload.moe`) keeps a MoE model's
dense part (head, embeddings, attention, routers, shared experts) like any
model's weights and caches the routed experts one by one.  How much of the
budget each gets is decided here, by :func:`split_budget_for_experts`, from
sizes only: the runtime passes the sizes it measured in the checkpoint, the
planner (:func:`llmtier.plan.planner.choose_experts`) the memory model's.
Pure arithmetic: no I/O.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import BudgetError
from ..units import human
from .weights import Plan, make_plan


class ExpertBudgetError(BudgetError, ValueError):
    """The budget cannot hold the least expert cache (every expert of the largest MoE layer and ``top_k`` more)."""


class ExpertSizes(Protocol):
    """What the split needs of one MoE layer (``llmtier.offload.experts.MoELayer`` has these)."""

    num_experts: int
    top_k: int
    expert_bytes: int  # one expert's bytes


@dataclass
class ExpertLayer:
    """One MoE layer's sizes as the memory model gives them (the planner's :class:`ExpertSizes`)."""

    layer: int
    num_experts: int
    top_k: int
    expert_bytes: int


@dataclass
class ExpertPlan:
    """The budget split: ``dense`` (a :class:`Plan` of the layers without their
    experts) and ``cache_bytes`` of DRAM for experts."""

    dense: Plan
    cache_bytes: int
    least_cache_bytes: int
    expert_bytes: int  # all routed experts of the model
    reason: str

    @property
    def memory_bytes(self) -> int:
        """What the weights take: the dense plan's memory and the expert cache."""
        return self.dense.memory_bytes + self.cache_bytes

    def describe(self) -> str:
        return self.dense.describe() + "\n" + self.reason


def least_expert_cache(moe: Sequence[ExpertSizes]) -> int:
    """The smallest expert cache: every expert of the largest MoE layer (a prefill can route to all of them at once)
    plus ``top_k`` experts more for a prediction in flight."""
    return max((m.num_experts * m.expert_bytes + m.top_k * m.expert_bytes for m in moe), default=0)


def split_budget_for_experts(budget: int, outside: int, dense_layers: list[int], moe: Sequence[ExpertSizes],
                             prefetch: int | None = None) -> ExpertPlan:
    """Split ``budget`` bytes between the dense weights and the expert cache.

    The one place this decision is made.  The cache must hold at least
    :func:`least_expert_cache`.  The dense part (head, embeddings, attention,
    routers, shared experts) is used by every token, so it is held whole
    when it fits beside that least cache, and the cache gets the rest;
    otherwise the dense layers stream (:func:`make_plan`) in what the least
    cache leaves.
    """
    least = least_expert_cache(moe)
    total_experts = sum(m.num_experts * m.expert_bytes for m in moe)
    dense_total = outside + sum(dense_layers)
    if budget >= dense_total + total_experts:
        dense = make_plan(budget, outside, dense_layers, max(dense_layers, default=0), prefetch)
        return ExpertPlan(dense, total_experts, least, total_experts, "every expert fits: the cache holds them all")
    if budget >= dense_total + least:
        dense = make_plan(dense_total, outside, dense_layers, max(dense_layers, default=0), prefetch)
        cache = budget - dense_total
    else:
        if budget < least:
            top_k = max((m.top_k for m in moe), default=0)
            raise ExpertBudgetError(f"a memory budget of {human(budget)} is below the least expert cache: every expert "
                                    f"of a layer and {top_k} more ({human(least)})")
        dense = make_plan(budget - least, outside, dense_layers, max(dense_layers, default=0), prefetch)
        cache = budget - dense.memory_bytes
    count = sum(1 for _ in moe)
    dense.budget = budget
    return ExpertPlan(dense, cache, least, total_experts,
                      f"expert cache: {human(cache)} of DRAM for the routed experts of {count} MoE layers "
                      f"({human(total_experts)}, {cache / max(1, total_experts):.0%} of them fit)")


__all__ = ["ExpertBudgetError", "ExpertLayer", "ExpertPlan", "ExpertSizes", "least_expert_cache", "split_budget_for_experts"]
