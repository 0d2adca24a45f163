"""The read side of the KV tier: staging buffers, read-ahead over the spilled layers, the working buffer.

A mixin of :class:`~llmtier.offload.kv.cache.Tier` (which owns the state it
uses: ``layers``, ``spill``, ``geo``, ``stats``, the staging buffers).  Each
forward reads every held full page of a spilled layer into a staging buffer;
read-ahead follows the cyclic order of spilled layers, across the end of a
forward into the next one, and a layer's pages are read only after its writes
finished, so nothing is read that is not on disk.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ...engine import alloc
from .budget import staging_tokens


class ReadAhead:
    """Staging, read-ahead and the working buffer of a :class:`Tier`."""

    layers: list[Any]
    spill: Any
    geo: Any
    stats: Any
    torch: Any
    device: Any
    n: int
    prefetch: int
    _staging: list[np.ndarray]
    _free_staging: list[int]
    _inflight: dict[int, tuple[int, int, Any, np.ndarray]]
    _work: tuple[Any, Any] | None

    def _capacity(self, tokens: int) -> int:
        raise NotImplementedError

    def _account(self) -> None:
        raise NotImplementedError

    def _cycle_after(self, i: int) -> list[int]:
        spilled = [j for j in range(self.n) if not self.layers[j].resident]
        after = [j for j in spilled if j > i] + [j for j in spilled if j <= i]
        return after[: self.prefetch]

    def _read_ahead(self, i: int) -> None:
        for j in self._cycle_after(i):
            if j in self._inflight:
                continue
            lay = self.layers[j]
            if not lay.pages:
                continue
            self._issue(j, len(lay.pages))

    def _issue(self, j: int, full: int) -> None:
        g = self.geo
        assert g is not None and self.spill is not None
        if not self._free_staging:
            if len(self._staging) >= self.prefetch:
                return  # every staging buffer is taken; this layer is read when it runs
            self._staging.append(alloc(0))
            self._free_staging.append(len(self._staging) - 1)
        s = self._free_staging.pop()
        if self._staging[s].nbytes < full * g.slot_bytes:
            lay = self.layers[j]
            pages = max(full, staging_tokens(lay.length, lay.window, g.page) // g.page)
            self._staging[s] = alloc(pages * g.slot_bytes, huge=True)
            self._account()
        t0 = time.perf_counter()
        self.spill.wait_layer(j)
        self.stats.write_wait_s += time.perf_counter() - t0
        fut = self.spill.read(self._staging[s], self.layers[j].pages[:full], j, self.layers[j].first)
        self._inflight[j] = (full, s, fut, self._staging[s])

    def _staged(self, i: int, full: int) -> np.ndarray:
        """The staging buffer holding layer ``i``'s ``full`` pages, read now if no read-ahead has them."""
        g = self.geo
        assert g is not None
        got = self._inflight.get(i)
        if got is not None and got[0] != full:
            self._discard(i)
            got = None
        if got is None and full:
            self._issue(i, full)
            got = self._inflight.get(i)
            if got is None:  # all staging taken by read-ahead of other layers: free the farthest
                far = max(self._inflight, key=lambda j: (j - i) % self.n)
                self._discard(far)
                self._issue(i, full)
                got = self._inflight[i]
        if got is None:
            return alloc(0)
        t0 = time.perf_counter()
        got[2].result()
        self.stats.stall_s += time.perf_counter() - t0
        self.stats.bytes_read += full * g.slot_bytes
        self.stats.page_reads += full
        first = self.layers[i].first
        for p in range(first, first + full):
            self.stats.reads_by_page[p] = self.stats.reads_by_page.get(p, 0) + 1
        return got[3]

    def _release_staging(self, i: int) -> None:
        got = self._inflight.pop(i, None)
        if got is not None:
            self._free_staging.append(got[1])

    def _discard(self, j: int) -> None:
        got = self._inflight.pop(j)
        try:
            got[2].result()
        finally:
            self._free_staging.append(got[1])
        assert self.geo is not None
        self.stats.discarded_bytes += got[0] * self.geo.slot_bytes

    def _working(self, tokens: int) -> tuple[Any, Any]:
        """Contiguous K ``[B, Hk, tokens, Dk]`` and V ``[B, Hv, tokens, Dv]`` that attention reads."""
        g = self.geo
        assert g is not None
        nk, nv = g.batch * g.k_heads * tokens * g.k_dim, g.batch * g.v_heads * tokens * g.v_dim
        if self._work is None or self._work[0].numel() < nk or self._work[1].numel() < nv:
            cap = self._capacity(tokens)
            pin = self.device.type == "cuda"
            self._work = (self.torch.empty(g.batch * g.k_heads * cap * g.k_dim, dtype=g.dtype, pin_memory=pin),
                          self.torch.empty(g.batch * g.v_heads * cap * g.v_dim, dtype=g.dtype, pin_memory=pin))
            self._account()
        return (self._work[0][:nk].view(g.batch, g.k_heads, tokens, g.k_dim),
                self._work[1][:nv].view(g.batch, g.v_heads, tokens, g.v_dim))
