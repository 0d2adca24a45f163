"""AdamW whose state (``exp_avg``, ``exp_avg_sq`` and fp32 master weights) lives on SSD.

>>> opt = OffloadedAdamW(model.parameters(), memory="256MiB", path="/nvme/run1", lr=3e-4)  # doctest: +SKIP
>>> loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad()  # doctest: +SKIP

The state file is cut into chunks (see :mod:`.layout`); :meth:`OffloadedAdamW.step`
runs a three-stage pipeline over them, the disk and the math overlapping::

    disk reads:   chunk i+1 -> slot (i+1) % 3
    CPU:          chunk i in slot i % 3: gather grads, AdamW, write params
    disk writes:  chunk i-1 <- slot (i-1) % 3   (the slot is free once written)

**Exactness.**  The update is the op sequence of ``torch.optim.AdamW`` with
``foreach=False`` (torch's single-tensor path), elementwise, in fp32:
``p *= 1 - lr*wd``; ``m.lerp_(g, 1-b1)``; ``v.mul_(b2).addcmul_(g, g, value=1-b2)``;
``denom = sqrt(v) / sqrt(1-b2**t) + eps``; ``p.addcdiv_(m, denom, value=-lr/(1-b1**t))``,
with the same Python-float scalars.  It runs on slices of a chunk instead
of whole tensors; torch's CPU elementwise kernels give the same bits for an
element wherever it sits in a tensor (checked by the tests), so the results
are bitwise those of torch's AdamW.  For bf16/fp16 parameters the reference
is torch's AdamW stepping fp32 master copies (``master = p.float()`` at
construction, ``master.grad = p.grad.float()``), after which
``p.copy_(master)`` (round to nearest even); fp32 parameters are their own
master.  ``amsgrad``, ``capturable``, ``differentiable``, ``fused`` and
``foreach=True`` are not supported.
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ...engine import BufferPool, Engine, alloc, open_engine
from ...errors import LLMTierError
from ...units import parse_size
from .layout import BYTES_PER_ELEM, LOW_PRECISION, SLOTS, Chunk, chunk_elems_for, least_budget, plan_chunks

STATE_FILE = "adamw.state"
_REGIONS = {"master": 0, "exp_avg": 1, "exp_avg_sq": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class OptimizerError(LLMTierError, ValueError):
    """An option or parameter :class:`OffloadedAdamW` cannot handle, or a state dict that does not fit."""


@dataclass
class OptimStats:
    """Counters of an :class:`OffloadedAdamW` (``opt.stats``)."""

    steps: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    step_s: float = 0.0  # wall time of the last step
    wait_s: float = 0.0  # of which waiting for reads (the disk not keeping up)


class OffloadedAdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` with its state on SSD, stepped through a DRAM budget of ``memory`` bytes.

    Args:
        params: parameters or parameter groups, as for any torch optimizer
            (contiguous CPU tensors of fp32, bf16 or fp16).
        memory: DRAM for the optimizer's buffers (bytes or ``"256MiB"``); too
            small raises :class:`~llmtier.offload.optim.OptimizerBudgetError`
            carrying ``least``.
        path: a directory for the state file (created; an old state file there
            is overwritten).
        lr, betas, eps, weight_decay, maximize: as ``torch.optim.AdamW``.
        engine: an open :class:`~llmtier.engine.Engine` to use (not closed by
            us), or a backend name to open one (default ``"auto"``).
        chunk_elems: chunk length in elements (default: the largest the budget allows).
        io_nice: nice value for the I/O threads of an engine we open (root or CAP_SYS_NICE),
            so that torch's spinning compute threads do not keep them, and the disk,
            waiting; None leaves them alone.
        plan: a :class:`llmtier.plan.planner.OptimPlan` (``plan_training(...).optim``)
            instead of ``memory``: the DRAM budget and chunk length the planner chose.
    """

    def __init__(self, params: Iterable[Any], *, memory: int | str | None = None, path: str | os.PathLike[str], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None, engine: Engine | str = "auto",
                 chunk_elems: int | None = None, io_nice: int | None = -10, plan: Any = None) -> None:
        if (memory is None) == (plan is None):
            raise OptimizerError("give OffloadedAdamW either memory= (its DRAM budget) or plan= (the planner's "
                                 "optimizer plan, llmtier.plan.plan_training(...).optim)")
        if plan is not None:  # the planner's optimizer part: its DRAM budget and chunk length
            memory = plan.memory
            chunk_elems = plan.chunk_elems if chunk_elems is None else chunk_elems
        if amsgrad or capturable or differentiable or fused or foreach:
            raise OptimizerError("OffloadedAdamW supports amsgrad=False, capturable=False, differentiable=False, "
                                 "fused=None/False and foreach=None/False only")
        if not 0.0 <= lr or not 0.0 <= eps or not 0.0 <= weight_decay:
            raise OptimizerError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= float(b) < 1.0 for b in betas):
            raise OptimizerError(f"betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": False,
                    "maximize": maximize, "foreach": None, "capturable": False, "differentiable": False,
                    "fused": None, "decoupled_weight_decay": True}
        self._ready = False
        super().__init__(params, defaults)
        groups = [g["params"] for g in self.param_groups]
        for p in (p for ps in groups for p in ps):
            if p.dtype not in _DTYPES or p.device.type != "cpu" or not p.is_contiguous():
                raise OptimizerError(f"a parameter of shape {tuple(p.shape)} is {p.dtype} on {p.device}"
                                     f"{'' if p.is_contiguous() else ', not contiguous'}; OffloadedAdamW steps "
                                     "contiguous CPU tensors of float32, bfloat16 or float16")
        self.budget = parse_size(memory)
        self.chunk_elems = chunk_elems_for(self.budget, groups, chunk_elems)
        self.least_budget = least_budget(groups)
        self.chunks: list[Chunk] = plan_chunks(groups, self.chunk_elems)
        self.stats = OptimStats()
        self.directory = os.fspath(path)
        os.makedirs(self.directory, exist_ok=True)
        self.path = os.path.join(self.directory, STATE_FILE)
        self._own_engine = not isinstance(engine, Engine)
        self.engine: Engine = open_engine(engine) if self._own_engine else engine  # type: ignore[arg-type]
        #: why the I/O threads could not be given priority over the update's compute threads (None: they were)
        self.io_nice_note = self.engine.prioritize(io_nice) if self._own_engine and io_nice is not None else None
        self._file = None
        self._pool = None
        try:
            self._file = self.engine.open(self.path, "w")
            size = self.chunks[-1].offset + self.chunks[-1].nbytes if self.chunks else 0
            if size:
                self._file.allocate(size)
            self._pool = BufferPool(3 * 4 * self.chunk_elems, SLOTS, huge=True)  # [master | exp_avg | exp_avg_sq]
            self._grad = torch.empty(self.chunk_elems, dtype=torch.float32)
            self._scratch = torch.empty(self.chunk_elems, dtype=torch.float32)
            self._index = [p for ps in groups for p in ps]
            self._write_all(lambda chunk, st: None)
        except BaseException:
            self.close()
            raise
        self._ready = True

    # -- what the state costs -------------------------------------------------------------------------------------
    @property
    def state_bytes(self) -> int:
        """Bytes of state on SSD (the records, padding included)."""
        return sum(c.nbytes for c in self.chunks)

    @property
    def dram_bytes(self) -> int:
        """DRAM the step's buffers take: ``BYTES_PER_ELEM * chunk_elems``."""
        return BYTES_PER_ELEM * self.chunk_elems

    def step_bytes(self) -> tuple[int, int]:
        """Bytes one :meth:`step` reads and writes when every parameter has a gradient (the analytic count)."""
        return self.state_bytes, self.state_bytes

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One AdamW step over every parameter with a gradient (see the module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t0 = time.perf_counter()
        steps: dict[int, float] = {}
        for i, p in enumerate(self._index):
            if p.grad is not None:
                if p.grad.is_sparse:
                    raise OptimizerError("OffloadedAdamW does not support sparse gradients")
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0, dtype=torch.float32)
                st["step"] += 1
                steps[i] = st["step"].item()
        work = [c for c in self.chunks if any(pc.index in steps for pc in c.pieces)]
        wait = self._pipeline(work, lambda c, st: self._update(c, st, steps))
        self.stats.steps += 1
        self.stats.step_s = time.perf_counter() - t0
        self.stats.wait_s = wait
        return loss

    def _pipeline(self, work: list[Chunk], update: Any) -> float:
        """Read, ``update(chunk, slot_tensor)`` and write back every chunk of ``work``; returns seconds spent waiting on reads."""
        if not work:
            return 0.0
        pool, f = self._pool, self._file
        writes: list[Any] = []
        waited = 0.0

        def read(c: Chunk) -> tuple[Any, Any]:
            buf = pool.acquire()  # waits until the write of chunk i-2 has freed its slot
            return buf, f.pread(buf[c.buf_lo:c.buf_lo + c.nbytes], c.offset, tag=f"optim:chunk{c.index}")

        pending = read(work[0])
        try:
            for i, c in enumerate(work):
                buf, fut = pending
                pending = None
                if i + 1 < len(work):
                    pending = read(work[i + 1])
                try:
                    t = time.perf_counter()
                    # not fut.result() while it is pending: that lends this thread to the engine, which would
                    # run the queued read of chunk i+1 and write of chunk i-1 here, before the update, serially
                    concurrent.futures.wait([fut])
                    fut.result()
                    waited += time.perf_counter() - t
                    self.stats.bytes_read += c.nbytes
                    update(c, torch.from_numpy(buf).view(torch.float32))
                except BaseException:
                    pool.release(buf)  # this slot will not be written: give it back
                    raise
                w = f.pwrite(buf[c.buf_lo:c.buf_lo + c.nbytes], c.offset, tag=f"optim:chunk{c.index}")
                w.add_done_callback(lambda _w, b=buf: pool.release(b))
                writes.append(w)
                self.stats.bytes_written += c.nbytes
        finally:
            if pending is not None:
                pending[1].exception()
                pool.release(pending[0])
            errors = [w.exception() for w in writes]
        for e in errors:
            if e is not None:
                raise e
        return waited

    def _update(self, c: Chunk, slot: torch.Tensor, steps: dict[int, float]) -> None:
        """AdamW on one chunk held in ``slot`` (``[master | exp_avg | exp_avg_sq]``, fp32)."""
        n = c.elems
        master, m, v = slot[:n], slot[n:2 * n], slot[2 * n:3 * n]
        g = self._grad[:n]
        group = self.param_groups[c.group]
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        wd, eps = group["weight_decay"], group["eps"]
        # gather gradients (fp32, exact) and the master of fp32 parameters; zero the gaps
        runs: list[tuple[int, int, float]] = []  # [lo, hi) of consecutive pieces with the same step
        prev = 0
        broken = True  # a piece without a gradient ends a run: its state must not change
        for pc in c.pieces:
            if prev < pc.c_lo:
                g[prev:pc.c_lo].zero_()
                if not c.master:
                    master[prev:pc.c_lo].zero_()
            prev = pc.c_hi
            step = steps.get(pc.index)
            if step is None:
                g[pc.c_lo:pc.c_hi].zero_()
                broken = True
                continue
            g[pc.c_lo:pc.c_hi].copy_(pc.param.grad.reshape(-1)[pc.p_lo:pc.p_hi])
            if str(pc.param.dtype) not in LOW_PRECISION:
                master[pc.c_lo:pc.c_hi].copy_(pc.param.reshape(-1)[pc.p_lo:pc.p_hi])
            if not broken and runs[-1][2] == step:  # padding only in between: zero grads, zero state
                runs[-1] = (runs[-1][0], pc.c_hi, step)
            else:
                runs.append((pc.c_lo, pc.c_hi, step))
            broken = False
        if prev < n:
            g[prev:n].zero_()
            if not c.master:
                master[prev:n].zero_()
        if group["maximize"]:
            g.neg_()
        for lo, hi, step in runs:
            p, ea, eas, gr, tmp = master[lo:hi], m[lo:hi], v[lo:hi], g[lo:hi], self._scratch[lo:hi]
            if wd != 0:
                p.mul_(1 - lr * wd)
            ea.lerp_(gr, 1 - beta1)
            eas.mul_(beta2).addcmul_(gr, gr, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            torch.sqrt(eas, out=tmp)
            tmp.div_(bias_correction2_sqrt).add_(eps)
            p.addcdiv_(ea, tmp, value=-step_size)
        for pc in c.pieces:
            if pc.index in steps:
                pc.param.reshape(-1)[pc.p_lo:pc.p_hi].copy_(master[pc.c_lo:pc.c_hi])

    # -- state on and off the SSD ---------------------------------------------------------------------------------
    def _write_all(self, fill: Any) -> None:
        """Write every record: zero moments, masters from the parameters, then ``fill(chunk, slot)`` on top."""
        pool, f = self._pool, self._file
        writes = []
        try:
            for c in self.chunks:
                buf = pool.acquire()
                slot = torch.from_numpy(buf).view(torch.float32)
                slot.zero_()
                if c.master:
                    for pc in c.pieces:
                        slot[pc.c_lo:pc.c_hi].copy_(pc.param.detach().reshape(-1)[pc.p_lo:pc.p_hi])
                fill(c, slot)
                w = f.pwrite(buf[c.buf_lo:c.buf_lo + c.nbytes], c.offset, tag=f"optim:chunk{c.index}")
                w.add_done_callback(lambda _w, b=buf: pool.release(b))
                writes.append(w)
        finally:
            errors = [w.exception() for w in writes]
        for e in errors:
            if e is not None:
                raise e

    def iter_state(self) -> Iterator[tuple[Chunk, torch.Tensor]]:
        """Read the records one by one: ``(chunk, slot)`` with ``slot`` fp32 ``[master | exp_avg | exp_avg_sq]``
        (the master region is meaningful only when ``chunk.master``).  ``slot`` is reused: copy what you keep."""
        buf = self._pool.acquire()
        try:
            slot = torch.from_numpy(buf).view(torch.float32)
            for c in self.chunks:
                self._file.pread(buf[c.buf_lo:c.buf_lo + c.nbytes], c.offset, tag=f"optim:chunk{c.index}").result()
                yield c, slot
        finally:
            self._pool.release(buf)

    def read_state(self, index: int, key: str) -> Iterator[torch.Tensor]:
        """Parameter ``index``'s ``key`` (``exp_avg``, ``exp_avg_sq`` or ``master``) as fp32 pieces in
        row-major order, read straight from SSD (one direct read per piece; each piece a fresh buffer)."""
        region = _REGIONS.get(key)
        p = self._index[index]
        if region is None or (key == "master" and str(p.dtype) not in LOW_PRECISION):
            raise OptimizerError(f"parameter {index} ({p.dtype}) has no state {key!r} on SSD")
        for c in self.chunks:
            for pc in c.pieces:
                if pc.index != index:
                    continue
                start = c.offset + (region if c.master else region - 1) * 4 * c.elems + 4 * pc.c_lo
                n = 4 * pc.n
                buf = alloc(-(-n // 4096) * 4096)  # stays inside the region: regions are whole 4 KiB pages
                self._file.pread(buf, start, tag=f"optim:chunk{c.index}").result()
                yield torch.from_numpy(buf[:n]).view(torch.float32)

    def _packed_groups(self) -> list[dict[str, Any]]:
        groups = []
        start = 0
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = list(range(start, start + len(g["params"])))
            start += len(g["params"])
            groups.append(packed)
        return groups

    def state_dict(self) -> dict[str, Any]:
        """torch's AdamW state dict (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter that has stepped),
        plus ``master`` (fp32) for bf16/fp16 parameters.  Materializes the whole state in RAM."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        for i, p in enumerate(self._index):
            if "step" in self.state[p]:
                entry = {"step": self.state[p]["step"].clone(),
                         "exp_avg": torch.zeros(p.shape, dtype=torch.float32),
                         "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32)}
                if str(p.dtype) in LOW_PRECISION:
                    entry["master"] = torch.zeros(p.shape, dtype=torch.float32)
                state[i] = entry
        for c, slot in self.iter_state():
            n = c.elems
            for pc in c.pieces:
                entry = state.get(pc.index)
                if entry is None:
                    continue
                for key, base in (("master", 0), ("exp_avg", n), ("exp_avg_sq", 2 * n)):
                    if key in entry:
                        entry[key].view(-1)[pc.p_lo:pc.p_hi].copy_(slot[base + pc.c_lo:base + pc.c_hi])
        return {"state": state, "param_groups": self._packed_groups()}

    def lazy_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` for :func:`llmtier.checkpoint.save`: the same structure, with every tensor
        that lives on SSD a :class:`llmtier.checkpoint.LazyTensor` whose pieces :meth:`read_state` reads
        straight from the state file while the checkpoint is written (never the whole state in RAM)."""
        from ...checkpoint import LazyTensor  # noqa: PLC0415 - only when checkpointing

        state: dict[int, dict[str, Any]] = {}
        for i, p in enumerate(self._index):
            if "step" not in self.state[p]:
                continue
            keys = ("exp_avg", "exp_avg_sq", "master") if str(p.dtype) in LOW_PRECISION else ("exp_avg", "exp_avg_sq")
            entry: dict[str, Any] = {"step": self.state[p]["step"].clone()}
            for key in keys:
                entry[key] = LazyTensor(torch.float32, tuple(p.shape), functools.partial(self.read_state, i, key))
            state[i] = entry
        return {"state": state, "param_groups": self._packed_groups()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict` or of ``torch.optim.AdamW`` (same parameter order).

        Hyperparameters come from the saved groups.  A bf16/fp16 parameter without
        a saved ``master`` takes its master from the parameter's current value.
        Parameters absent from the saved state start fresh.  Writes the SSD state
        chunk by chunk."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(len(s["params"]) != len(g["params"])
                                                        for s, g in zip(saved, self.param_groups)):
            raise OptimizerError("the state dict's parameter groups do not match this optimizer's "
                                 f"({[len(s['params']) for s in saved]} vs {[len(g['params']) for g in self.param_groups]})")
        # map saved ids to our global index, group by group
        mapping: dict[Any, int] = {}
        base = 0
        for s, g in zip(saved, self.param_groups):
            for k, old in enumerate(s["params"]):
                mapping[old] = base + k
            base += len(g["params"])
        states: dict[int, dict[str, Any]] = {mapping[k]: v for k, v in state_dict["state"].items() if k in mapping}
        for i, entry in states.items():
            p = self._index[i]
            for key in ("exp_avg", "exp_avg_sq", "master"):
                if key in entry and entry[key].numel() != p.numel():
                    raise OptimizerError(f"state {key} of parameter {i} has {entry[key].numel()} elements, "
                                         f"the parameter {p.numel()}")
        for s in saved:
            if s.get("amsgrad") or s.get("capturable") or s.get("differentiable") or s.get("fused") or s.get("foreach"):
                raise OptimizerError("the state dict's groups ask for amsgrad, capturable, differentiable, fused or "
                                     "foreach, which OffloadedAdamW does not support")
        for s, g in zip(saved, self.param_groups):
            for k, v in s.items():
                if k != "params":
                    g[k] = v
        self.state.clear()
        for i, entry in states.items():
            if "step" in entry:
                self.state[self._index[i]]["step"] = torch.as_tensor(entry["step"], dtype=torch.float32).clone()

        def fill(c: Chunk, slot: torch.Tensor) -> None:
            n = c.elems
            for pc in c.pieces:
                entry = states.get(pc.index)
                if entry is None:
                    continue
                for key, off in (("master", 0), ("exp_avg", n), ("exp_avg_sq", 2 * n)):
                    if key in entry and (key != "master" or c.master):
                        slot[off + pc.c_lo:off + pc.c_hi].copy_(entry[key].detach().reshape(-1)[pc.p_lo:pc.p_hi])

        self._write_all(fill)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Groups are fixed at construction: the state file's layout depends on them."""
        if getattr(self, "_ready", False):
            raise OptimizerError("OffloadedAdamW cannot add a parameter group after construction")
        super().add_param_group(param_group)

    # -- lifetime -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the state file (and the engine if we opened it); the file stays on disk. Idempotent."""
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None
        if getattr(self, "_pool", None) is not None:
            self._pool.close()
            self._pool = None
        if getattr(self, "_own_engine", False) and getattr(self, "engine", None) is not None:
            self.engine.close()
            self.engine = None  # type: ignore[assignment]

    def __enter__(self) -> OffloadedAdamW:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"OffloadedAdamW({len(self._index) if self._ready else '?'} params, {len(self.chunks)} chunks of "
                f"{self.chunk_elems} elements, budget {self.budget} bytes, state {self.path})")


__all__ = ["STATE_FILE", "OffloadedAdamW", "OptimStats", "OptimizerError"]
