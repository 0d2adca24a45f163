"""DeepSpeed's DeepNVMe (``async_io`` op, ``aio_handle``) as a side-by-side peer.

It times the work llmtier's engine does -- a set of host buffers read from or
written to one file at given offsets -- done by DeepNVMe at a given block size
and queue depth.  ``deepspeed`` is imported lazily, so this module imports
without it.

What DeepNVMe does inside (read from deepspeed 0.19.8, ``csrc/aio``):

* Every ``async_pread``/``async_pwrite`` is one *op*.  The op opens the file
  itself with ``O_DIRECT`` (reads ``O_RDONLY|O_DIRECT``, writes
  ``O_WRONLY|O_CREAT|O_DIRECT``, never ``O_TRUNC``) and closes it in ``wait()``.
  Offsets are supported (``file_offset``), so writes go in place.
* Threads: the handle starts ``intra_op_parallelism`` worker threads, each
  with its own libaio context of ``queue_depth`` iocbs.  Every op is split into
  that many equal contiguous parts, one per thread (so ``nbytes`` must divide
  evenly).  Each thread works through its queue of ops strictly one after the
  other.
* Blocks: a thread cuts its part into ``block_size`` requests.  With
  ``overlap_events=True`` (DeepSpeed's configured default) it keeps up to
  ``queue_depth`` in flight and refills as single completions arrive; with
  ``False`` it submits a batch of ``queue_depth`` and waits for *all* of it
  (lock-step) before the next batch.  Queue depth never spans ops: a 1 MiB op
  with 1 MiB blocks runs at queue depth 1, however many ops are queued.
* Buffers: a buffer that is not page-locked (``tensor.is_pinned()`` or made by
  ``new_cpu_locked_tensor``) goes through a bounce buffer allocated per op
  (``posix_memalign`` + ``mlock``) and copied with ``copy_`` -- for writes when
  the op is issued, for reads inside ``wait()``.  Plain numpy memory is never
  pinned under CPU-only torch, so it always bounces; :meth:`DeepNVMe.alloc`
  hands out page-locked buffers that do not.
* Errors: it never looks at ``io_event.res``.  A misaligned or failed request
  is counted as done and the buffer is left stale (or filled with bounce-buffer
  garbage).  A read past end of file trips a C ``assert`` that aborts the whole
  process.  Only an ``open`` failure is reported (``async_*`` returns -1).
  :class:`DeepNVMe` therefore checks alignment, bounds and openability first.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from ..errors import (
    ClosedError,
    EngineUnavailableError,
    LLMTierError,
    ShortReadError,
    io_failure,
)

__all__ = ["DeepNVMe", "DeepNVMeAlignmentError", "DeepNVMeError", "deepnvme_available"]

_INSTALL_HINT = (
    "install it with `DS_BUILD_OPS=0 pip install deepspeed ninja` (after torch) and "
    "`apt-get install libaio-dev`; the aio op is JIT-built on first use"
)
_MIN_ALIGN = 512


class DeepNVMeError(LLMTierError, RuntimeError):
    """The DeepNVMe handle reported a failure (an op was refused or went missing)."""


class DeepNVMeAlignmentError(LLMTierError, ValueError):
    """A request DeepNVMe would silently get wrong under ``O_DIRECT`` (misaligned)."""


def _load_aio_op() -> Any:
    """Import deepspeed and build/load its ``async_io`` op; raise ``EngineUnavailableError``."""
    try:
        import deepspeed  # noqa: F401  (lazy: optional dependency)
        from deepspeed.ops.op_builder import AsyncIOBuilder
    except Exception as exc:  # ImportError, or deepspeed failing its own import
        raise EngineUnavailableError(
            "deepnvme", f"cannot import deepspeed ({exc}); {_INSTALL_HINT}"
        ) from exc
    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        raise EngineUnavailableError(
            "deepnvme", f"the async_io op cannot be built here (libaio missing?); {_INSTALL_HINT}"
        )
    try:
        return builder.load(verbose=False)
    except Exception as exc:
        raise EngineUnavailableError(
            "deepnvme", f"building the async_io op failed ({exc}); {_INSTALL_HINT}"
        ) from exc


def deepnvme_available() -> tuple[bool, str]:
    """Say whether DeepNVMe can run here: ``(True, description)`` or ``(False, reason)``.

    The first call in a fresh environment JIT-compiles DeepSpeed's ``async_io``
    and ``pin_memory`` ops (about 4.5 minutes on 2 cores) into the torch
    extension cache (``$TORCH_EXTENSIONS_DIR``, default
    ``~/.cache/torch_extensions/py311_cpu/``); later calls only load it (a few
    seconds, mostly importing deepspeed).
    """
    try:
        op = _load_aio_op()
    except EngineUnavailableError as exc:
        return False, exc.reason
    import deepspeed

    return True, f"deepspeed {deepspeed.__version__} async_io op at {getattr(op, '__file__', '?')}"


def _logical_block_size(path: str) -> int:
    """The ``O_DIRECT`` alignment of the device under ``path`` (4096 when unknown)."""
    probe = path if os.path.exists(path) else (os.path.dirname(os.path.abspath(path)) or ".")
    dev = os.stat(probe).st_dev
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for candidate in (f"{base}/queue/logical_block_size", f"{base}/../queue/logical_block_size"):
        try:
            with open(candidate, encoding="ascii") as fh:
                return max(_MIN_ALIGN, int(fh.read().strip()))
        except (OSError, ValueError):
            continue
    return 4096


class DeepNVMe:
    """One DeepNVMe ``aio_handle``: read/write lists of host buffers at file offsets.

    Args:
        block_size: bytes per libaio request (a multiple of 512).
        queue_depth: requests in flight per worker thread, within one buffer.
        threads: ``intra_op_parallelism``: worker threads, each buffer split
            evenly across them.
        overlap_events: refill the queue as completions arrive (``True``,
            DeepSpeed's default) or work in lock-step batches (``False``).
        single_submit: one ``io_submit`` per request instead of per batch.

    Raises:
        EngineUnavailableError: deepspeed or its aio op is not usable.
        ValueError: a non-positive or misaligned parameter.
    """

    def __init__(
        self,
        block_size: int,
        queue_depth: int,
        threads: int = 1,
        *,
        overlap_events: bool = True,
        single_submit: bool = False,
    ) -> None:
        for name, value in (("block_size", block_size), ("queue_depth", queue_depth), ("threads", threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if block_size % _MIN_ALIGN:
            raise ValueError(f"block_size must be a multiple of {_MIN_ALIGN}, got {block_size}")
        op = _load_aio_op()
        import torch

        self._torch: Any = torch
        self._handle: Any = op.aio_handle(block_size, queue_depth, single_submit, overlap_events, threads)
        self._threads = threads
        self._locked: list[Any] = []
        self.block_size = block_size
        self.queue_depth = queue_depth

    # -- buffers ----------------------------------------------------------------
    def alloc(self, nbytes: int) -> Any:
        """A page-aligned, ``mlock``-ed uint8 tensor DeepNVMe uses without a bounce copy.

        It is freed by :meth:`close`; the tensor object outlives that, but its
        memory does not -- touching it afterwards is a use-after-free.
        """
        self._check_open()
        tensor = self._handle.new_cpu_locked_tensor(nbytes, self._torch.empty(0, dtype=self._torch.uint8))
        self._locked.append(tensor)
        return tensor

    def _as_tensor(self, buf: Any, writable: bool) -> Any:
        """A flat CPU tensor sharing ``buf``'s memory (numpy array or torch tensor)."""
        torch = self._torch
        if isinstance(buf, np.ndarray):
            if not buf.flags.c_contiguous:
                raise ValueError("numpy buffers must be C-contiguous")
            if writable and not buf.flags.writeable:
                raise ValueError("cannot read into a read-only numpy array")
            with warnings.catch_warnings():  # read-only arrays are fine to write from
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(buf.reshape(-1).view(np.uint8))
        if isinstance(buf, torch.Tensor):
            if buf.device.type != "cpu" or not buf.is_contiguous():
                raise ValueError("torch buffers must be contiguous CPU tensors")
            return buf
        raise TypeError(f"buffers must be numpy arrays or torch tensors, got {type(buf).__name__}")

    # -- I/O ----------------------------------------------------------------------
    def read(self, path: str, bufs: list[Any], offsets: list[int]) -> None:
        """Fill each buffer from ``path`` at its offset: all ops issued, then one ``wait()``.

        Raises:
            NotFoundError, PermissionDeniedError, IOFailure: ``path`` cannot be
                opened with ``O_DIRECT``.
            ShortReadError: a buffer reaches past the end of the file.
            DeepNVMeAlignmentError: offset, size or (page-locked) address not aligned.
            DeepNVMeError: the handle refused an op or lost one.
        """
        self._run(True, path, bufs, offsets)

    def write(self, path: str, bufs: list[Any], offsets: list[int]) -> None:
        """Write each buffer into ``path`` at its offset, in place (the file is not truncated).

        A missing file is created.  Nothing is ``fsync``-ed: ``O_DIRECT``
        bypasses the page cache, but the device's volatile cache is not flushed.
        Raises as :meth:`read`, except ``ShortReadError``.
        """
        self._run(False, path, bufs, offsets)

    def _run(self, is_read: bool, path: str, bufs: list[Any], offsets: list[int]) -> None:
        """Validate everything DeepNVMe would get silently wrong, then issue and wait."""
        self._check_open()
        if len(bufs) != len(offsets):
            raise ValueError(f"{len(bufs)} buffers but {len(offsets)} offsets")
        path = os.fspath(path)
        flags = (os.O_RDONLY if is_read else os.O_WRONLY | os.O_CREAT) | os.O_DIRECT
        try:
            os.close(os.open(path, flags, 0o600))
        except OSError as exc:
            raise io_failure(
                "cannot open for O_DIRECT " + ("read" if is_read else "write"),
                path=path, offset=None, size=None, errno=exc.errno or 0,
            ) from exc
        align = _logical_block_size(path)
        file_size = os.path.getsize(path)
        tensors: list[tuple[Any, int]] = []
        for buf, offset in zip(bufs, offsets, strict=True):
            t = self._as_tensor(buf, writable=is_read)
            nbytes = int(t.nbytes)
            if nbytes == 0:
                continue
            self._check_request(t, nbytes, int(offset), align, path)
            if is_read and offset + nbytes > file_size:
                raise ShortReadError(
                    path=path, offset=int(offset), size=nbytes, got=max(0, file_size - int(offset))
                )
            tensors.append((t, int(offset)))
        self._issue_and_wait(is_read, path, tensors)

    def _check_request(self, t: Any, nbytes: int, offset: int, align: int, path: str) -> None:
        """Raise ``DeepNVMeAlignmentError`` for a request the kernel would reject."""
        if offset < 0 or offset % align:
            raise DeepNVMeAlignmentError(f"offset {offset} in {path!r} is not a multiple of {align}")
        if nbytes % (align * self._threads):
            raise DeepNVMeAlignmentError(
                f"buffer of {nbytes} bytes is not a multiple of {align} x {self._threads} thread(s)"
            )
        if self._handle.is_pinned(t) and t.data_ptr() % align:
            raise DeepNVMeAlignmentError(
                f"page-locked buffer at {t.data_ptr():#x} is not {align}-byte aligned"
            )

    def _issue_and_wait(self, is_read: bool, path: str, tensors: list[tuple[Any, int]]) -> None:
        """Issue every op asynchronously, then wait once and check the completion count."""
        issue = self._handle.async_pread if is_read else self._handle.async_pwrite
        issued = 0
        refused: tuple[int, int] | None = None
        for t, offset in tensors:
            if issue(t, path, offset) != 0:
                refused = (offset, int(t.nbytes))
                break
            issued += 1
        # wait() with nothing pending trips an assert in the C++ code: only call it when needed.
        done = self._handle.wait() if issued else 0
        if refused is not None:
            raise DeepNVMeError(
                f"DeepNVMe refused a {'read' if is_read else 'write'} of {refused[1]} bytes at "
                f"offset {refused[0]} in {path!r} (see its message on stderr)"
            )
        if done != issued:
            raise DeepNVMeError(f"DeepNVMe completed {done} of {issued} ops on {path!r}")

    # -- lifetime -------------------------------------------------------------------
    def _check_open(self) -> None:
        """Raise ``ClosedError`` after :meth:`close`."""
        if self._handle is None:
            raise ClosedError("DeepNVMe handle is closed")

    def close(self) -> None:
        """Free buffers from :meth:`alloc` and stop the handle's threads (idempotent)."""
        if self._handle is None:
            return
        for tensor in self._locked:
            self._handle.free_cpu_locked_tensor(tensor)
        self._locked.clear()
        self._handle = None

    def __enter__(self) -> DeepNVMe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
