"""The routed experts of a MoE model as units of hot and cold: where each
expert's bytes lie, the DRAM expert cache and its policies, and how a memory
budget is split between the dense weights and that cache.

An expert ``e`` of an MoE layer is row ``e`` of every fused expert parameter
(``experts.gate_up_proj[e]``, ``experts.down_proj[e]``); through the
conversion mapping (:mod:`llmtier.offload.mapping`) that row is a few byte
ranges of the checkpoint (``experts.e.w1``, ``w3``, ``w2`` in Mixtral's),
each read straight to its place.  Nothing here reads tensor data;
:mod:`llmtier.offload.moe` does.

Policies decide which resident expert leaves when room is needed:

* ``lru``: the least recently used;
* ``lfu``: the least frequently used so far (ties: the least recent);
* ``profile``: expert frequencies measured on calibration prompts
  (:class:`ExpertProfile`, saved beside the model as
  ``llmtier-experts.json``) pin the hottest experts that fit in half the
  cache; the rest of the cache is LRU.
"""
from __future__ import annotations

import inspect
import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..errors import LLMTierError
from ..plan.experts import ExpertPlan, split_budget_for_experts  # the budget split is the planner's; re-exported
from ..store.format import ALIGN
from .layout import Group, Layout, make_group

PROFILE_NAME = "llmtier-experts.json"
POLICIES = ("lru", "lfu", "profile")
PROFILE_PIN_SHARE = 0.5  # of the cache, at most, pinned by the profile policy


class ExpertError(LLMTierError, ValueError):
    """The model has no routed experts that expert streaming handles, or a
    profile / policy that does not fit it."""


# -- where experts lie -----------------------------------------------------------------------------------------------
@dataclass
class Extent:
    """``nbytes`` at ``offset`` of ``file`` go to byte ``dst`` of expert parameter ``param``'s buffer."""

    file: str
    offset: int
    nbytes: int
    param: int
    dst: int


@dataclass
class MoELayer:
    """The routed experts of one decoder layer."""

    layer: int
    name: str  # module path of the experts module
    module: Any
    num_experts: int
    top_k: int
    params: list[tuple[Any, Any]]  # (binding, TensorInfo or FusedInfo): the fused [E, ...] parameters
    extents: list[list[Extent]]  # per expert
    expert_bytes: int
    router: tuple[str, str | None] | None = None  # (router weight tensor, score-correction bias tensor) in the checkpoint
    checks: list[list[tuple[Any, list[tuple[int, int, int]]]]] = field(default_factory=list)  # per expert: crc spans

    @property
    def read_bytes(self) -> list[int]:
        """Per expert, the bytes its reads move: each extent widened to :data:`ALIGN` (direct I/O)."""
        return [sum(-(-(x.offset + x.nbytes) // ALIGN) * ALIGN - x.offset // ALIGN * ALIGN for x in ex)
                for ex in self.extents]

    @property
    def row_bytes(self) -> list[int]:
        return [info.nbytes // self.num_experts for _, info in self.params]


def _is_experts_module(m: Any) -> bool:
    """transformers 5's routed experts: ``forward(hidden_states, top_k_index, top_k_weights)`` over
    parameters whose first dimension is the expert index."""
    n = getattr(m, "num_experts", None)
    if not isinstance(n, int) or n < 1:
        return False
    try:
        names = list(inspect.signature(type(m).forward).parameters)
    except (TypeError, ValueError):
        return False
    if "top_k_index" not in names:
        return False
    ps = list(m._parameters.values())
    return bool(ps) and all(p is not None and p.dim() >= 2 and p.shape[0] == n for p in ps) \
        and not any(True for c in m.children() for _ in c.parameters())


def _expert_extents(info: Any, num: int, param: int) -> tuple[list[list[Extent]], list[list[tuple[Any, list]]]]:
    """Per expert, the reads of its row of one fused parameter, and per source tensor read whole, its spans."""
    row = info.nbytes // num
    out: list[list[Extent]] = [[] for _ in range(num)]
    checks: list[dict[str, tuple[Any, list]]] = [{} for _ in range(num)]
    pieces = getattr(info, "pieces", None)
    if pieces is None:  # a checkpoint tensor already fused [E, ...]: expert e is row e
        for e in range(num):
            out[e].append(Extent(info.file, info.offset + e * row, row, param, e * row))
        return out, [[] for _ in range(num)]
    for src, p in pieces:
        e0, e1 = p.dst // row, (p.dst + p.nbytes - 1) // row
        if e0 != e1:
            raise ExpertError(f"{info.name}: a checkpoint piece spans experts {e0} and {e1}; expert streaming needs "
                              "each expert's bytes apart")
        out[e0].append(Extent(src.file, src.offset + p.src, p.nbytes, param, p.dst))
        checks[e0].setdefault(src.name, (src, []))[1].append((p.src, param, p.dst, p.nbytes))
    crc: list[list[tuple[Any, list]]] = []
    for e in range(num):
        mine = []
        for src, spans in checks[e].values():
            spans.sort()
            if src.crc32c is not None and spans[0][0] == 0 and sum(s[3] for s in spans) == src.nbytes:
                mine.append((src, [(pi, d, n) for _, pi, d, n in spans]))
        crc.append(mine)
    return out, crc


def find_experts(layout: Layout) -> tuple[list[MoELayer], list[Group]]:
    """The MoE layers of ``layout`` and its layer groups without the routed
    experts (attention, router, shared experts and norms: the dense part)."""
    modules = dict(layout.model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    found: list[MoELayer] = []
    dense: list[Group] = []
    for g in layout.groups:
        keep, mine = [], {}
        for b, t, _ in g.items:
            owners = {id(m) for m, _, _ in b.places}
            m = b.places[0][0]
            if len(owners) == 1 and _is_experts_module(m):
                mine.setdefault(id(m), (m, []))[1].append((b, t))
            else:
                keep.append((b, t))
        if not mine:
            dense.append(g)
            continue
        if len(mine) > 1:
            raise ExpertError(f"{g.name}: more than one routed-experts module in a layer")
        m, params = next(iter(mine.values()))
        if any(b.places[0][2] is False for b, _ in params):
            raise ExpertError(f"{names[id(m)]}: expert buffers are not supported")
        params.sort(key=lambda bt: bt[0].places[0][1])
        num = m.num_experts
        extents: list[list[Extent]] = [[] for _ in range(num)]
        checks: list[list] = [[] for _ in range(num)]
        for pi, (_, t) in enumerate(params):
            if t.nbytes % num:
                raise ExpertError(f"{t.name}: {t.nbytes} bytes do not split into {num} experts")
            ex, ck = _expert_extents(t, num, pi)
            for e in range(num):
                extents[e] += ex[e]
                checks[e] += ck[e]
        name = names[id(m)]
        found.append(MoELayer(g.layer, name, m, num, _top_k(modules, name), params, extents,
                              sum(t.nbytes for _, t in params) // num, _router(g, modules, name), checks))
        dense.append(make_group(g.name, g.layer, keep))
    if not found:
        raise ExpertError(f"{type(layout.model).__name__}: no routed experts that expert streaming handles "
                          "(a module with forward(hidden_states, top_k_index, top_k_weights) over [E, ...] parameters)")
    return found, dense


def _top_k(modules: dict[str, Any], experts_name: str) -> int:
    block = modules.get(experts_name.rpartition(".")[0])
    for m in (getattr(block, "gate", None), getattr(block, "router", None), block):
        k = getattr(m, "top_k", None) or getattr(m, "num_experts_per_tok", None)
        if isinstance(k, int) and k > 0:
            return k
    k = getattr(getattr(modules.get(""), "config", None), "num_experts_per_tok", None)
    return k if isinstance(k, int) and k > 0 else 1


def _router(g: Group, modules: dict[str, Any], experts_name: str) -> tuple[str, str | None] | None:
    """The checkpoint names of the router's weight (and DeepSeek's score-correction bias) beside ``experts_name``."""
    block = modules.get(experts_name.rpartition(".")[0])
    gate = getattr(block, "gate", None) or getattr(block, "router", None)
    if gate is None:
        return None
    weight = bias = None
    for b, t, _ in g.items:
        for m, attr, _ in b.places:
            if m is gate and attr == "weight" and len(t.shape) == 2:
                weight = t.name
            elif m is gate and attr == "e_score_correction_bias":
                bias = t.name
    return (weight, bias) if weight else None


# -- policies ----------------------------------------------------------------------------------------------------
Key = tuple[int, int]  # (layer, expert)


class Policy:
    """Which resident expert leaves first: :meth:`victim` among the candidates."""

    name = "lru"

    def __init__(self) -> None:
        self.last: OrderedDict[Key, int] = OrderedDict()
        self.clock = 0

    def touch(self, key: Key) -> None:
        """``key`` was used now."""
        self.clock += 1
        self.last[key] = self.clock
        self.last.move_to_end(key)

    def forget(self, key: Key) -> None:
        """``key`` left the cache (its recency is kept: it says nothing about its use)."""

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: self.last.get(k, 0))


class LFU(Policy):
    """Least frequently used (counts since the start), the least recent among equals."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[Key, int] = {}

    def touch(self, key: Key) -> None:
        super().touch(key)
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, candidates: list[Key]) -> Key:
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last.get(k, 0)))


class ProfilePolicy(Policy):
    """The ``hot`` experts (from a profile) never leave while others can; the rest is LRU."""

    name = "profile"

    def __init__(self, hot: set[Key]) -> None:
        super().__init__()
        self.hot = set(hot)

    def victim(self, candidates: list[Key]) -> Key:
        cold = [k for k in candidates if k not in self.hot]
        return super().victim(cold or candidates)


@dataclass
class ExpertProfile:
    """How often each expert of each MoE layer was chosen on calibration prompts."""

    counts: dict[int, list[int]]  # layer -> count per expert
    tokens: int = 0

    def hottest(self, capacity: int, sizes: dict[int, int]) -> set[Key]:
        """The most used experts whose bytes (``sizes``: layer -> expert bytes) fit in ``capacity``."""
        ranked = sorted(((c, layer, e) for layer, cs in self.counts.items() for e, c in enumerate(cs) if c),
                        reverse=True)
        out: set[Key] = set()
        used = 0
        for _, layer, e in ranked:
            n = sizes.get(layer, 0)
            if n and used + n <= capacity:
                out.add((layer, e))
                used += n
        return out

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the profile as JSON (atomically); a directory gets :data:`PROFILE_NAME` in it."""
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, PROFILE_NAME)
        elif not p.endswith(".json"):
            raise ExpertError(f"{p}: give a directory (the model's) or a .json path for the expert profile")
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"format": "llmtier-expert-profile", "version": 1, "tokens": self.tokens,
                       "counts": {str(k): v for k, v in sorted(self.counts.items())}}, f)
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ExpertProfile:
        """Read a profile written by :meth:`save` (a directory: its :data:`PROFILE_NAME`)."""
        p = os.fspath(path)
        if os.path.isdir(p):
            p = os.path.join(p, PROFILE_NAME)
        try:
            with open(p) as f:
                doc = json.load(f)
            counts = {int(k): [int(x) for x in v] for k, v in doc["counts"].items()}
            return cls(counts, int(doc.get("tokens", 0)))
        except FileNotFoundError:
            raise ExpertError(f"no expert profile at {p}: measure one first (llmtier bench moe writes one, or "
                              "ExpertProfile(model.llmtier.expert_counts()).save(MODEL_DIR))") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ExpertError(f"{p} is not an llmtier expert profile: {exc}") from None


def make_policy(name: str, profile: ExpertProfile | None = None, capacity: int = 0,
                sizes: dict[int, int] | None = None) -> Policy:
    """The policy called ``name`` (:data:`POLICIES`)."""
    if name == "lru":
        return Policy()
    if name == "lfu":
        return LFU()
    if name == "profile":
        if profile is None:
            raise ExpertError("the profile policy needs an expert profile (profile=...)")
        return ProfilePolicy(profile.hottest(int(capacity * PROFILE_PIN_SHARE), sizes or {}))
    raise ExpertError(f"unknown expert cache policy {name!r}; choose one of {', '.join(POLICIES)}")


# -- the cache ---------------------------------------------------------------------------------------------------
class ExpertCache:
    """Which experts are resident, within ``capacity`` bytes, and which one leaves when room is needed.

    ``quota`` (layer -> experts) shares the cache between the MoE layers: a
    global LRU over layers that run in a cycle would evict exactly the
    experts needed soonest.  Room is taken first from layers above their
    quota, then from the layer asking, then from any; within that pool the
    policy chooses.
    """

    def __init__(self, capacity: int, policy: Policy, quota: dict[int, int] | None = None) -> None:
        self.capacity = capacity
        self.policy = policy
        self.quota = dict(quota or {})
        self.resident: dict[Key, int] = {}
        self.by_layer: dict[int, dict[Key, int]] = {}  # the resident experts of each layer, in order of arrival
        self.count: dict[int, int] = {}
        self.used = 0

    def __contains__(self, key: object) -> bool:
        return key in self.resident

    def add(self, key: Key, nbytes: int) -> None:
        self.resident[key] = nbytes
        self.by_layer.setdefault(key[0], {})[key] = nbytes
        self.count[key[0]] = self.count.get(key[0], 0) + 1
        self.used += nbytes

    def remove(self, key: Key) -> None:
        self.used -= self.resident.pop(key)
        del self.by_layer[key[0]][key]
        self.count[key[0]] -= 1
        self.policy.forget(key)

    def victims(self, nbytes: int, keep: set[Key], layer: int | None = None) -> list[Key] | None:
        """The experts to drop so that ``nbytes`` more fit (for ``layer``), never one of ``keep``;
        None when that is not possible.  Each victim comes from the first non-empty pool of: the experts of
        layers above their quota, those of ``layer``, all (the policy chooses within the pool)."""
        free = self.capacity - self.used
        if free >= nbytes:
            return []
        out: list[Key] = []
        left = dict(self.count)
        taken: set[Key] = set()

        def pool(layers: Any) -> list[Key]:
            return [k for lay in layers for k in self.by_layer.get(lay, ()) if k not in keep and k not in taken]

        while free < nbytes:
            cands = (pool([lay for lay in self.by_layer if left[lay] > self.quota.get(lay, 0)])
                     or (pool([layer]) if layer is not None else [])
                     or pool(list(self.by_layer)))
            if not cands:
                return None
            v = self.policy.victim(cands)
            taken.add(v)
            out.append(v)
            left[v[0]] -= 1
            free += self.resident[v]
        return out


def layer_quotas(capacity: int, moe: list[MoELayer]) -> dict[int, int]:
    """Experts per MoE layer that fill ``capacity`` bytes, shared in proportion to the layers' expert bytes."""
    total = sum(m.num_experts * m.expert_bytes for m in moe) or 1
    return {m.layer: min(m.num_experts, int(capacity * m.num_experts * m.expert_bytes / total) // max(1, m.expert_bytes))
            for m in moe}


__all__ = ["POLICIES", "PROFILE_NAME", "ExpertCache", "ExpertError", "ExpertPlan", "ExpertProfile", "Extent", "LFU",
           "MoELayer", "Policy", "layer_quotas", "ProfilePolicy", "find_experts", "make_policy", "split_budget_for_experts"]
