"""Weight streaming onto a GPU: three tiers, copies overlapped with compute.

A :class:`DeviceStreamer` keeps the plan's resident layers (and everything
outside the layers) in GPU memory.  Every other layer passes through a ring
of GPU slots on each forward pass, copied there on a side stream from one of
two host tiers:

* **cached**: the layer lives in pinned host memory (read once at the start);
* **disk**: the layer is read with direct I/O into one of a few pinned host
  slots, then copied.

::

    compute stream:  layer i (GPU slot A)           | layer i+1 (slot B) ...
    copy stream:     host -> slot B (layer i+1) | host -> slot C (layer i+2)
    disk:            layer i+3 -> pinned slot   | ...

The compute stream waits on the event of a slot's copy before the layer
runs (no host blocking); a slot is copied into again only after the event
recorded on the compute stream when its last layer finished; a pinned host
slot is read into again only after the event of the copy out of it.  Each
tensor sits at a 256-byte boundary of its GPU buffer, as it would in a
model loaded onto the GPU, so the kernels and the outputs are the same.
CRC-32C checks run on the host bytes before they are copied.

With ``device="cpu"`` the same schedule runs on host tensors (copies at
once, events complete): that is how its logic is tested without a GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine.buffers import alloc
from ..engine.cuda import DeviceOps
from .layout import Group, device_items
from .weights import WeightStreamer


@dataclass
class _Entry:
    """One streamed layer on its way to the GPU."""

    layer: int
    gslot: int
    hslot: int | None  # pinned host slot of a disk read (None: cached layer)
    futs: list = field(default_factory=list)
    event: Any = None  # of the copy into the GPU slot, once issued
    error: BaseException | None = None


class DeviceStreamer(WeightStreamer):
    """:class:`WeightStreamer` for a GPU; see the module doc."""

    def __init__(self, *args: Any, device: Any, **kwargs: Any) -> None:
        self.ops = DeviceOps(device)
        self.device = self.ops.device
        self._dev_items: dict[str, tuple[list, int]] = {}
        self._cached: dict[int, np.ndarray] = {}
        self._hslots: list[np.ndarray] = []
        self._hfree: list[int] = []
        self._hpending: deque[tuple[int, Any]] = deque()  # host slot, event of the copy out of it
        self._gslots: list[Any] = []
        self._gfree: list[int] = []
        self._gready: list[Any] = []  # per GPU slot: the event after which it may be copied into
        self._held: dict[str, Any] = {}  # GPU buffers of the resident groups
        self.copied_bytes = 0  # host -> GPU bytes of streamed layers
        super().__init__(*args, **kwargs)

    # -- layout on the device ---------------------------------------------------------------------------------------
    def _items(self, g: Group) -> tuple[list, int]:
        got = self._dev_items.get(g.name)
        if got is None:
            got = self._dev_items[g.name] = device_items(g)
        return got

    def _copy_group(self, g: Group, host: np.ndarray, dev: Any, after: Any) -> Any:
        """Queue the copies of ``g``'s tensors from ``host`` to ``dev``; the event of the last."""
        torch = self._torch
        ev = after
        for k, (_, t, hpos, dpos) in enumerate(self._items(g)[0]):
            ev = self.ops.copy(dev[dpos:dpos + t.nbytes], torch.from_numpy(host[hpos:hpos + t.nbytes]),
                               after=after if k == 0 else None)
        return ev

    def _bind_device(self, g: Group, dev: Any) -> None:
        self._bind(g, dev, [(b, t, dpos) for b, t, _, dpos in self._items(g)[0]])

    # -- the tiers --------------------------------------------------------------------------------------------------
    def _hold(self, g: Group) -> None:
        host = alloc(g.nbytes)  # pageable: read once, copied once
        self._wait(g, self._submit(g, host), host, check=self.verify != "never")
        dev = self.ops.empty(self._items(g)[1])
        self._copy_group(g, host, dev, None).synchronize()
        self._bind_device(g, dev)
        self._held[g.name] = dev

    def _make_slots(self) -> None:
        plan = self.plan
        if not self._cycle:
            return
        for i in plan.cached:
            g = self.groups[i]
            buf = self.ops.host_buffer(g.nbytes)
            self._wait(g, self._submit(g, buf), buf, check=self.verify != "never")
            self.stats_.verified.add(i)
            self.stats_.resident_bytes_read += sum(r.length for r in g.runs)
            self._cached[i] = buf
        self._hslots = [self.ops.host_buffer(plan.host_slot_bytes) for _ in range(plan.host_slots if plan.from_disk else 0)]
        self._hfree = list(range(len(self._hslots)))
        self._gslots = [self.ops.empty(plan.slot_bytes) for _ in range(plan.slots)]
        self._gfree = list(range(len(self._gslots)))
        self._gready = [None] * len(self._gslots)

    def _on_device(self, table: Any) -> Any:
        return table.to(self.device)

    def _take_host_slot(self) -> int | None:
        while self._hpending and self._hpending[0][1].query():
            self._hfree.append(self._hpending.popleft()[0])
        if not self._hfree and self._hpending:  # the oldest copy out of a slot ends soon (PCIe >> disk)
            slot, ev = self._hpending.popleft()
            ev.synchronize()
            self._hfree.append(slot)
        return self._hfree.pop(0) if self._hfree else None

    # -- the schedule -----------------------------------------------------------------------------------------------
    def _fill(self) -> None:
        """Start the next streamed layers into every free GPU slot (disk reads
        first where needed), then copy whatever has arrived."""
        while self._gfree and self._cycle:
            layer = self._cycle[self._next]
            hslot = None
            if layer not in self._cached:
                hslot = self._take_host_slot()
                if hslot is None:
                    break
            self._next = (self._next + 1) % len(self._cycle)
            e = _Entry(layer, self._gfree.pop(0), hslot)
            if hslot is not None:
                e.futs = self._submit(self.groups[layer], self._hslots[hslot])
            self._inflight.append(e)  # type: ignore[arg-type]
        self._copy_arrived(None)

    def _copy_arrived(self, target: _Entry | None) -> None:
        """Copy, in cycle order, every entry whose bytes are on the host; wait for
        ``target``'s reads if it is not there yet."""
        for e in self._inflight:
            if e.event is not None or e.error is not None:  # type: ignore[attr-defined]
                continue
            if e is not target and not all(f.done() for f in e.futs):  # type: ignore[attr-defined]
                break
            self._copy_entry(e)  # type: ignore[arg-type]
            if e is target:
                break

    def _copy_entry(self, e: _Entry) -> None:
        g = self.groups[e.layer]
        host = self._cached[e.layer] if e.hslot is None else self._hslots[e.hslot]
        if e.futs:
            check = self.verify == "always" or (self.verify == "first" and e.layer not in self.stats_.verified)
            try:
                self._wait(g, e.futs, host, check=check)
            except BaseException as exc:  # noqa: BLE001 - raised when the layer is reached
                e.error = exc
                self._hfree.append(e.hslot)  # type: ignore[arg-type]
                return
            self.stats_.verified.add(e.layer)
        e.event = self._copy_group(g, host, self._gslots[e.gslot], self._gready[e.gslot])
        if e.hslot is not None:
            self._hpending.append((e.hslot, e.event))

    def _drain(self) -> None:
        while self._inflight:
            e: _Entry = self._inflight.popleft()  # type: ignore[assignment]
            for f in e.futs:
                with contextlib.suppress(Exception):  # discarded: only their end matters here
                    f.result()
            if e.futs:
                self.stats_.discarded_bytes += sum(r.length for r in self.groups[e.layer].runs)
            if e.event is None and e.hslot is not None and e.error is None:
                self._hfree.append(e.hslot)
            self._gfree.append(e.gslot)  # a copy still queued into it is ordered before any later one

    def _before(self, layer: int, module: Any, args: Any) -> None:
        self._check_grad(module, args)
        if self._bound is not None:
            self._release()
        if not self._inflight or self._inflight[0].layer != layer:  # type: ignore[attr-defined]
            self._drain()
            self._next = self._cycle.index(layer)
            self._fill()
        e: _Entry = self._inflight[0]  # type: ignore[assignment]
        t0 = time.perf_counter()
        self._copy_arrived(e)
        self.stats_.stall_s += time.perf_counter() - t0
        self._inflight.popleft()
        if e.error is not None:
            self._gfree.append(e.gslot)
            raise e.error
        self.ops.wait(e.event)
        g = self.groups[layer]
        if e.futs:
            self.stats_.bytes_read += sum(r.length for r in g.runs)
        self.copied_bytes += g.data_bytes
        self.stats_.layer_loads += 1
        if layer == self._cycle[0]:
            self.stats_.passes += 1
        self._bind_device(g, self._gslots[e.gslot])
        self._bound = (layer, e.gslot)
        self._fill()

    def _release(self) -> None:
        layer, gslot = self._bound  # type: ignore[misc]
        self._gready[gslot] = self.ops.compute_event()  # the layer's kernels are queued: copy after them
        self._unbind(self.groups[layer])
        self._bound = None
        self._gfree.append(gslot)

    def stats(self) -> Any:
        return dataclasses.replace(super().stats(), device=str(self.device), copied_bytes=self.copied_bytes,
                                   cached_layers=len(self.plan.cached), disk_layers=len(self.plan.from_disk),
                                   host_memory_bytes=self.plan.host_memory_bytes)

    def close(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(Exception):  # a broken device must not keep the files open
            self.ops.synchronize()
        super().close()
        self._held.clear()
        self._cached.clear()
        self._hslots, self._gslots, self._hpending = [], [], deque()


__all__ = ["DeviceStreamer"]
