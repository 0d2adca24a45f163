"""Where the resident experts of a MoE model lie in memory: the two layouts
of :class:`~llmtier.offload.moe.MoEStreamer`.

* :class:`ExpertSlots` (the default where it is exact): one pool of
  ``capacity // expert_bytes`` slots shared by every MoE layer, each slot the
  size of one expert (a row of every fused expert parameter), in huge pages.
  A resident expert is a slot; evicting it frees the slot for the next read,
  with no page-table work at all.  The experts module's forward is replaced by
  transformers' own expert forward called on a copy of the module whose
  parameters are the pool and whose ``top_k_index`` names slots instead of
  experts.  That is bit for bit the in-memory model's output for the expert
  implementations whose result does not depend on how experts are numbered
  (:data:`EXACT_IMPLEMENTATIONS`: ``grouped_mm`` and ``batched_mm`` compute
  each routed expert apart and sum the top-k outputs in the router's order);
  ``eager`` adds expert outputs in expert order, so it keeps
  :class:`ExpertRows`.
* :class:`ExpertRows`: each fused parameter ``[E, ...]`` bound, for the
  model's life, to a buffer of its full size in anonymous memory that holds
  pages only where experts were read (row ``e`` is expert ``e``); an evicted
  expert's pages move to the expert read in its place (``mremap``) or go back
  to the system.  Works with any expert implementation; costs page-table work
  per eviction (0.7-0.95 ms per 2.25 MiB expert inside a running model on the
  development VM) and reads into 4 KiB pages.

Both give :meth:`row`: the bytes of one parameter's row of a placed expert,
where its reads land.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ..engine import alloc, discard_pages, move_pages
from ..engine.buffers import PAGE
from ..store import dtypes
from .experts import ExpertError, Key, MoELayer

#: Expert implementations of transformers whose output does not depend on the experts' numbering
EXACT_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")

#: :class:`ExpertRows`: evicted experts' pages move between at most this many distinct expert rows (a row a move
#: touched becomes a mapping of its own, and the kernel caps a process's mappings: vm.max_map_count, 65530 by
#: default); rows already split cost nothing more, however often their pages move
MAX_MOVED_ROWS = 16384


def _check_dtypes(torch: Any, moe: list[MoELayer]) -> None:
    for m in moe:
        for b, t in m.params:
            dt = dtypes.torch_dtype(t.dtype)
            if dt != b.dtype:
                raise ExpertError(f"{t.name} is {dt} in the checkpoint and the model computes in {b.dtype}: expert "
                                  "streaming reads experts in place, without a cast (leave dtype= unset)")


def _signature(m: MoELayer) -> tuple:
    return tuple((tuple(b.shape[1:]), str(b.dtype), row) for (b, _), row in zip(m.params, m.row_bytes))


def slots_apply(moe: list[MoELayer]) -> str | None:
    """None where :class:`ExpertSlots` is exact for ``moe``; otherwise why not."""
    if len({_signature(m) for m in moe}) != 1:
        return "the MoE layers' experts differ in shape"
    for m in moe:
        impl = getattr(getattr(m.module, "config", None), "_experts_implementation", None)
        if impl not in EXACT_IMPLEMENTATIONS:
            return f"{m.name} runs its experts with {impl!r} (slots are exact with {' or '.join(EXACT_IMPLEMENTATIONS)})"
    return None


def _arguments(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    got = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]):]]
    return got[0], got[1], got[2]


def _plain(module: Any, params: dict[str, Any]) -> bool:
    """An experts module whose grouped forward :meth:`ExpertSlots._grouped` repeats."""
    if getattr(module, "_is_expert_parallel", False) or getattr(module, "has_post_expert_norm", False) \
            or not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return False
    return "down_proj" in params and ("gate_up_proj" if module.has_gate else "up_proj") in params


class ExpertRows:
    """Experts at their own rows of full-size sparse buffers (see the module doc)."""

    kind = "rows"

    def __init__(self, torch: Any, moe: list[MoELayer]) -> None:
        _check_dtypes(torch, moe)
        self.torch, self.moe = torch, moe
        self.index = {m.layer: i for i, m in enumerate(moe)}
        self.bufs: list[list[np.ndarray]] = [[alloc(t.nbytes) for _, t in m.params] for m in moe]
        self.released = 0  # bytes of evicted experts given back to the system
        self.recycled = 0  # bytes of evicted experts' pages moved to the expert read in their place
        self._moved: set[tuple[int, int, int]] = set()  # (layer index, parameter, expert) rows split by moves

    def bind(self, placeholders: dict) -> None:
        """Point the experts modules' parameters at the buffers (their old values saved in ``placeholders``)."""
        torch = self.torch
        for m, bufs in zip(self.moe, self.bufs):
            for (b, t), buf in zip(m.params, bufs):
                x = torch.from_numpy(buf).view(dtypes.torch_dtype(t.dtype)).reshape(b.shape)
                for module, attr, _ in b.places:
                    placeholders.setdefault((id(module), attr), module._parameters[attr])
                    module._parameters[attr] = torch.nn.Parameter(x, requires_grad=x.is_floating_point())

    def place(self, key: Key) -> None:
        """``key`` was admitted to the cache: its rows are where its reads go."""

    def row(self, i: int, p: int, e: int) -> np.ndarray:
        n = self.moe[i].row_bytes[p]
        return self.bufs[i][p][e * n:(e + 1) * n]

    def evict(self, key: Key, into: Key | None = None) -> None:
        """Give ``key``'s pages to ``into`` (the expert about to be read in its place) where the rows match in
        size and alignment, and back to the system otherwise."""
        i = self.index[key[0]]
        j = self.index[into[0]] if into is not None else None
        for p, (buf, row) in enumerate(zip(self.bufs[i], self.moe[i].row_bytes)):
            new = {(i, p, key[1]), (j, p, into[1])} - self._moved if j is not None else set()
            if (j is not None and p < len(self.bufs[j]) and self.moe[j].row_bytes[p] == row
                    and len(self._moved) + len(new) <= MAX_MOVED_ROWS
                    and move_pages(buf, key[1] * row, self.bufs[j][p], into[1] * row, row)):
                self._moved |= new
                self.recycled += row
                continue
            self.released += discard_pages(buf, key[1] * row, (key[1] + 1) * row)

    def close(self) -> None:
        self.bufs = []


class ExpertSlots:
    """Resident experts in a shared pool of expert-sized slots (see the module doc)."""

    kind = "slots"

    def __init__(self, torch: Any, moe: list[MoELayer], capacity: int, *, overlap: bool | None = None) -> None:
        _check_dtypes(torch, moe)
        why = slots_apply(moe)
        if why:
            raise ExpertError(f"expert slots do not apply: {why}")
        self.torch, self.moe = torch, moe
        self.index = {m.layer: i for i, m in enumerate(moe)}
        first = moe[0]
        self.nslots = max(0, capacity // first.expert_bytes)
        rows = first.row_bytes
        # one buffer per fused parameter, slot s = row s; huge pages: filled whole by direct reads, never given back.
        # Faulted in now, at open: the first touch of huge pages can wait for the kernel to compact memory (0.8 s
        # for 700 MiB measured on the development VM), which would otherwise stall the first tokens' reads.
        self.bufs = [alloc(max(1, self.nslots) * r, huge=True) for r in rows]
        for buf in self.bufs:
            buf[::PAGE] = 0
        self.pool = [torch.from_numpy(buf[:self.nslots * r]).view(b.dtype).reshape(self.nslots, *b.shape[1:])
                     for buf, r, (b, _) in zip(self.bufs, rows, first.params)]
        self.free = list(range(self.nslots - 1, -1, -1))
        self.slot: dict[Key, int] = {}
        self.maps = [torch.full((m.num_experts,), -1, dtype=torch.long) for m in moe]  # expert -> slot, per layer
        self.released = 0
        self.recycled = 0  # bytes of slots an evicted expert left to the one read next
        self._used: set[int] = set()  # slots that ever held an expert
        self._modules: list[Any] = []
        self.by_name: dict[str, Any] = {}  # fused parameter name -> its pool [slot, ...]
        self.by_name_t: dict[str, Any] = {}  # ... as [slot, in, out] (transposed where the module is not)
        #: compute resident experts while missing ones are read: None until the first call checked it is exact
        self.overlap: bool | None = overlap
        self.why_not_overlap = "" if overlap is not False else "overlap=False"
        # the streamer's: wait for expert (layer, e) if it is being read; the order key of (layer, e) (0: resident);
        # wait for everything a layer's call reads
        self.wait: Any = lambda layer, e: None
        self.pending: Any = lambda layer, e: 0
        self.wait_all: Any = lambda i: None

    def bind(self, placeholders: dict) -> None:
        """Stand-ins for the fused parameters (one element each, the right shape and dtype) and the experts
        modules' forward replaced by transformers' own on the pool."""
        torch = self.torch
        for i, m in enumerate(self.moe):
            params = {}
            for (b, _), pool in zip(m.params, self.pool):
                stub = torch.nn.Parameter(torch.zeros((), dtype=b.dtype).expand(b.shape), requires_grad=False)
                for module, attr, _ in b.places:
                    placeholders.setdefault((id(module), attr), module._parameters[attr])
                    module._parameters[attr] = stub
                    params[attr] = pool
                    self.by_name[attr] = pool
                    self.by_name_t[attr] = pool if m.module.is_transposed or pool.dim() < 3 else pool.transpose(-2, -1)
            mod = m.module
            proxy = copy.copy(mod)  # a new __dict__ sharing everything but the parameters and the expert count
            proxy._parameters = params
            proxy.num_experts = self.nslots
            mod.forward = self._forward(i, mod, proxy)
            self._modules.append(mod)

    def _forward(self, i: int, module: Any, proxy: Any) -> Any:
        cls_forward = type(module).forward
        slots = self.maps[i]

        def forward(*args: Any, **kwargs: Any) -> Any:
            impl = getattr(module.config, "_experts_implementation", None)
            if impl not in EXACT_IMPLEMENTATIONS:
                raise ExpertError(f"{self.moe[i].name}: the experts implementation became {impl!r} after the model "
                                  f"was opened; expert slots are exact with {' or '.join(EXACT_IMPLEMENTATIONS)}")
            hidden, top, weights = _arguments(args, kwargs)
            if self.overlap is not False and impl == "grouped_mm" and _plain(module, self.by_name):
                out = self._grouped(i, module, hidden, top, weights)
                if self.overlap is None:  # the first call: the same product as transformers', bit for bit?
                    self.wait_all(i)
                    ref = cls_forward(proxy, hidden, slots[top], weights)
                    self.overlap = bool(self.torch.equal(out, ref))
                    if not self.overlap:
                        self.why_not_overlap = ("expert-by-expert products differ from transformers' grouped_mm on "
                                                "this machine; each layer waits for its missing experts first")
                    return ref
                return out
            self.wait_all(i)
            return cls_forward(proxy, hidden, slots[top], weights)

        return forward

    def _grouped(self, i: int, module: Any, hidden: Any, top: Any, weights: Any) -> Any:
        """transformers' ``grouped_mm`` expert forward computed one expert at a time, resident experts first:
        an expert still being read is waited for (``self.wait``) only when its turn comes, so the reads of the
        missing experts overlap the products of the resident ones.  The same sort, products and sums as
        transformers' (each group's rows of ``torch._grouped_mm`` are one ``mm``; checked on the first call)."""
        torch = self.torch
        m = self.moe[i]
        k = top.size(-1)
        tokens, dim = hidden.size(0), hidden.size(-1)
        ids_g, perm = torch.sort(top.reshape(-1))
        x = hidden[perm // k]
        w = weights.reshape(-1)[perm]
        ids, counts = torch.unique_consecutive(ids_g, return_counts=True)
        up_name = "gate_up_proj" if module.has_gate else "up_proj"
        up_t, down_t = self.by_name_t[up_name], self.by_name_t["down_proj"]  # [slot, in, out] views
        up_b = self.by_name.get(up_name + "_bias") if module.has_bias else None
        down_b = self.by_name.get("down_proj_bias") if module.has_bias else None
        dtype = down_t.dtype
        out = torch.empty(x.shape[0], dim, dtype=dtype, device=x.device)  # as transformers: the weights' dtype
        x = x.to(up_t.dtype)
        gate = module._apply_gate if module.has_gate else module.act_fn
        layer, slot, pending = m.layer, self.slot, self.pending
        groups, start = [], 0
        for e, c in zip(ids.tolist(), counts.tolist()):
            groups.append((pending(layer, e), e, start, start + c))  # resident first, then in the order read
            start += c
        groups.sort()
        for p, e, a, b in groups:
            if p:
                self.wait(layer, e)
            s = slot[(layer, e)]
            h = torch.mm(x[a:b], up_t[s])
            if up_b is not None:
                h.add_(up_b[s])
            h = gate(h).to(dtype)
            if down_b is None:
                torch.mm(h, down_t[s], out=out[a:b])
            else:
                out[a:b] = torch.mm(h, down_t[s]).add_(down_b[s])
        self.wait_all(i)  # reads of guesses for this layer that it did not route to: they land as residents
        weighted = out * w.unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.size(0), device=perm.device)
        return weighted[inv].view(tokens, k, dim).sum(dim=1).to(hidden.dtype)

    def place(self, key: Key) -> None:
        s = self.free.pop()
        self.slot[key] = s
        self.maps[self.index[key[0]]][key[1]] = s
        if s in self._used:
            self.recycled += self.moe[self.index[key[0]]].expert_bytes
        self._used.add(s)

    def row(self, i: int, p: int, e: int) -> np.ndarray:
        n = self.moe[i].row_bytes[p]
        s = self.slot[(self.moe[i].layer, e)]
        return self.bufs[p][s * n:(s + 1) * n]

    def evict(self, key: Key, into: Key | None = None) -> None:
        s = self.slot.pop(key, None)
        if s is None:
            return
        self.maps[self.index[key[0]]][key[1]] = -1
        self.free.append(s)

    def close(self) -> None:
        for mod in self._modules:
            mod.__dict__.pop("forward", None)
        self._modules = []
        self.pool = []
        self.bufs = []


__all__ = ["EXACT_IMPLEMENTATIONS", "MAX_MOVED_ROWS", "ExpertRows", "ExpertSlots", "slots_apply"]
