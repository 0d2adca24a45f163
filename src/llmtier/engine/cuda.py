"""The GPU side of the engine: page-locked buffers and an SSD <-> GPU pipeline.

Everything CUDA in llmtier goes through :func:`cuda_reason`, the one
capability check: it is ``""`` when torch with a usable CUDA device is
importable and otherwise says why not.  Nothing here imports torch (and so
nothing of CUDA) until a function is called, and a CPU-only install never
reaches CUDA at all.

* :func:`alloc_pinned` is :func:`~llmtier.engine.alloc` registered with CUDA
  *in place* (``cudaHostRegister``): the same page-aligned memory the disk
  writes into with direct I/O is the source of host-to-device copies at PCIe
  speed (measured on an H200: pageable 8.7 GiB/s, registered 51.5 GiB/s).
  It is unregistered when the last view of it is dropped.
* :class:`DevicePipe` moves a file's bytes into GPU memory (and back) through
  a ring of pinned slots: the disk fills slot *k+1* while slot *k* is copied
  on a side stream; a slot is refilled only after the event of its copy.
  With ``device="cpu"`` it runs the same schedule with host tensors as the
  destination, which is how its logic is tested on machines without a GPU.
"""
from __future__ import annotations

import mmap
import threading
from typing import Any

import numpy as np

from ..errors import EngineUnavailableError
from .buffers import PAGE, round_up


def cuda_reason() -> str:
    """``""`` when CUDA is usable here (torch with CUDA and a device), else why not."""
    try:
        import torch  # noqa: PLC0415 - torch is optional; imported only when asked
    except ImportError:
        return "torch is not installed"
    if not torch.backends.cuda.is_built():
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "torch finds no CUDA device"
    return ""


def require_cuda(what: str) -> None:
    """Raise :class:`EngineUnavailableError` naming ``what`` when CUDA is not usable."""
    why = cuda_reason()
    if why:
        raise EngineUnavailableError("cuda", f"{what} needs a CUDA GPU: {why}")


class _PinnedMapping(mmap.mmap):
    """Anonymous memory registered with CUDA while it lives (unregistered before it is unmapped)."""

    _address = 0

    def register(self) -> None:
        import torch  # noqa: PLC0415

        address = np.frombuffer(self, dtype=np.uint8).ctypes.data
        rc = torch.cuda.cudart().cudaHostRegister(address, len(self), 0)
        if int(rc) != 0:
            raise EngineUnavailableError("cuda", f"cudaHostRegister of {len(self)} bytes failed (cudaError {int(rc)}); "
                                                 "the locked-memory limit (ulimit -l) may be too low")
        self._address = address

    def __del__(self) -> None:
        if self._address:
            import torch  # noqa: PLC0415

            torch.cuda.cudart().cudaHostUnregister(self._address)
            self._address = 0


def alloc_pinned(nbytes: int) -> np.ndarray:
    """``nbytes`` of page-aligned host memory, page-locked for CUDA (see the module doc).

    Raises :class:`EngineUnavailableError` where CUDA is not usable.
    """
    if nbytes < 0:
        raise ValueError(f"alloc_pinned: nbytes must be >= 0, got {nbytes}")
    require_cuda("page-locked memory")
    mapping = _PinnedMapping(-1, round_up(max(1, nbytes), PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.register()
    return np.frombuffer(mapping, dtype=np.uint8, count=nbytes)


class DeviceOps:
    """The few CUDA operations the runtimes need, so one schedule serves both
    the GPU and its stand-in on the CPU (``device="cpu"``: host tensors,
    copies done at once, events that are already complete)."""

    def __init__(self, device: Any) -> None:
        import torch  # noqa: PLC0415

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            require_cuda(f"device {self.device}")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            self.copy_stream = torch.cuda.Stream(device=self.device)
        elif self.device.type != "cpu":
            raise EngineUnavailableError(str(self.device), "only 'cuda' devices and the CPU stand-in are supported")

    def host_buffer(self, nbytes: int) -> np.ndarray:
        """Host memory that copies to the device fast: pinned on CUDA."""
        from .buffers import alloc  # noqa: PLC0415 - sibling module, kept local for symmetry with alloc_pinned

        return alloc_pinned(nbytes) if self.cuda else alloc(nbytes)

    def empty(self, nbytes: int) -> Any:
        """``nbytes`` of device memory as a flat ``uint8`` tensor."""
        return self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)

    def event(self) -> Any:
        """An event recorded on the copy stream (CPU: a completed stand-in)."""
        if not self.cuda:
            return _DoneEvent()
        ev = self.torch.cuda.Event()
        ev.record(self.copy_stream)
        return ev

    def compute_event(self) -> Any:
        """An event recorded on the current (compute) stream."""
        if not self.cuda:
            return _DoneEvent()
        ev = self.torch.cuda.Event()
        ev.record(self.torch.cuda.current_stream(self.device))
        return ev

    def copy(self, dst: Any, src: Any, after: Any = None) -> Any:
        """Copy ``src`` into ``dst`` on the copy stream, once ``after`` (an event) has
        happened; return the event of the copy."""
        if not self.cuda:
            dst.copy_(src)
            return _DoneEvent()
        with self.torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            return self.event()

    def follow_compute(self) -> None:
        """Order the copy stream after everything queued on the compute stream so far
        (a tensor about to be copied out, or memory about to be copied into)."""
        if self.cuda:
            self.copy_stream.wait_event(self.compute_event())

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for ``event`` (no host blocking)."""
        if self.cuda and event is not None:
            self.torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)


class _DoneEvent:
    """What a CPU stand-in copy returns: it has already happened."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class DevicePipe:
    """SSD <-> device memory through ``slots`` pinned host slots of ``slot_bytes``.

    >>> with DevicePipe(engine, "cuda") as pipe, engine.open("t.bin") as f:   # doctest: +SKIP
    ...     dst = torch.empty(f.size, dtype=torch.uint8, device="cuda")
    ...     pipe.read(f, 0, dst)                      # returns once the last copy is queued
    ...     torch.cuda.current_stream().wait_event(pipe.last_event)

    ``read`` keeps ``slots`` reads in flight; as each lands its slot is copied
    to the device on the copy stream and refilled only after that copy's
    event.  ``write`` runs the reverse: device -> slot on the copy stream,
    then the slot to disk.  The file ranges need not be aligned (the engine
    widens them).
    """

    def __init__(self, engine: Any, device: Any = "cuda", *, slot_bytes: int = 64 << 20, slots: int = 4) -> None:
        if slot_bytes <= 0 or slot_bytes % PAGE or slots < 2:
            raise ValueError(f"DevicePipe needs slot_bytes a positive multiple of {PAGE} and slots >= 2, "
                             f"got {slot_bytes}, {slots}")
        self.engine = engine
        self.ops = DeviceOps(device)
        self.slot_bytes = slot_bytes
        self._host = [self.ops.host_buffer(slot_bytes) for _ in range(slots)]
        self._lock = threading.Lock()  # one transfer at a time uses the slots
        self.last_event: Any = None

    def _batches(self, offsets: list[int], tensors: list[Any]) -> list[list[tuple[int, int, Any]]]:
        """The transfer cut into slot loads: each a list of (file offset, position
        in the slot, flat device view), at most ``slot_bytes`` together; small
        tensors share a slot, large ones span several."""
        out: list[list[tuple[int, int, Any]]] = []
        fill = self.slot_bytes
        for off, t in zip(offsets, tensors, strict=True):
            n, p = t.numel(), 0
            while p < n:
                if fill == self.slot_bytes:
                    out.append([])
                    fill = 0
                m = min(self.slot_bytes - fill, n - p)
                out[-1].append((off + p, fill, t[p:p + m]))
                fill = round_up(fill + m, PAGE)  # each piece starts page-aligned in the slot (direct I/O)
                fill = min(fill, self.slot_bytes)
                p += m
        return out

    def read(self, file: Any, offset: int, dst: Any, *, tag: Any = None) -> Any:
        """Fill the flat ``uint8`` device tensor ``dst`` with ``dst.numel()`` bytes of
        ``file`` at ``offset``; return the event of the last copy (also ``last_event``)."""
        return self.read_many(file, [offset], [dst], tag=tag)

    def read_many(self, file: Any, offsets: list[int], dsts: list[Any], *, tag: Any = None) -> Any:
        """:meth:`read` of several tensors, pipelined across all of them; the
        compute stream must wait on the returned event before using them."""
        torch = self.ops.torch
        batches, k = self._batches(offsets, dsts), len(self._host)

        def load(i: int) -> Any:
            host = self._host[i % k]
            return file.pread_many([host[pos:pos + d.numel()] for _, pos, d in batches[i]],
                                   [off for off, _, _ in batches[i]], tags=[tag] * len(batches[i]))

        with self._lock:
            self.ops.follow_compute()
            events: list[Any] = [None] * k
            futs: dict[int, Any] = {}
            try:
                for i in range(min(k, len(batches))):
                    futs[i] = load(i)
                for i, batch in enumerate(batches):
                    s = i % k
                    futs.pop(i).result()
                    for _, pos, d in batch:
                        events[s] = self.ops.copy(d, torch.from_numpy(self._host[s][pos:pos + d.numel()]))
                    if i + k < len(batches):
                        events[s].synchronize()  # the slot's bytes are on the device: refill it
                        futs[i + k] = load(i + k)
            finally:
                for f in futs.values():  # a failure: no read may still land in a slot the next call reuses
                    f.exception()
            self.last_event = events[(len(batches) - 1) % k] if batches else None
            return self.last_event

    def write(self, file: Any, offset: int, src: Any, *, tag: Any = None) -> int:
        """Write the flat ``uint8`` device tensor ``src`` to ``file`` at ``offset``;
        returns the bytes written once they are on disk (not yet fsynced)."""
        return self.write_many(file, [offset], [src], tag=tag)

    def write_many(self, file: Any, offsets: list[int], srcs: list[Any], *, tag: Any = None) -> int:
        """:meth:`write` of several tensors: device -> slot on the copy stream,
        then the slot to disk while the next slot is copied."""
        torch = self.ops.torch
        k = len(self._host)
        total = 0
        with self._lock:
            self.ops.follow_compute()
            futs: list[Any] = [None] * k
            try:
                for i, batch in enumerate(self._batches(offsets, srcs)):
                    s = i % k
                    if futs[s] is not None:
                        futs[s].result()
                    host = self._host[s]
                    ev = None
                    for _, pos, d in batch:
                        ev = self.ops.copy(torch.from_numpy(host[pos:pos + d.numel()]), d)
                    ev.synchronize()
                    futs[s] = file.pwrite_many([host[pos:pos + d.numel()] for _, pos, d in batch],
                                               [off for off, _, _ in batch], tags=[tag] * len(batch))
                    total += sum(d.numel() for _, _, d in batch)
            finally:
                for f in futs:
                    if f is not None:
                        f.exception()
            for f in futs:
                if f is not None:
                    f.result()
        return total

    def close(self) -> None:
        """Wait for the device, then free the pinned slots."""
        self.ops.synchronize()
        self._host = []

    def __enter__(self) -> DevicePipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DeviceOps", "DevicePipe", "alloc_pinned", "cuda_reason", "require_cuda"]
