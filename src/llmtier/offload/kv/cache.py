"""A transformers ``Cache`` whose KV pages live in a bounded DRAM pool and spill to SSD.

Each decoder layer is either *resident* (its K and V in DRAM, grown a page at
a time, handed to attention as views) or *spilled* (its full pages on SSD in
the spill file, the page being filled in DRAM).  At the start of every
forward pass the cache checks what the new length needs; when the budget
cannot hold it, layers are spilled in an order that spreads them evenly over
the depth, so that resident layers' compute hides spilled layers' reads.

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
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ...engine import Engine, alloc, open_engine
from ...engine.cuda import require_cuda
from ...errors import LLMTierError
from ...units import human, parse_size
from ..layout import BudgetError
from .spill import MAX_WRITES, SpillFile, remove_stale

DEFAULT_PAGE_TOKENS = 256


class KVConfigError(LLMTierError, ValueError):
    """The model, the device or the call is one the tiered cache does not support."""


@dataclass
class KVStats:
    """Counters of one :class:`TieredCache` (read with :meth:`TieredCache.stats`)."""

    bytes_read: int = 0  # page groups read for attention
    bytes_written: int = 0  # page groups written (spill, and pages that filled)
    discarded_bytes: int = 0  # read ahead, then not used (the pass after the last one, a crop)
    other_bytes_read: int = 0  # read back for a crop or an export (the prefix store)
    page_reads: int = 0
    page_writes: int = 0
    stall_s: float = 0.0  # compute waiting for reads
    write_wait_s: float = 0.0
    forwards: int = 0
    resident_layers: int = 0
    spilled_layers: int = 0
    dram_bytes: int = 0  # what the pool holds now
    peak_dram_bytes: int = 0
    ssd_bytes: int = 0
    reads_by_page: dict[int, int] = field(default_factory=dict)  # page index -> reads (all layers)
    device_bytes: int = 0  # a CUDA model: host -> GPU bytes of the past handed to attention

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Geometry:
    batch: int
    heads: int
    head_dim: int
    page: int  # tokens per page
    dtype: Any  # torch dtype
    itemsize: int

    @property
    def token_bytes(self) -> int:
        """K and V of one token in one layer, all rows."""
        return 2 * self.heads * self.head_dim * self.itemsize * self.batch

    @property
    def group_bytes(self) -> int:
        return self.token_bytes * self.page


def min_memory(layers: int, batch: int, heads: int, head_dim: int, itemsize: int, tokens: int, *,
               page_tokens: int = DEFAULT_PAGE_TOKENS, prefetch: int = 2) -> int:
    """The smallest pool that runs ``tokens`` of context with every layer spilled."""
    g = Geometry(batch, heads, head_dim, page_tokens, None, itemsize)
    cap = -(-tokens // page_tokens) * page_tokens * g.token_bytes
    return layers * g.group_bytes + (max(1, prefetch) + 1) * cap + MAX_WRITES * g.group_bytes


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


class _Layer:
    __slots__ = ("length", "resident", "keys", "values", "pages", "tail")

    def __init__(self) -> None:
        self.length = 0
        self.resident = True
        self.keys: Any = None  # resident: [B, H, capacity, D]
        self.values: Any = None
        self.pages: list[int] = []  # spilled: slots of the full page groups, oldest first
        self.tail: np.ndarray | None = None  # spilled: the page group being filled


class Tier:
    """The state behind a :class:`TieredCache`; every layer object calls into it."""

    def __init__(self, n_layers: int, memory: int, directory: str, page_tokens: int, prefetch: int,
                 engine: Engine | None, io_nice: int | None) -> None:
        import torch  # noqa: PLC0415

        if page_tokens < 1:
            raise KVConfigError(f"page_tokens must be >= 1, got {page_tokens}")
        self.torch = torch
        self.n = n_layers
        self.memory = memory
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        remove_stale(directory)  # spill files of processes that died
        self.page = page_tokens
        self.prefetch = max(1, prefetch)
        self._own_engine = engine is None
        self.engine = engine if engine is not None else open_engine("auto")
        if self._own_engine and io_nice is not None:
            self.engine.prioritize(io_nice)
        self.geo: Geometry | None = None
        self.device: Any = None  # of the model's K/V, set by the first update
        self.layers = [_Layer() for _ in range(n_layers)]
        self.order = spill_order(n_layers)
        self.spill: SpillFile | None = None
        self.stats = KVStats(resident_layers=n_layers)
        self._staging: list[np.ndarray] = []
        self._work: tuple[Any, Any] | None = None  # flat K and V working storage
        self._inflight: dict[int, tuple[int, int, Future_, np.ndarray]] = {}  # layer -> (pages, staging, fut, buf)
        self._free_staging: list[int] = []
        self._closed = False
        self._written_before = 0  # bytes written to spill files closed by a reset

    # -- geometry and budget ----------------------------------------------------------------------------------------
    def _init(self, k: Any) -> None:
        b, h, _, d = k.shape
        if k.device.type not in ("cpu", "cuda"):
            raise KVConfigError(f"TieredCache keeps KV for CPU and CUDA models; got tensors on {k.device}")
        self.device = k.device
        if k.device.type == "cuda":
            require_cuda("a TieredCache of a CUDA model")
        self.geo = Geometry(b, h, d, self.page, k.dtype, k.element_size())

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
        return -(-tokens // self.page) * self.page

    def need(self, tokens: int, resident: set[int]) -> int:
        """DRAM bytes the pool needs at ``tokens`` of context with layers ``resident`` kept."""
        g = self.geo
        assert g is not None
        cap = self._capacity(tokens) * g.token_bytes
        spilled = self.n - len(resident)
        if not spilled:
            return len(resident) * cap
        return (len(resident) * cap + spilled * g.group_bytes + (self.prefetch + 1) * cap
                + MAX_WRITES * g.group_bytes)

    def plan(self, tokens: int) -> None:
        """Spill layers until the budget holds ``tokens`` of context; called at each forward's start."""
        resident = {i for i, lay in enumerate(self.layers) if lay.resident}
        victims = [i for i in self.order if i in resident]
        while self.need(tokens, resident) > self.memory:
            if not victims:
                g = self.geo
                assert g is not None
                low = self.need(tokens, set())
                raise BudgetError(
                    f"KV memory {human(self.memory)} cannot hold the working set at {tokens} tokens "
                    f"(batch {g.batch}): even with every layer on SSD it needs {human(low)} "
                    f"(staging for {self.prefetch} read-ahead layers, the working buffer and one page per layer)")
            i = victims.pop(0)
            resident.discard(i)
            self._spill_layer(i)
        self._account()

    def _account(self) -> None:
        g = self.geo
        if g is None:
            return
        held = 0
        for lay in self.layers:
            if lay.resident and lay.keys is not None:
                held += lay.keys.shape[2] * g.token_bytes
            elif lay.tail is not None:
                held += g.group_bytes
        held += sum(b.nbytes for b in self._staging)
        if self._work is not None:
            held += 2 * self._work[0].numel() * g.itemsize
        if self.spill is not None:
            held += self.spill.writes_in_flight * g.group_bytes
        s = self.stats
        s.dram_bytes = held
        s.peak_dram_bytes = max(s.peak_dram_bytes, held)
        s.resident_layers = sum(lay.resident for lay in self.layers)
        s.spilled_layers = self.n - s.resident_layers
        s.ssd_bytes = self.spill.used_bytes if self.spill is not None else 0

    def _spill_file(self) -> SpillFile:
        if self.spill is None:
            assert self.geo is not None
            self.spill = SpillFile(self.engine, self.directory, self.geo.group_bytes)
        return self.spill

    def _spill_layer(self, i: int) -> None:
        """Make layer ``i`` spilled: its full pages go to SSD, the rest to a tail page group."""
        lay = self.layers[i]
        lay.resident = False
        keys, values, n = lay.keys, lay.values, lay.length
        lay.keys = lay.values = None
        lay.length = 0
        if n:
            self._append(i, keys[:, :, :n], values[:, :, :n])
        elif lay.tail is None:
            lay.tail = self._spill_file().buffer()

    # -- the forward path -------------------------------------------------------------------------------------------
    def update(self, i: int, k: Any, v: Any) -> tuple[Any, Any]:
        if self._closed:
            raise KVConfigError("this TieredCache is closed")
        if self.geo is None:
            self._init(k)
        g = self.geo
        assert g is not None
        if k.shape[0] != g.batch or k.shape[1] != g.heads or k.shape[3] != g.head_dim or k.dtype != g.dtype:
            raise KVConfigError(f"layer {i}: K/V of shape {tuple(k.shape)} {k.dtype} do not match the cache's "
                                f"[{g.batch}, {g.heads}, *, {g.head_dim}] {g.dtype}")
        if k.device != self.device:
            raise KVConfigError(f"layer {i}: K/V on {k.device}, the cache holds KV of a model on {self.device}")
        lay = self.layers[i]
        q = k.shape[2]
        if i == 0:  # a forward pass starts: make room for its tokens
            self.stats.forwards += 1
            self.plan(lay.length + q)
        if self.device.type == "cpu":
            if lay.resident:
                return self._update_resident(lay, k, v)
            return self._update_spilled(i, lay, k, v)
        # A CUDA model: the same pool on the host; attention gets a GPU copy of the layer's past + new tokens.
        kh, vh = self._host(k, v)
        if lay.resident:
            self._update_resident(lay, kh, vh)
            n = lay.length
            return self._to_device(lay.keys)[:, :, :n], self._to_device(lay.values)[:, :, :n]
        wk, wv = self._update_spilled(i, lay, kh, vh)
        return self._to_device(wk), self._to_device(wv)

    def _update_resident(self, lay: _Layer, k: Any, v: Any) -> tuple[Any, Any]:
        n, q = lay.length, k.shape[2]
        cap = self._capacity(n + q)
        if lay.keys is None or lay.keys.shape[2] < cap:
            shape = (k.shape[0], k.shape[1], cap, k.shape[3])
            pin = self.device.type == "cuda"
            nk = self.torch.empty(shape, dtype=k.dtype, pin_memory=pin)
            nv = self.torch.empty(shape, dtype=k.dtype, pin_memory=pin)
            if n:
                nk[:, :, :n].copy_(lay.keys[:, :, :n])
                nv[:, :, :n].copy_(lay.values[:, :, :n])
            lay.keys, lay.values = nk, nv
            self._account()
        lay.keys[:, :, n:n + q].copy_(k)
        lay.values[:, :, n:n + q].copy_(v)
        lay.length = n + q
        return lay.keys[:, :, :n + q], lay.values[:, :, :n + q]

    def _update_spilled(self, i: int, lay: _Layer, k: Any, v: Any) -> tuple[Any, Any]:
        g = self.geo
        assert g is not None
        n, q = lay.length, k.shape[2]
        if n == 0:  # nothing past: attention needs only the new tokens
            self._append(i, k, v)
            self._read_ahead(i)
            return k, v
        full = len(lay.pages)
        staged = self._staged(i, full)
        wk, wv = self._working(n + q)
        if full:
            pages = self._torch_view(staged[:full * g.group_bytes], (full, g.batch, 2, g.heads, g.page, g.head_dim))
            # [full, B, 2, H, P, D] -> [B, H, full, P, D] -> the first full*P tokens of the working K and V
            wk[:, :, :full * g.page].view(g.batch, g.heads, full, g.page, g.head_dim).copy_(
                pages[:, :, 0].permute(1, 2, 0, 3, 4))
            wv[:, :, :full * g.page].view(g.batch, g.heads, full, g.page, g.head_dim).copy_(
                pages[:, :, 1].permute(1, 2, 0, 3, 4))
        t = n - full * g.page
        if t:
            tail = self._tail_view(lay)
            wk[:, :, full * g.page:n].copy_(tail[:, 0, :, :t])
            wv[:, :, full * g.page:n].copy_(tail[:, 1, :, :t])
        wk[:, :, n:].copy_(k)
        wv[:, :, n:].copy_(v)
        self._release_staging(i)
        self._append(i, k, v)
        self._read_ahead(i)
        return wk, wv

    # -- appending and writing --------------------------------------------------------------------------------------
    def _torch_view(self, buf: np.ndarray, shape: tuple[int, ...]) -> Any:
        g = self.geo
        assert g is not None
        return self.torch.from_numpy(buf).view(g.dtype).view(shape)

    def _tail_view(self, lay: _Layer) -> Any:
        g = self.geo
        assert g is not None and lay.tail is not None
        return self._torch_view(lay.tail, (g.batch, 2, g.heads, g.page, g.head_dim))

    def _append(self, i: int, k: Any, v: Any) -> None:
        """Put new tokens of spilled layer ``i`` in its tail; write each page group that fills."""
        g = self.geo
        assert g is not None
        lay, spill = self.layers[i], self._spill_file()
        if lay.tail is None:
            lay.tail = spill.buffer()
        done, q = 0, k.shape[2]
        while done < q:
            t = lay.length - len(lay.pages) * g.page
            m = min(g.page - t, q - done)
            tail = self._tail_view(lay)
            tail[:, 0, :, t:t + m].copy_(k[:, :, done:done + m])
            tail[:, 1, :, t:t + m].copy_(v[:, :, done:done + m])
            lay.length += m
            done += m
            if t + m == g.page:
                off = spill.take()
                spill.write(lay.tail, off, i, len(lay.pages))
                lay.pages.append(off)
                self.stats.page_writes += 1
                lay.tail = spill.buffer()
        self._account()

    # -- reading ----------------------------------------------------------------------------------------------------
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
        need = full * g.group_bytes
        if self._staging[s].nbytes < need:
            self._staging[s] = alloc(self._capacity(self.layers[j].length) // g.page * g.group_bytes)
            self._account()
        t0 = time.perf_counter()
        self.spill.wait_layer(j)
        self.stats.write_wait_s += time.perf_counter() - t0
        fut = self.spill.read(self._staging[s], self.layers[j].pages[:full], j)
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
        self.stats.bytes_read += full * g.group_bytes
        self.stats.page_reads += full
        for p in range(full):
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
        self.stats.discarded_bytes += got[0] * self.geo.group_bytes

    def _working(self, tokens: int) -> tuple[Any, Any]:
        g = self.geo
        assert g is not None
        numel = g.batch * g.heads * tokens * g.head_dim
        if self._work is None or self._work[0].numel() < numel:
            cap = g.batch * g.heads * self._capacity(tokens) * g.head_dim
            pin = self.device.type == "cuda"
            self._work = (self.torch.empty(cap, dtype=g.dtype, pin_memory=pin),
                          self.torch.empty(cap, dtype=g.dtype, pin_memory=pin))
            self._account()
        shape = (g.batch, g.heads, tokens, g.head_dim)
        return self._work[0][:numel].view(shape), self._work[1][:numel].view(shape)

    # -- whole-cache operations -------------------------------------------------------------------------------------
    def length(self, i: int) -> int:
        return self.layers[i].length

    def export(self, i: int, start: int, stop: int) -> tuple[Any, Any]:
        """Copies of layer ``i``'s K and V for tokens ``[start, stop)`` ([B, H, stop-start, D])."""
        lay, g = self.layers[i], self.geo
        if g is None or not 0 <= start <= stop <= lay.length:
            raise KVConfigError(f"layer {i} holds {lay.length} tokens; cannot export [{start}, {stop})")
        if lay.resident:
            return lay.keys[:, :, start:stop].clone(), lay.values[:, :, start:stop].clone()
        out_k = self.torch.empty((g.batch, g.heads, stop - start, g.head_dim), dtype=g.dtype)
        out_v = self.torch.empty_like(out_k)
        p0, p1 = start // g.page, -(-stop // g.page)
        for p in range(p0, p1):
            lo, hi = max(start, p * g.page), min(stop, (p + 1) * g.page)
            if p < len(lay.pages):
                assert self.spill is not None
                self.spill.wait_layer(i)
                buf = alloc(g.group_bytes)
                self.spill.read(buf, [lay.pages[p]], i, p).result()
                self.stats.other_bytes_read += g.group_bytes
                src = self._torch_view(buf, (g.batch, 2, g.heads, g.page, g.head_dim))
            else:
                src = self._tail_view(lay)
            out_k[:, :, lo - start:hi - start].copy_(src[:, 0, :, lo - p * g.page:hi - p * g.page])
            out_v[:, :, lo - start:hi - start].copy_(src[:, 1, :, lo - p * g.page:hi - p * g.page])
        return out_k, out_v

    def crop(self, i: int, remove: int) -> None:
        """Drop the last ``-remove`` tokens of layer ``i`` (transformers' convention: a negative count)."""
        if remove > 0:
            raise KVConfigError(f"crop takes a negative count of tokens to remove, got {remove}")
        lay, g = self.layers[i], self.geo
        keep = max(0, lay.length + remove)
        if g is None or keep == lay.length:
            return
        if lay.resident:
            lay.length = keep
            return
        if i in self._inflight:
            self._discard(i)
        assert self.spill is not None
        self.spill.wait_layer(i)
        while len(lay.pages) * g.page > keep:  # the page holding the new end comes back as the tail
            off = lay.pages.pop()
            if keep > len(lay.pages) * g.page:
                assert lay.tail is not None
                self.spill.read(lay.tail, [off], i, len(lay.pages)).result()
                self.stats.other_bytes_read += g.group_bytes
            self.spill.give(off)
        lay.length = keep
        self._account()

    def reset(self, i: int) -> None:
        lay = self.layers[i]
        if i in self._inflight:
            self._discard(i)
        if self.spill is not None:
            self.spill.wait_layer(i)
            for off in lay.pages:
                self.spill.give(off)
        self.layers[i] = _Layer()
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
            self.layers = [_Layer() for _ in range(self.n)]
            if self._own_engine:
                self.engine.close()


Future_ = Any  # a concurrent.futures.Future of the engine


def default_directory() -> str:
    """Where spill files go when no ``path`` is given: ``$LLMTIER_KV_DIR``, else the temporary directory."""
    return os.environ.get("LLMTIER_KV_DIR") or tempfile.gettempdir()


def parse_memory(memory: int | str) -> int:
    m = parse_size(memory) if isinstance(memory, str) else int(memory)
    if m <= 0:
        raise KVConfigError(f"KV memory must be > 0, got {memory!r}")
    return m
