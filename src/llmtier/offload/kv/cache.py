"""A transformers ``Cache`` whose KV pages live in a bounded DRAM pool and spill to SSD.

Each decoder layer is either *resident* (its K and V in DRAM, grown a page at
a time, handed to attention as views) or *spilled* (its full pages on SSD in
the spill file, the page being filled in DRAM).  At the start of every
forward pass the cache checks what the new length needs; when the budget
cannot hold it, layers are spilled in an order that spreads them evenly over
the depth, so that resident layers' compute hides spilled layers' reads.
Sliding-window and chunked-attention layers keep only their window: pages
wholly outside it are dropped (DRAM and spill slots given back) and a page
that is already outside when it fills is never written (see ``budget.py``).

For a spilled layer, each forward reads every full page (attention needs the
whole past) into a staging buffer and copies it, the DRAM tail and the new
tokens into one contiguous working buffer that attention reads:

    layer i computes   | staging A -> working, attention, MLP          |
    disk               | pages of the next spilled layers -> staging B |

Read-ahead follows the cyclic order of spilled layers, across the end of a
forward into the next one.  A page that fills is written in the background;
a layer's pages are read only after its writes finished, so nothing is read
that is not on disk.  Budget, in bytes of DRAM: resident layers' capacity +
one tail page group per spilled layer + ``prefetch`` staging buffers + the
working buffer (K and V) + at most ``MAX_WRITES`` page groups being written.

For a CUDA model the pool is the same, in pinned host memory: each layer's
new tokens are copied to the host, and attention gets a GPU copy of the
layer's past (the resident K/V, or the working buffer assembled from the
pages read from SSD) with the new tokens.  Those copies run on the compute
stream: they are not yet overlapped with the previous layer's compute.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...engine import Engine, alloc, open_engine
from ...engine.cuda import require_cuda
from ...errors import BudgetError
from ...units import human
from .budget import (
    DEFAULT_PAGE_TOKENS,
    Geometry,
    KVConfigError,
    KVStats,
    capacity,
    choose_spills,
    default_directory,
    keep,
    min_memory,
    need,
    parse_memory,
    resident_tokens,
    spill_order,
)
from .reads import ReadAhead
from .spill import SpillFile, remove_stale


class _Layer:
    __slots__ = ("length", "resident", "keys", "values", "base", "pages", "first", "tail", "window")

    def __init__(self, window: int | None = None) -> None:
        self.window = window  # sliding window (tokens) or None: full attention
        self.length = 0  # tokens seen (transformers' cumulative length)
        self.resident = True
        self.keys: Any = None  # resident: [B, Hk, capacity, Dk], holding tokens from ``base``
        self.values: Any = None
        self.base = 0
        self.pages: list[int] = []  # spilled: slots of the full page groups held, oldest first
        self.first = 0  # spilled: page index of pages[0] (earlier pages left the window)
        self.tail: np.ndarray | None = None  # spilled: the page group being filled


class Tier(ReadAhead):
    """The state behind a :class:`TieredCache`; every layer object calls into it.

    ``windows`` has one entry per decoder layer: ``None`` (full attention), a
    window in tokens (sliding or chunked attention), or ``0`` (a layer without
    KV, which the tier never sees).
    """

    def __init__(self, windows: Sequence[int | None], memory: int, directory: str, page_tokens: int, prefetch: int,
                 engine: Engine | None, io_nice: int | None, spill_all: bool = False) -> None:
        import torch  # noqa: PLC0415

        if page_tokens < 1:
            raise KVConfigError(f"page_tokens must be >= 1, got {page_tokens}")
        self.torch = torch
        self.n = len(windows)
        self.attn = [i for i, w in enumerate(windows) if w != 0]  # layers with KV
        self.memory = memory
        self.spill_all = spill_all  # every layer on SSD from the first forward, whatever the budget allows
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        remove_stale(directory)  # spill files of processes that died
        self.page = page_tokens
        self.prefetch = max(1, prefetch)
        self._own_engine = engine is None
        self.engine = engine if engine is not None else open_engine("auto")
        if self._own_engine and io_nice is not None:
            self.engine.prioritize(io_nice)
        self.windows = [w or None for w in windows]
        self.geo: Geometry | None = None
        self.device: Any = None  # of the model's K/V, set by the first update
        self.layers = [_Layer(w) for w in self.windows]
        self.order = [self.attn[j] for j in spill_order(len(self.attn))]
        self.spill: SpillFile | None = None
        self.stats = KVStats(resident_layers=len(self.attn))
        self._staging: list[np.ndarray] = []
        self._work: tuple[Any, Any] | None = None  # flat K and V working storage
        self._inflight: dict[int, tuple[int, int, Future_, np.ndarray]] = {}  # layer -> (pages, staging, fut, buf)
        self._free_staging: list[int] = []
        self._closed = False
        self._written_before = 0  # bytes written to spill files closed by a reset

    # -- geometry and budget ----------------------------------------------------------------------------------------
    def _init(self, k: Any, v: Any) -> None:
        if k.device.type not in ("cpu", "cuda"):
            raise KVConfigError(f"TieredCache keeps KV for CPU and CUDA models; got tensors on {k.device}")
        self.device = k.device
        if k.device.type == "cuda":
            require_cuda("a TieredCache of a CUDA model")
        self.geo = Geometry(k.shape[0], k.shape[1], k.shape[3], v.shape[1], v.shape[3], self.page, k.dtype,
                            k.element_size())

    # -- a CUDA model: the pool stays in (pinned) host memory ------------------------------------------------------
    def _host(self, k: Any, v: Any) -> tuple[Any, Any]:
        """The new tokens, copied to pinned host memory.  The wait at the end also
        means every copy queued earlier out of the pool has happened, so the pool
        may be written again."""
        torch = self.torch
        kh = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
        vh = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        kh.copy_(k, non_blocking=True)
        vh.copy_(v, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return kh, vh

    def _to_device(self, t: Any) -> Any:
        """A contiguous pinned host tensor, copied to the model's GPU (asynchronously)."""
        d = self.torch.empty(t.shape, dtype=t.dtype, device=self.device)
        d.copy_(t, non_blocking=True)
        self.stats.device_bytes += t.numel() * t.element_size()
        return d

    def _capacity(self, tokens: int) -> int:
        return capacity(tokens, self.page)

    def need(self, n: int, q: int, resident: set[int]) -> int:
        """DRAM bytes the pool needs for ``q`` new tokens after ``n`` with layers ``resident`` kept."""
        assert self.geo is not None
        wins = [self.windows[i] for i in self.attn]
        res = {j for j, i in enumerate(self.attn) if i in resident}
        return need(n, q, wins, res, self.geo, self.prefetch)

    def plan(self, n: int, q: int) -> None:
        """Spill layers until the budget holds a forward of ``q`` tokens after ``n``; called at each forward's start."""
        resident = {i for i in self.attn if self.layers[i].resident}
        assert self.geo is not None
        wins = [self.windows[i] for i in self.attn]
        pos = {i: j for j, i in enumerate(self.attn)}
        for j in choose_spills(n, q, wins, {pos[i] for i in resident}, [pos[i] for i in self.order], self.geo,
                               self.prefetch, self.memory, self.spill_all):  # the planner decides which spill
            resident.discard(self.attn[j])
            self._spill_layer(self.attn[j])
        if self.need(n, q, resident) > self.memory:
            g = self.geo
            assert g is not None
            raise BudgetError(
                f"KV memory {human(self.memory)} cannot hold the working set at {n + q} tokens "
                f"(batch {g.batch}): even with every layer on SSD it needs {human(self.need(n, q, resident))} "
                f"(staging for {self.prefetch} read-ahead layers, the working buffer and one page per layer)")
        self._account()

    def _account(self) -> None:
        g = self.geo
        if g is None:
            return
        held = 0
        for i in self.attn:
            lay = self.layers[i]
            if lay.resident and lay.keys is not None:
                held += lay.keys.shape[2] * g.token_bytes
            elif lay.tail is not None:
                held += g.slot_bytes
        held += sum(b.nbytes for b in self._staging)
        if self._work is not None:
            held += (self._work[0].numel() + self._work[1].numel()) * g.itemsize
        if self.spill is not None:
            held += self.spill.writes_in_flight * g.slot_bytes
        s = self.stats
        s.dram_bytes = held
        s.peak_dram_bytes = max(s.peak_dram_bytes, held)
        s.resident_layers = sum(self.layers[i].resident for i in self.attn)
        s.spilled_layers = len(self.attn) - s.resident_layers
        s.ssd_bytes = self.spill.used_bytes if self.spill is not None else 0

    def _spill_file(self) -> SpillFile:
        if self.spill is None:
            assert self.geo is not None
            self.spill = SpillFile(self.engine, self.directory, self.geo.slot_bytes)
        return self.spill

    def _spill_layer(self, i: int) -> None:
        """Make layer ``i`` spilled: its full pages go to SSD, the rest to a tail page group."""
        lay = self.layers[i]
        lay.resident = False
        keys, values, n, base = lay.keys, lay.values, lay.length, lay.base
        lay.keys = lay.values = None
        lo = n - keep(n, lay.window)  # the first token attention will still see
        lay.length, lay.first, lay.base = lo, lo // self.page, 0
        if n > lo:
            self._append(i, keys[:, :, lo - base:n - base], values[:, :, lo - base:n - base], n)
        elif lay.tail is None:
            lay.tail = self._spill_file().buffer()

    # -- the forward path -------------------------------------------------------------------------------------------
    def update(self, i: int, k: Any, v: Any) -> tuple[Any, Any]:
        if self._closed:
            raise KVConfigError("this TieredCache is closed")
        if self.geo is None:
            self._init(k, v)
        g = self.geo
        assert g is not None
        if (k.shape[0] != g.batch or k.shape[1] != g.k_heads or k.shape[3] != g.k_dim or k.dtype != g.dtype
                or tuple(v.shape) != (g.batch, g.v_heads, k.shape[2], g.v_dim) or v.dtype != g.dtype):
            raise KVConfigError(f"layer {i}: K/V of shape {tuple(k.shape)}/{tuple(v.shape)} {k.dtype} do not match "
                                f"the cache's [{g.batch}, {g.k_heads}, *, {g.k_dim}]/[{g.batch}, {g.v_heads}, *, "
                                f"{g.v_dim}] {g.dtype}")
        if k.device != self.device:
            raise KVConfigError(f"layer {i}: K/V on {k.device}, the cache holds KV of a model on {self.device}")
        lay = self.layers[i]
        if i == self.attn[0]:  # a forward pass starts: make room for its tokens
            self.stats.forwards += 1
            self.plan(lay.length, k.shape[2])
        if self.device.type == "cpu":
            if lay.resident:
                rk, rv, a, b = self._update_resident(lay, k, v)
                return rk[:, :, a:b], rv[:, :, a:b]
            return self._update_spilled(i, lay, k, v)
        # A CUDA model: the same pool on the host; attention gets a GPU copy of the layer's past + new tokens.
        kh, vh = self._host(k, v)
        if lay.resident:
            rk, rv, a, b = self._update_resident(lay, kh, vh)
            return self._to_device(rk)[:, :, a:b], self._to_device(rv)[:, :, a:b]
        wk, wv = self._update_spilled(i, lay, kh, vh)
        return self._to_device(wk), self._to_device(wv)

    def _update_resident(self, lay: _Layer, k: Any, v: Any) -> tuple[Any, Any, int, int]:
        """Append to a resident layer; returns its storage and the slice attention sees."""
        n, q = lay.length, k.shape[2]
        lo = n - keep(n, lay.window)
        target = resident_tokens(n, q, lay.window, self.page)
        if (lay.keys is None or lo < lay.base or n + q - lay.base > lay.keys.shape[2]
                or (lay.window is not None and lay.keys.shape[2] > target)):
            # grow (full attention), or move the window to the start of a right-sized buffer (sliding)
            pin = self.device.type == "cuda"
            nk = self.torch.empty((k.shape[0], k.shape[1], target, k.shape[3]), dtype=k.dtype, pin_memory=pin)
            nv = self.torch.empty((v.shape[0], v.shape[1], target, v.shape[3]), dtype=v.dtype, pin_memory=pin)
            if n > lo:
                nk[:, :, :n - lo].copy_(lay.keys[:, :, lo - lay.base:n - lay.base])
                nv[:, :, :n - lo].copy_(lay.values[:, :, lo - lay.base:n - lay.base])
            lay.keys, lay.values, lay.base = nk, nv, lo
            self._account()
        b = lay.base
        lay.keys[:, :, n - b:n + q - b].copy_(k)
        lay.values[:, :, n - b:n + q - b].copy_(v)
        lay.length = n + q
        return lay.keys, lay.values, lo - b, n + q - b

    def _update_spilled(self, i: int, lay: _Layer, k: Any, v: Any) -> tuple[Any, Any]:
        g = self.geo
        assert g is not None
        n, q, p = lay.length, k.shape[2], g.page
        if n == 0:  # nothing past: attention needs only the new tokens
            self._append(i, k, v, q)
            self._read_ahead(i)
            return k, v
        lo = n - keep(n, lay.window)  # attention sees tokens [lo, n + q): the working buffer's [0, n + q - lo)
        full = len(lay.pages)
        staged = self._staged(i, full)
        wk, wv = self._working(n + q - lo)
        if full:
            pk, pv = self._group_views(staged[:full * g.slot_bytes], full)
            d = lo - lay.first * p  # lo lies in the first held page (earlier ones were dropped)
            if d:
                wk[:, :, :p - d].copy_(pk[0, :, :, d:])
                wv[:, :, :p - d].copy_(pv[0, :, :, d:])
            j = 1 if d else 0
            if full > j:  # [m, B, H, P, D] -> [B, H, m, P, D] -> consecutive tokens of the working K and V
                a, m = j * p - d, full - j
                wk[:, :, a:a + m * p].view(g.batch, g.k_heads, m, p, g.k_dim).copy_(pk[j:].permute(1, 2, 0, 3, 4))
                wv[:, :, a:a + m * p].view(g.batch, g.v_heads, m, p, g.v_dim).copy_(pv[j:].permute(1, 2, 0, 3, 4))
        ts = (lay.first + full) * p  # the tail's first token
        if n > max(ts, lo):
            tk, tv = self._group_views(lay.tail, 1)
            s0 = max(ts, lo)
            wk[:, :, s0 - lo:n - lo].copy_(tk[0, :, :, s0 - ts:n - ts])
            wv[:, :, s0 - lo:n - lo].copy_(tv[0, :, :, s0 - ts:n - ts])
        wk[:, :, n - lo:].copy_(k)
        wv[:, :, n - lo:].copy_(v)
        self._release_staging(i)
        self._append(i, k, v, n + q)
        self._read_ahead(i)
        return wk, wv

    # -- appending and writing --------------------------------------------------------------------------------------
    def _group_views(self, buf: np.ndarray, count: int) -> tuple[Any, Any]:
        """``count`` consecutive page groups in ``buf`` as K ``[count, B, Hk, P, Dk]`` and V ``[count, B, Hv, P, Dv]``."""
        g = self.geo
        assert g is not None
        flat = self.torch.from_numpy(buf[:count * g.slot_bytes]).view(g.dtype).view(count, g.slot_bytes // g.itemsize)
        return (flat[:, :g.k_group].view(count, g.batch, g.k_heads, g.page, g.k_dim),
                flat[:, g.k_group:g.k_group + g.v_group].view(count, g.batch, g.v_heads, g.page, g.v_dim))

    def _append(self, i: int, k: Any, v: Any, final: int) -> None:
        """Put new tokens of spilled layer ``i`` in its tail; write each page group that fills and that is still
        in the window after this forward (``final`` tokens); drop the pages that left the window."""
        g = self.geo
        assert g is not None
        lay, spill, p = self.layers[i], self._spill_file(), g.page
        start = final - keep(final, lay.window)  # the first token the next forward sees
        if lay.tail is None:
            lay.tail = spill.buffer()
        done, q = 0, k.shape[2]
        while done < q:
            t = lay.length - (lay.first + len(lay.pages)) * p
            m = min(p - t, q - done)
            tk, tv = self._group_views(lay.tail, 1)
            tk[0, :, :, t:t + m].copy_(k[:, :, done:done + m])
            tv[0, :, :, t:t + m].copy_(v[:, :, done:done + m])
            lay.length += m
            done += m
            if t + m == p:
                page = lay.first + len(lay.pages)
                if (page + 1) * p <= start:  # already out of the window: never written, the tail is reused
                    self._drop(i, len(lay.pages))
                    lay.first += 1
                    self.stats.pages_dropped += 1
                    continue
                off = spill.take()
                spill.write(lay.tail, off, i, page)
                lay.pages.append(off)
                self.stats.page_writes += 1
                lay.tail = spill.buffer()
        while lay.pages and (lay.first + 1) * p <= start:
            self._drop(i, 1)
        self._account()

    def _drop(self, i: int, count: int) -> None:
        """Give back the slots of layer ``i``'s ``count`` oldest held pages (they left its window)."""
        lay = self.layers[i]
        assert self.spill is not None
        for off in lay.pages[:count]:
            self.spill.give(off)
        del lay.pages[:count]
        lay.first += count
        self.stats.pages_dropped += count

    # -- whole-cache operations -------------------------------------------------------------------------------------
    def length(self, i: int) -> int:
        return self.layers[i].length

    def held_from(self, i: int) -> int:
        """The first token layer ``i`` still holds (0, or later for a sliding layer past its window)."""
        lay = self.layers[i]
        return lay.base if lay.resident else lay.first * self.page

    def export(self, i: int, start: int, stop: int) -> tuple[Any, Any]:
        """Copies of layer ``i``'s K and V for tokens ``[start, stop)`` (``[B, H, stop-start, D]``)."""
        lay, g = self.layers[i], self.geo
        if g is None or not self.held_from(i) <= start <= stop <= lay.length:
            held = f"[{self.held_from(i)}, {lay.length})" if lay.window is None or g is None else \
                f"[{self.held_from(i)}, {lay.length}) (a sliding layer keeps its window of {lay.window} only)"
            raise KVConfigError(f"layer {i} holds tokens {held}; cannot export [{start}, {stop})")
        if lay.resident:
            return (lay.keys[:, :, start - lay.base:stop - lay.base].clone(),
                    lay.values[:, :, start - lay.base:stop - lay.base].clone())
        out_k = self.torch.empty((g.batch, g.k_heads, stop - start, g.k_dim), dtype=g.dtype)
        out_v = self.torch.empty((g.batch, g.v_heads, stop - start, g.v_dim), dtype=g.dtype)
        p0, p1 = start // g.page, -(-stop // g.page)
        for p in range(p0, p1):
            lo, hi = max(start, p * g.page), min(stop, (p + 1) * g.page)
            if p < lay.first + len(lay.pages):
                assert self.spill is not None
                self.spill.wait_layer(i)
                buf = alloc(g.slot_bytes)
                self.spill.read(buf, [lay.pages[p - lay.first]], i, p).result()
                self.stats.other_bytes_read += g.slot_bytes
                sk, sv = self._group_views(buf, 1)
            else:
                sk, sv = self._group_views(lay.tail, 1)
            out_k[:, :, lo - start:hi - start].copy_(sk[0, :, :, lo - p * g.page:hi - p * g.page])
            out_v[:, :, lo - start:hi - start].copy_(sv[0, :, :, lo - p * g.page:hi - p * g.page])
        return out_k, out_v

    def crop(self, i: int, remove: int) -> None:
        """Drop the last ``-remove`` tokens of layer ``i`` (transformers' convention: a negative count)."""
        if remove > 0:
            raise KVConfigError(f"crop takes a negative count of tokens to remove, got {remove}")
        lay, g = self.layers[i], self.geo
        kept = max(0, lay.length + remove)
        if g is None or kept == lay.length:
            return
        if kept - keep(kept, lay.window) < self.held_from(i):
            raise KVConfigError(f"layer {i} keeps only its sliding window of {lay.window} tokens (from token "
                                f"{self.held_from(i)}): it cannot go back to {kept} tokens")
        if lay.resident:
            lay.length = kept
            return
        if i in self._inflight:
            self._discard(i)
        assert self.spill is not None
        self.spill.wait_layer(i)
        while lay.pages and (lay.first + len(lay.pages)) * g.page > kept:  # the page of the new end: the tail
            off = lay.pages.pop()
            if kept > (lay.first + len(lay.pages)) * g.page:
                assert lay.tail is not None
                self.spill.read(lay.tail, [off], i, lay.first + len(lay.pages)).result()
                self.stats.other_bytes_read += g.slot_bytes
            self.spill.give(off)
        lay.length = kept
        self._account()

    def reset(self, i: int) -> None:
        lay = self.layers[i]
        if i in self._inflight:
            self._discard(i)
        if self.spill is not None:
            self.spill.wait_layer(i)
            for off in lay.pages:
                self.spill.give(off)
        self.layers[i] = _Layer(lay.window)
        if not any(lay.length or lay.pages for lay in self.layers) and not self._inflight:
            # empty again (``Cache.reset`` resets every layer): the next sequence may have another
            # batch size or dtype, so the geometry, the spill file and the buffers start over
            if self.spill is not None:
                self.spill.close()
                self._written_before += self.spill.bytes_written
                self.spill = None
            self.geo, self.device, self._staging, self._free_staging, self._work = None, None, [], [], None
        self._account()

    def sync_stats(self) -> KVStats:
        if self.spill is not None:
            self.spill.reap()
            self.stats.write_wait_s += self.spill.write_s
            self.spill.write_s = 0.0
        self._account()
        self.stats.bytes_written = self._written_before + (self.spill.bytes_written if self.spill else 0)
        return self.stats

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for j in list(self._inflight):
                self._discard(j)
            if self.spill is not None:
                self.spill.close()
                self._written_before += self.spill.bytes_written
                self.stats.bytes_written = self._written_before
        finally:
            self.spill = None
            self._staging, self._work = [], None
            self.layers = [_Layer(w) for w in self.windows]
            if self._own_engine:
                self.engine.close()


Future_ = Any  # a concurrent.futures.Future of the engine

__all__ = ["DEFAULT_PAGE_TOKENS", "KVConfigError", "KVStats", "Tier", "default_directory", "min_memory", "parse_memory",
           "spill_order"]
