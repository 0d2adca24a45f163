"""The KV tier's placement: what one token and one page group take, which layers stay in DRAM and which spill.

A *page group* is one page (``P`` tokens) of one layer for every row of the
batch: the K block ``[B, Hk, P, Dk]`` then the V block ``[B, Hv, P, Dv]``, so
K and V may have different head sizes (MLA: DeepSeek-V2/V3) and one read
brings both.  A full-attention layer keeps every token; a sliding-window or
chunked-attention layer of window ``W`` hands attention at most ``W - 1``
past tokens, so it keeps only the pages that overlap them: its capacity in
the budget is its window, not the context.

:class:`llmtier.offload.kv.TieredCache` asks :func:`choose_spills` at each
forward which layers must go to SSD; the planner asks :func:`need` and
:func:`min_memory` ahead of a run.  Pure arithmetic: no I/O.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import LLMTierError

DEFAULT_PAGE_TOKENS = 256
SLOT_ALIGN = 4096  # page groups sit in slots of a multiple of this, so every spill read and write is direct


MAX_WRITES = 8  # page groups in flight to the disk before a spill writer waits


class KVConfigError(LLMTierError, ValueError):
    """The model, the device or the call is one the tiered cache does not support."""


@dataclass(frozen=True)
class Geometry:
    """Shapes of one layer's K and V (``[B, Hk, *, Dk]``, ``[B, Hv, *, Dv]``) and the page size."""

    batch: int
    k_heads: int
    k_dim: int
    v_heads: int
    v_dim: int
    page: int  # tokens per page
    dtype: Any  # torch dtype
    itemsize: int

    @property
    def k_group(self) -> int:
        """Elements of the K block of a page group."""
        return self.batch * self.k_heads * self.page * self.k_dim

    @property
    def v_group(self) -> int:
        return self.batch * self.v_heads * self.page * self.v_dim

    @property
    def token_bytes(self) -> int:
        """K and V of one token in one layer, all rows."""
        return (self.k_heads * self.k_dim + self.v_heads * self.v_dim) * self.itemsize * self.batch

    @property
    def group_bytes(self) -> int:
        return self.token_bytes * self.page

    @property
    def slot_bytes(self) -> int:
        """A page group's slot in the spill file and in DRAM buffers: ``group_bytes`` rounded up to
        ``SLOT_ALIGN`` (no padding at real sizes: 256 tokens of any model are a multiple)."""
        return -(-self.group_bytes // SLOT_ALIGN) * SLOT_ALIGN


def capacity(tokens: int, page: int) -> int:
    """``tokens`` rounded up to whole pages."""
    return -(-tokens // page) * page


def keep(n: int, window: int | None) -> int:
    """Past tokens attention sees at ``n`` cached tokens: all, or the last ``window - 1``."""
    return n if window is None else min(n, window - 1)


def resident_tokens(n: int, q: int, window: int | None, page: int) -> int:
    """Capacity (tokens) a resident layer holds for a forward of ``q`` tokens after ``n``: one spare page
    for a sliding layer, so that it moves its window back to the start at most once a page."""
    if window is None:
        return capacity(n + q, page)
    return min(capacity(n + q, page), capacity(keep(n, window) + q, page) + page)


def staging_tokens(n: int, window: int | None, page: int) -> int:
    """Tokens of the full pages a spilled layer reads at ``n`` cached tokens, at most."""
    if window is None:
        return capacity(n, page)
    return min(capacity(n, page), capacity(window - 1, page) + page)


def need(n: int, q: int, windows: Sequence[int | None], resident: set[int], geo: Geometry, prefetch: int) -> int:
    """DRAM bytes the pool needs for a forward of ``q`` tokens after ``n``, with layers ``resident`` kept
    (``windows``: one entry per attention layer, ``None`` for full attention).  A prefill (``n == 0``) reads
    nothing, but the plan must also hold the first step after it: otherwise layers kept resident through the
    prefill would spill their whole prompt at that step, over the budget while their writes are in flight."""
    if n == 0 and q:
        return max(_need(0, q, windows, resident, geo, prefetch), _need(q, 1, windows, resident, geo, prefetch))
    return _need(n, q, windows, resident, geo, prefetch)


def _need(n: int, q: int, windows: Sequence[int | None], resident: set[int], geo: Geometry, prefetch: int) -> int:
    tb, p = geo.token_bytes, geo.page
    held = sum(resident_tokens(n, q, w, p) * tb for i, w in enumerate(windows) if i in resident)
    spilled = [w for i, w in enumerate(windows) if i not in resident]
    if not spilled:
        return held
    held += (len(spilled) + MAX_WRITES) * geo.slot_bytes  # one tail page group each, writes in flight
    if n:  # a past to read: staging for the read-ahead and the working buffer attention reads
        held += prefetch * max(staging_tokens(n + q, w, p) for w in spilled) // p * geo.slot_bytes
        held += max(capacity(keep(n, w) + q, p) for w in spilled) * tb
    return held


def min_memory(layers: int, batch: int, heads: int, head_dim: int, itemsize: int, tokens: int, *,
               page_tokens: int = DEFAULT_PAGE_TOKENS, prefetch: int = 2, v_heads: int | None = None,
               v_head_dim: int | None = None, windows: Sequence[int | None] | None = None) -> int:
    """The smallest pool that decodes up to ``tokens`` of context (one token a forward after the prompt) with
    every layer spilled.  ``heads``/``head_dim`` are K's; ``v_heads``/``v_head_dim`` V's when they differ;
    ``windows`` the sliding window of each of the ``layers`` attention layers (``None``: full attention)."""
    geo = Geometry(batch, heads, head_dim, v_heads or heads, v_head_dim or head_dim, page_tokens, None, itemsize)
    wins = list(windows) if windows is not None else [None] * layers
    if len(wins) != layers:
        raise KVConfigError(f"windows has {len(wins)} entries for {layers} layers")
    return need(max(tokens - 1, 0), 1, wins, set(), geo, max(1, prefetch))


def spill_order(n: int) -> list[int]:
    """Layer indices in the order they spill: each prefix is spread evenly over ``range(n)``."""
    order: list[int] = []
    j = 0
    while len(order) < n:
        x, f, k = 0.0, 0.5, j
        while k:  # van der Corput: j's bits mirrored after the binary point
            if k & 1:
                x += f
            k >>= 1
            f /= 2
        i = min(n - 1, int(x * n))
        if i not in order:
            order.append(i)
        j += 1
        if j > 64 * n:  # every index is reached long before; a guard, not a path
            order += [i for i in range(n) if i not in order]
    return order


def choose_spills(n: int, q: int, windows: Sequence[int | None], resident: set[int], order: Sequence[int], geo: Geometry,
                  prefetch: int, memory: int, spill_all: bool = False) -> list[int]:
    """The resident layers (indices into ``windows``) to spill, in order, so that ``memory`` bytes hold a forward of
    ``q`` tokens after ``n``: the layers that hold most go first (full attention before sliding windows), ties in
    ``order`` (:func:`spill_order`: spread over the depth).  ``spill_all``: every resident layer.  The caller checks
    :func:`need` afterwards: with every layer spilled the budget may still be short."""
    left = set(resident)
    victims = sorted((i for i in order if i in left), key=lambda i: -resident_tokens(n, q, windows[i], geo.page))
    out: list[int] = []
    while left and (spill_all or need(n, q, windows, left, geo, prefetch) > memory):
        i = victims.pop(0)
        left.discard(i)
        out.append(i)
    return out


__all__ = ["DEFAULT_PAGE_TOKENS", "MAX_WRITES", "SLOT_ALIGN", "Geometry", "KVConfigError", "capacity", "choose_spills",
           "keep", "min_memory", "need", "resident_tokens", "spill_order", "staging_tokens"]
