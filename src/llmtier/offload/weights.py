"""Run a Hugging Face causal LM whose weights exceed a memory budget.

The model is built on the meta device.  Embeddings, final norm, head and as
many whole decoder layers as the budget allows are read once into aligned
memory and stay there; the other layers stream from the checkpoint on every
forward pass, through a fixed pool of aligned slot buffers:

    pass t:  ... | layer i computes in slot A | ...
    disk:        | layer i+1 (next streamed) -> slot B, queued before i ran |
    after i:     slot A released -> next streamed layer read into it

Reads are large direct reads (one per contiguous run of a layer's tensors),
so the page cache neither flatters the speed nor takes the budget.  The order
of streamed layers is a cycle: after the last one, the first ones of the next
forward pass are already on their way while the head and sampling compute.
Resident layers are spread evenly between streamed ones so that their compute
hides reads.  Parameters are bound as views of the buffers in a forward
pre-hook and put back on the meta device in the forward hook; nothing is
copied and no parameter survives its slot.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine import Engine, alloc
from ..engine.cuda import require_cuda
from ..errors import ChecksumError, FormatError, LLMTierError
from ..plan.weights import adopt_plan
from ..store import dtypes
from ..store.format import TensorInfo, crc32c
from ..store.reader import TensorSource, verify_mode
from . import hf
from .hfcompat import TransformersLike
from .layout import (
    INFLIGHT_BYTES,
    MAX_SLOTS,
    RUN_OVERHEAD,
    BudgetError,
    Group,
    Layout,
    Plan,
    make_group,
    make_plan,
    open_layout,
    spread,
)
from .stats import WeightStats


# -- the streamer --------------------------------------------------------------------------------------------------
@dataclass
class StreamStats:
    """Counters of one streamed model (read with :meth:`WeightStreamer.stats`)."""

    bytes_read: int = 0  # streamed layers, after the start
    layer_loads: int = 0
    passes: int = 0  # forward passes through the decoder
    stall_s: float = 0.0  # time the compute waited for reads
    load_s: float = 0.0  # reading the resident set at the start
    resident_bytes_read: int = 0
    discarded_bytes: int = 0  # read ahead but never used (end of a run, or a pass cut short)
    embedding_bytes_read: int = 0  # rows of the input embedding table
    verified: set[int] = field(default_factory=set)


class WeightStreamer:
    """Binds a skeleton model to a checkpoint under a plan; see the module doc."""

    def __init__(self, source: TensorSource, model: Any, groups: list[Group], outside: Group, plan: Plan, *,
                 layers_prefix: str, verify: str, tag: str = "weights",
                 embedding: tuple[hf.Binding, TensorInfo] | None = None) -> None:
        import torch  # noqa: PLC0415

        self._torch = torch
        self.source, self.model, self.plan = source, model, plan
        self.layers_prefix = layers_prefix
        self.verify = verify
        self.tag = tag
        self.groups = groups
        self.stats_ = StreamStats()
        self._closed = False
        self._placeholders: dict[tuple[int, str], Any] = {}
        self._inflight: deque[tuple[int, int, list]] = deque()  # (layer, slot, futures)
        self._bound: tuple[int, int] | None = None
        self._hooks: list[Any] = []
        self._resident: dict[str, np.ndarray] = {}
        self._slots: list[np.ndarray] = []
        self._free: list[int] = []
        self._cycle = list(plan.streamed)
        self._next = 0
        self._embedding = embedding if plan.on_demand_bytes else None
        self._rows = alloc(0)
        self._padding: Any = None
        try:
            t0 = time.perf_counter()
            if embedding is not None and not plan.on_demand_bytes:  # it fits: held like the rest
                outside = make_group(outside.name, None, [*((b, t) for b, t, _ in outside.items), embedding])
            for g in [outside, *(groups[i] for i in plan.resident)]:
                self._hold(g)
                self.stats_.resident_bytes_read += sum(r.length for r in g.runs)
            self.stats_.load_s = time.perf_counter() - t0
            self._make_slots()
            self._hooks.append(model.register_forward_pre_hook(self._check_open))
            if self._embedding is not None:
                if verify != "never":
                    self._verify_table(*self._embedding)
                emb = self._embedding[0].places[0][0]
                self._padding = emb.padding_idx
                # Between passes the table is a one-element stand-in on the compute device, not a meta
                # tensor: model code that asks it where to put the ids (Llama 4) gets the compute device.
                self._placeholders.setdefault((id(emb), "weight"), emb._parameters["weight"])
                b = self._embedding[0]
                stub = self._torch.empty((), dtype=b.dtype, device=self.device).expand(b.shape)
                self._emb_stub = self._torch.nn.Parameter(stub, requires_grad=False)
                emb._parameters["weight"] = self._emb_stub
                self._hooks.append(emb.register_forward_pre_hook(self._rows_before))
                self._hooks.append(emb.register_forward_hook(self._rows_after))
            layer_list = dict(model.named_modules())[layers_prefix]
            for i in self._cycle:
                mod = layer_list[i]
                self._hooks.append(mod.register_forward_pre_hook(functools.partial(self._before, i)))
                self._hooks.append(mod.register_forward_hook(functools.partial(self._after, i)))
            self._fill()
        except BaseException:
            self.close()
            raise

    # -- what each tier holds (the GPU streamer overrides these) ----------------------------------------------------
    device: Any = "cpu"

    def _hold(self, g: Group) -> None:
        """Read group ``g`` once and keep it bound (the resident set)."""
        buf = alloc(g.nbytes, huge=True)
        self._wait(g, self._submit(g, buf), buf, check=self.verify != "never")
        self._bind(g, buf)
        self._resident[g.name] = buf

    def _make_slots(self) -> None:
        self._slots = [alloc(self.plan.slot_bytes, huge=True) for _ in range(self.plan.slots if self._cycle else 0)]
        self._free = list(range(len(self._slots)))

    def _on_device(self, table: Any) -> Any:
        """A tensor built on the host, where the layers compute (the CPU here)."""
        return table

    # -- reading ---------------------------------------------------------------------------------------------------
    def _submit(self, g: Group, buf: np.ndarray) -> list:
        """The group's runs, one submission per file (a future per file, its ``runs`` the indices of the runs it
        reads: one batch costs the engine's bookkeeping once, not once per run)."""
        by_file: dict[str, list[int]] = {}
        for k, r in enumerate(g.runs):
            by_file.setdefault(r.file, []).append(k)
        tag = f"{self.tag}:{g.name}"
        futs = []
        for name, idx in by_file.items():
            runs = [g.runs[k] for k in idx]
            fut = self.source.file(name).pread_many([buf[r.pos:r.pos + r.length] for r in runs], [r.start for r in runs],
                                                    tags=[tag] * len(runs), exact=False)
            fut.runs = idx
            futs.append(fut)
        return futs

    def _wait(self, g: Group, futs: list, buf: np.ndarray, *, check: bool) -> None:
        done = [0] * len(g.runs)
        error = None
        for fut in futs:  # all of them, even after a failure: no read may still write into a freed slot
            try:
                for k, got in zip(fut.runs, fut.result()):
                    done[k] = got
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others finished
                error = error or exc
        if error is not None:
            raise error
        for r, got in zip(g.runs, done):
            if got < r.need:
                raise FormatError(f"{g.name}: the file ends before the tensor data its index lists "
                                  f"({got} of {r.need} bytes at offset {r.start})", path=r.file, field="size")
        if check:
            for _, t, pos in g.items:
                if t.crc32c is not None and crc32c(buf[pos:pos + t.nbytes]) != t.crc32c:
                    raise ChecksumError(f"tensor {t.name!r}: CRC-32C mismatch (the data on disk is damaged)",
                                        path=t.file, field=t.name)
            for src, spans in g.checks:  # sources of fused tensors, over their pieces in order
                crc = 0
                for pos, n in spans:
                    crc = crc32c(buf[pos:pos + n], crc)
                if crc != src.crc32c:
                    raise ChecksumError(f"tensor {src.name!r}: CRC-32C mismatch (the data on disk is damaged)",
                                        path=src.file, field=src.name)

    def _tensor(self, b: hf.Binding, t: TensorInfo, buf: Any, pos: int) -> Any:
        torch = self._torch
        raw = buf[pos:pos + t.nbytes]
        dt = dtypes.torch_dtype(t.dtype)
        if isinstance(raw, torch.Tensor):  # device memory, laid out with every tensor aligned
            return raw.view(dt).reshape(b.shape)
        if pos % max(1, t.dtype.itemsize):  # unaligned element (odd safetensors layouts): copy
            x = torch.from_numpy(raw.copy()).view(dt).reshape(b.shape)
        else:
            x = torch.from_numpy(raw).view(dt).reshape(b.shape)
        return x.to(b.dtype) if x.dtype != b.dtype and x.is_floating_point() else x  # stream_model(dtype=): cast

    def _bind(self, g: Group, buf: Any, items: list | None = None) -> None:
        torch = self._torch
        for b, t, pos in g.items if items is None else items:
            x = self._tensor(b, t, buf, pos)
            for module, attr, is_param in b.places:
                key = (id(module), attr)
                if is_param:
                    self._placeholders.setdefault(key, module._parameters[attr])
                    # requires_grad as from_pretrained leaves it: torch picks its matmul path by it
                    # (without it a strided 3-D input makes a copy of the weight per row: +1 GiB for
                    # TinyLlama's head at batch 8, and other rounding), so the outputs stay bitwise equal.
                    module._parameters[attr] = torch.nn.Parameter(x, requires_grad=x.is_floating_point())
                else:
                    self._placeholders.setdefault(key, module._buffers[attr])
                    module._buffers[attr] = x.to(b.dtype)

    def _unbind(self, g: Group) -> None:
        for b, _, _ in g.items:
            for module, attr, is_param in b.places:
                meta = self._placeholders.get((id(module), attr))
                if meta is not None:
                    (module._parameters if is_param else module._buffers)[attr] = meta

    def _fill(self) -> None:
        """Queue reads of the next streamed layers into every free slot."""
        while self._free and self._cycle:
            layer = self._cycle[self._next]
            self._next = (self._next + 1) % len(self._cycle)
            slot = self._free.pop(0)
            self._inflight.append((layer, slot, self._submit(self.groups[layer], self._slots[slot])))

    def _drain(self) -> None:
        while self._inflight:
            layer, slot, futs = self._inflight.popleft()
            self.stats_.discarded_bytes += sum(r.length for r in self.groups[layer].runs)
            for f in futs:
                with contextlib.suppress(Exception):  # the reads are discarded: only their end matters here
                    f.result()
            self._free.append(slot)

    # -- the embedding table, by rows ---------------------------------------------------------------------------
    def _verify_table(self, b: hf.Binding, t: TensorInfo) -> None:
        """Check the table's CRC-32C once, in 8 MiB pieces (its rows are read one by one later)."""
        if t.crc32c is None:
            return
        step = max(1, (8 << 20) // max(1, t.row_bytes))
        crc = 0
        for a in range(0, t.shape[0], step):
            crc = crc32c(self.source.get(t.name, rows=slice(a, a + step), verify=False).reshape(-1).view("uint8"), crc)
        if crc != t.crc32c:
            raise ChecksumError(f"tensor {t.name!r}: CRC-32C mismatch (the data on disk is damaged)", path=t.file,
                                field=t.name)

    def _rows_before(self, module: Any, args: Any) -> Any:
        """Read the rows of the tokens at hand; the module sees a table of just
        those rows and ids renumbered into it (an embedding is a gather: the
        output is the same, bit for bit)."""
        torch = self._torch
        self._check_grad(module, args)
        b, t = self._embedding  # type: ignore[misc]
        ids = args[0]
        rows, inverse = torch.unique(ids, return_inverse=True)
        if rows.numel() and (int(rows[0]) < 0 or int(rows[-1]) >= t.shape[0]):
            raise IndexError(f"token id out of range for an embedding table of {t.shape[0]} rows")
        n, rb = rows.numel(), t.row_bytes
        if self._rows.nbytes < n * rb:
            self._rows = alloc(max(n * rb, 2 * self._rows.nbytes))
        if n:
            self.source.file(t.file).pread_many([self._rows[k * rb:(k + 1) * rb] for k in range(n)],
                                                 [t.offset + int(r) * rb for r in rows.tolist()],
                                                 tags=[f"{self.tag}:embedding"] * n).result()
        self.stats_.embedding_bytes_read += n * rb
        table = torch.from_numpy(self._rows[:n * rb]).view(dtypes.torch_dtype(t.dtype)).reshape(n, *b.shape[1:])
        if table.dtype != b.dtype and table.is_floating_point():
            table = table.to(b.dtype)
        table = self._on_device(table)
        self._placeholders.setdefault((id(module), "weight"), module._parameters["weight"])
        module._parameters["weight"] = torch.nn.Parameter(table, requires_grad=table.is_floating_point())
        # padding_idx only shapes gradients (refused here), but F.embedding checks it against the table's rows
        module.padding_idx = None
        return (inverse.reshape(ids.shape), *args[1:])

    def _rows_after(self, module: Any, args: Any, output: Any) -> None:
        module._parameters["weight"] = self._emb_stub
        module.padding_idx = self._padding

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _check_grad(self, module: Any, args: Any) -> None:
        self._check_open(module, args)
        if self._torch.is_grad_enabled():
            raise LLMTierError("streamed weights are for inference: call the model under torch.no_grad() or "
                               "torch.inference_mode() (generate() does); a slot is reused as soon as its layer ran")

    def _check_open(self, module: Any, args: Any) -> None:
        if self._closed:
            raise LLMTierError("this streamed model was closed; open it again with stream_model()")

    def _before(self, layer: int, module: Any, args: Any) -> None:
        self._check_grad(module, args)
        if self._bound is not None:  # the previous layer raised before its forward hook ran
            self._release()
        if not self._inflight or self._inflight[0][0] != layer:
            # Out of the expected order (a pass cut short, or a caller running layers
            # by hand): drop what was read ahead and restart the cycle at this layer.
            self._drain()
            self._next = self._cycle.index(layer)
            self._fill()
        _, slot, futs = self._inflight.popleft()
        self._fill()
        g = self.groups[layer]
        t0 = time.perf_counter()
        check = self.verify == "always" or (self.verify == "first" and layer not in self.stats_.verified)
        try:
            self._wait(g, futs, self._slots[slot], check=check)
        except BaseException:
            self._free.append(slot)
            raise
        self.stats_.stall_s += time.perf_counter() - t0
        self.stats_.verified.add(layer)
        self.stats_.bytes_read += sum(r.length for r in g.runs)
        self.stats_.layer_loads += 1
        if layer == self._cycle[0]:
            self.stats_.passes += 1
        self._bind(g, self._slots[slot])
        self._bound = (layer, slot)

    def _after(self, layer: int, module: Any, args: Any, output: Any) -> None:
        self._release()
        self._fill()

    def _release(self) -> None:
        layer, slot = self._bound  # type: ignore[misc]
        self._unbind(self.groups[layer])
        self._bound = None
        self._free.append(slot)

    # -- public ----------------------------------------------------------------------------------------------------
    def bookkeeping_s(self, rounds: int = 20) -> float:
        """The streamer's own CPU time per streamed layer and pass (its reads submitted, collected once done, its
        parameters bound and put back), the disk's time left out: the median over ``rounds`` passes of the CPU
        streamed layers.  Between forwards only; what was read ahead is dropped and read again."""
        if self._bound is not None or type(self._slots) is not list or not self._slots:
            raise LLMTierError("bookkeeping_s() runs between forwards, on a model streamed to the CPU")
        self._drain()
        buf, times = self._slots[self._free[0]], []
        try:
            for _ in range(max(1, rounds)):
                for layer in self.plan.from_disk:
                    g = self.groups[layer]
                    t0 = time.perf_counter()
                    futs = self._submit(g, buf)
                    t1 = time.perf_counter()
                    for fut in futs:
                        while not fut.done():
                            time.sleep(0.0002)
                    t2 = time.perf_counter()
                    self._wait(g, futs, buf, check=False)
                    self._bind(g, buf)
                    self._unbind(g)
                    times.append(t1 - t0 + time.perf_counter() - t2)
        finally:
            self._next = 0
            self._fill()
        return float(np.median(times)) if times else 0.0

    def stats(self) -> WeightStats:
        """The counters now: attributes (``stats().bytes_read``) or ``stats().as_dict()``."""
        s = self.stats_
        return WeightStats(bytes_read=s.bytes_read, layer_loads=s.layer_loads, passes=s.passes, stall_s=s.stall_s,
                           load_s=s.load_s, discarded_bytes=s.discarded_bytes,
                           embedding_bytes_read=s.embedding_bytes_read, resident_bytes_read=s.resident_bytes_read,
                           resident_bytes=self.plan.resident_bytes, weights_memory_bytes=self.plan.memory_bytes,
                           streamed_bytes_per_pass=self.plan.streamed_bytes_per_pass,
                           resident_share=self.plan.resident_share)

    def close(self) -> None:
        """Wait for reads in flight, put every parameter back on the meta device,
        free the buffers and close the checkpoint's files."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks[1:]:  # the first one says the model is closed if it is called again
            h.remove()
        del self._hooks[1:]
        self._drain()
        self._bound = None
        self._placeholders_restore()
        self._slots.clear()
        self._free.clear()
        self._resident.clear()
        self._rows = alloc(0)
        if self._embedding is not None:
            self._embedding[0].places[0][0].padding_idx = self._padding
        self.source.close()
        gc.collect()  # views of the buffers can sit in reference cycles (torch objects); free them now

    def _placeholders_restore(self) -> None:
        modules = {id(m): m for m in self.model.modules()}
        for (mid, attr), meta in self._placeholders.items():
            m = modules.get(mid)
            if m is None:
                continue
            if attr in m._parameters:
                m._parameters[attr] = meta
            elif attr in m._buffers:
                m._buffers[attr] = meta


def bind_streamer(layout: Layout, plan: Plan, device: str = "cpu", *, verify: str = "first") -> WeightStreamer:
    """The streamer of ``layout`` under ``plan``: a :class:`WeightStreamer` on
    the CPU, a :class:`~llmtier.offload.device.DeviceStreamer` elsewhere (its
    tiered schedule also runs on ``"cpu"`` when ``plan.device`` is set, which
    is how it is tested without a GPU)."""
    kw = {"layers_prefix": layout.layers_prefix, "verify": verify, "embedding": layout.embedding}
    args = (layout.source, layout.model, layout.groups, layout.outside, plan)
    if plan.device == "cpu":
        return WeightStreamer(*args, **kw)
    from .device import DeviceStreamer  # noqa: PLC0415 - imports the GPU module only for a GPU plan

    _buffers_to(layout.model, device)
    return DeviceStreamer(*args, device=device, **kw)


def _buffers_to(model: Any, device: str) -> None:
    """Move the buffers the skeleton computed (rotary tables ...) to ``device``."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.device.type != "meta":
                module._buffers[name] = buf.to(device)


# -- the model as a context manager --------------------------------------------------------------------------------
class _Streamed:
    """Mixed into the model's class: ``with stream_model(...) as model:``."""

    llmtier: WeightStreamer

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.llmtier.close()

    def close(self) -> None:
        """Release the buffers and files of the streamed weights."""
        self.llmtier.close()


@functools.cache
def _streamed_class(cls: type) -> type:
    return type(cls.__name__, (_Streamed, TransformersLike, cls), {"__module__": cls.__module__,
                                                                  "__qualname__": cls.__qualname__})


def stream_model(path: str | os.PathLike[str], memory: int | str | None = None, device: Any = "cpu", *, dtype: Any = None,
                 host_memory: int | str | None = None, prefetch: int | None = None, engine: Engine | None = None,
                 verify: bool | str = "first", io_nice: int | None = -10, experts: str | None = None,
                 predict: bool | str = "auto", profile: Any = None, plan: Plan | None = None) -> Any:
    """A transformers causal LM whose weights stream from ``path`` within ``memory`` bytes.

    ``path``: a Hugging Face model directory (config.json + safetensors, read
    in place) or an llmtier store made by ``llmtier convert``.  ``memory``:
    bytes (or ``"4GiB"``) for the weights, resident layers and slot buffers
    together; activations and the KV cache are outside it.  ``prefetch``:
    layers read ahead (default: from the budget).  ``verify``: check CRC-32C
    (stores only) the ``"first"`` time each tensor is read (default),
    ``"always"`` or ``"never"``.  ``io_nice``: the nice value of the I/O
    threads (default -10, where permitted: torch's compute threads spin and
    would otherwise starve the reads; None leaves them).

    ``device="cuda"``: ``memory`` is GPU memory (layers outside, resident
    layers, three GPU slots) and ``host_memory`` is pinned host memory that
    caches streamed layers and holds the disk's slots (``None``: no cache,
    every streamed layer is read from the disk); see
    :mod:`llmtier.offload.device`.  The model is in eval mode and ready for
    ``generate()``; use it as a context manager (or call ``close()``) to
    release its buffers and files.  ``model.llmtier`` is the
    :class:`WeightStreamer`, with ``.plan`` and ``.stats()``.

    ``experts="lru"`` / ``"lfu"`` / ``"profile"`` (a MoE model, on the CPU):
    the routed experts are cached and read one by one as the router picks
    them instead of streaming with their layer; ``predict`` prefetches the
    next layer's guessed experts (``True``), or only while the recent guesses
    were right often enough (``"auto"``, the default), or never (``False``);
    ``profile`` is the profile policy's
    expert frequencies (default: the one saved beside the model).  See
    :mod:`llmtier.offload.moe`.

    ``plan``: the weights' part of the planner's placement
    (``llmtier.plan.plan_inference(...).weights``) instead of ``memory``: its
    resident layers, slots and embedding choice are taken as they are, with
    this checkpoint's sizes (:func:`llmtier.plan.weights.adopt_plan`).
    """
    if (memory is None) == (plan is None):
        raise LLMTierError("give stream_model either memory= (a budget) or plan= (the planner's weights plan)")
    if memory is None and plan is not None:
        memory = plan.budget
    dev = str(device)
    if dev.split(":")[0] not in ("cpu", "cuda"):
        raise LLMTierError(f"device {device!r}: weights stream to the CPU or to a CUDA GPU ('cuda', 'cuda:1')")
    if dev == "cpu" and host_memory is not None:
        raise LLMTierError("host_memory is the pinned host tier of a GPU model (device='cuda'); on the CPU, "
                           "memory= is the whole budget")
    if dev != "cpu":
        require_cuda(f"stream_model(device={dev!r})")
    verify = verify_mode(verify)  # True / False mean "always" / "never", as for open_store
    layout = open_layout(path, dtype=dtype, engine=engine)
    try:
        if experts is not None:  # expert-granular streaming of a MoE model
            from .moe import bind_moe_streamer  # noqa: PLC0415

            if dev != "cpu":
                raise LLMTierError("expert streaming (experts=...) runs on the CPU for now")
            streamer = bind_moe_streamer(layout, memory, policy=experts, predict=predict, profile=profile,
                                         prefetch=prefetch, verify=verify)
            layout.model.__class__ = _streamed_class(type(layout.model))
            layout.model.llmtier = streamer
            return layout.model
        if plan is not None and plan.device == "cpu" and dev == "cpu":  # the planner's decisions, this checkpoint's sizes
            sizes = [g.nbytes for g in layout.groups]
            plan = adopt_plan(plan, layout.outside.nbytes, layout.embedding_bytes, sizes)
        elif plan is not None:  # a GPU plan: the same rules (plan/) over its budgets and the device's buffer sizes
            plan = layout.device_plan(plan.budget, plan.host_budget or host_memory, prefetch)
        else:
            plan = layout.plan(memory, prefetch) if dev == "cpu" else layout.device_plan(memory, host_memory, prefetch)
        if engine is None and plan.streamed and io_nice is not None:
            why = layout.source.engine.prioritize(io_nice)
            if why:
                plan.reason += (f"\nnote: {why}; torch's spinning compute threads may then slow the reads: "
                                "OMP_WAIT_POLICY=PASSIVE in the environment helps")
        streamer = bind_streamer(layout, plan, dev, verify=verify)
    except BaseException:
        layout.source.close()
        raise
    model = layout.model
    model.__class__ = _streamed_class(type(model))
    model.llmtier = streamer
    return model


__all__ = ["INFLIGHT_BYTES", "MAX_SLOTS", "RUN_OVERHEAD", "BudgetError", "Group", "Layout", "Plan", "StreamStats",
           "WeightStats", "WeightStreamer", "bind_streamer", "make_group", "make_plan", "open_layout", "spread",
           "stream_model"]
