"""The measured device ceiling: run one fio job and report what it achieved.

llmtier's transfer numbers mean something only next to what the device can
do at all.  :func:`run_fio` runs one `fio <https://fio.readthedocs.io>`_ job
with the engine's block size and queue depth and turns fio's JSON report into
a :class:`FioResult`.  fio is not needed at import time.

CPU accounting: fio's per-job ``usr_cpu``/``sys_cpu`` are percentages of the
job's ``job_runtime`` (ms), from the job process's ``getrusage``; so
``usr_s = usr_cpu / 100 * job_runtime / 1000``.  Checked against ``time fio``:
it matches less the parent process's start-up and reporting (~0.2 s), and
excludes kernel work done outside the job's context (e.g. interrupts).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import LLMTierError, NotFoundError

__all__ = ["FioError", "FioNotFoundError", "FioResult", "fio_available", "run_fio"]

_OPS: dict[str, str] = {
    "read": "read",
    "write": "write",
    "randread": "read",
    "randwrite": "write",
}
_IOENGINES: tuple[str, ...] = ("io_uring", "libaio", "psync")
_INSTALL_HINT = "install it with `apt-get install fio` to measure the device ceiling"
_GIB = 2**30


class FioError(LLMTierError, RuntimeError):
    """fio could not be run or reported a failure.

    Attributes:
        cmd: the full command line that was run (list of arguments).
        stderr: fio's standard error output (may be empty).
        returncode: fio's exit status, or ``None`` if it never ran.
    """

    def __init__(
        self,
        message: str,
        cmd: list[str] | None = None,
        stderr: str = "",
        returncode: int | None = None,
    ) -> None:
        self.cmd: list[str] = list(cmd or [])
        self.stderr: str = stderr
        self.returncode: int | None = returncode
        detail = message
        if self.cmd:
            detail += "\n  command: " + " ".join(self.cmd)
        if returncode is not None:
            detail += f"\n  exit status: {returncode}"
        if stderr.strip():
            detail += "\n  stderr: " + stderr.strip()
        super().__init__(detail)


class FioNotFoundError(FioError):
    """The ``fio`` executable is not on ``PATH``."""


@dataclass(frozen=True)
class FioResult:
    """What one fio job achieved.

    Attributes:
        gib_per_s: bytes moved / 2**30 / runtime_s.
        iops: I/O operations per second as reported by fio.
        cpu_s_per_gib: (usr_s + sys_s) per GiB moved.
        usr_s: user CPU seconds of the fio job process.
        sys_s: system CPU seconds of the fio job process.
        runtime_s: time fio spent doing I/O in this direction, seconds.
        bytes: bytes moved.
        ioengine: the fio I/O engine used.
    """

    gib_per_s: float
    iops: float
    cpu_s_per_gib: float
    usr_s: float
    sys_s: float
    runtime_s: float
    bytes: int
    ioengine: str


def fio_available() -> tuple[bool, str]:
    """Say whether fio can be run.

    Returns:
        ``(True, "fio-3.33 at /usr/bin/fio")`` when it is on ``PATH`` and runs,
        otherwise ``(False, reason)`` with an installation hint.
    """
    path = shutil.which("fio")
    if path is None:
        return False, f"fio not found on PATH; {_INSTALL_HINT}"
    try:
        proc = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"fio at {path} could not be run ({exc}); {_INSTALL_HINT}"
    version = proc.stdout.strip() or proc.stderr.strip()
    if proc.returncode != 0 or not version:
        return False, f"fio at {path} failed to report its version; {_INSTALL_HINT}"
    return True, f"{version.splitlines()[0]} at {path}"


def _build_command(
    fio: str,
    path: str,
    op: str,
    block_size: int,
    queue_depth: int,
    size: int,
    direct: bool,
    ioengine: str,
    runtime_s: float | None,
    offset: int,
    number_ios: int | None,
    fresh: bool,
) -> list[str]:
    """Assemble the fio command line for one job."""
    cmd = [
        fio,
        "--name=llmtier",
        f"--filename={path}",
        f"--rw={op}",
        f"--bs={block_size}",
        f"--iodepth={queue_depth}",
        f"--size={size}",
        f"--offset={offset}",
        f"--direct={1 if direct else 0}",
        f"--ioengine={ioengine}",
        "--numjobs=1",
        "--invalidate=1",
        "--randrepeat=0",
        "--output-format=json",
    ]
    if _OPS[op] == "read":
        # Never let fio lay out (write) a missing file for a read job.
        cmd.append("--allow_file_create=0")
    else:
        # Finish with fsync, as llmtier's write timings do.
        cmd.append("--end_fsync=1")
    if op.startswith("rand"):
        cmd.append("--norandommap")
    if runtime_s is not None:
        cmd += ["--time_based", f"--runtime={runtime_s:g}s"]
    if number_ios is not None:
        cmd.append(f"--number_ios={number_ios}")
    if fresh:
        # No fallocate up front: the writes themselves allocate the blocks.
        cmd.append("--fallocate=none")
    return cmd


def _validate(
    path: str, op: str, block_size: int, queue_depth: int, size: int,
    ioengine: str, runtime_s: float | None, offset: int, number_ios: int | None, fresh: bool,
) -> None:
    """Reject arguments fio would misinterpret; raise ``ValueError``/``FileNotFoundError``."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    if ioengine not in _IOENGINES:
        raise ValueError(f"ioengine must be one of {list(_IOENGINES)}, got {ioengine!r}")
    for name, value in (("block_size", block_size), ("queue_depth", queue_depth), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if size < block_size:
        raise ValueError(f"size ({size}) must be at least block_size ({block_size})")
    if runtime_s is not None and not runtime_s > 0:
        raise ValueError(f"runtime_s must be positive or None, got {runtime_s!r}")
    if number_ios is not None and (isinstance(number_ios, bool) or number_ios <= 0):
        raise ValueError(f"number_ios must be a positive int or None, got {number_ios!r}")
    if fresh and (_OPS[op] != "write" or os.path.exists(path)):
        raise ValueError(f"fresh=True needs a write op on a path that does not exist yet ({path!r})")
    if _OPS[op] == "read":
        if not os.path.isfile(path):
            raise NotFoundError("fio read target does not exist", path=path)
        have = os.path.getsize(path)
        if have < offset + size:
            raise ValueError(
                f"{path!r} holds {have} bytes; reading {size} at offset {offset} needs "
                f"{offset + size}"
            )


def _parse(stdout: str, op: str, ioengine: str, cmd: list[str], stderr: str) -> FioResult:
    """Turn fio's JSON report into a :class:`FioResult`."""
    # fio may print notes before the JSON document; start at the first '{' line.
    start = next((i for i, line in enumerate(stdout.splitlines()) if line.startswith("{")), None)
    if start is None:
        raise FioError("fio printed no JSON report", cmd, stderr)
    try:
        report = json.loads("\n".join(stdout.splitlines()[start:]))
        job = report["jobs"][0]
        section = job[_OPS[op]]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise FioError(f"could not parse fio's JSON report ({exc})", cmd, stderr) from exc
    if job.get("error", 0):
        raise FioError(f"fio job reported error {job['error']}", cmd, stderr)
    nbytes = int(section["io_bytes"])
    runtime_s = float(section["runtime"]) / 1000.0
    if nbytes <= 0 or runtime_s <= 0.0:
        raise FioError(
            f"fio moved {nbytes} bytes in {runtime_s} s; nothing to report "
            "(use a larger size or runtime_s)",
            cmd, stderr,
        )
    job_runtime_s = float(job.get("job_runtime", section["runtime"])) / 1000.0
    usr_s = float(job["usr_cpu"]) / 100.0 * job_runtime_s
    sys_s = float(job["sys_cpu"]) / 100.0 * job_runtime_s
    gib = nbytes / _GIB
    return FioResult(
        gib_per_s=gib / runtime_s,
        iops=float(section["iops"]),
        cpu_s_per_gib=(usr_s + sys_s) / gib,
        usr_s=usr_s,
        sys_s=sys_s,
        runtime_s=runtime_s,
        bytes=nbytes,
        ioengine=ioengine,
    )


def run_fio(
    path: str,
    op: str,
    block_size: int,
    queue_depth: int,
    size: int,
    *,
    direct: bool = True,
    ioengine: str = "io_uring",
    runtime_s: float | None = None,
    offset: int = 0,
    number_ios: int | None = None,
    fresh: bool = False,
) -> FioResult:
    """Run one fio job on ``path`` and return what it measured.

    Args:
        path: the target file.  For ``read``/``randread`` it must exist and hold
            at least ``offset + size`` bytes (fio is told not to create it).
            For ``write``/``randwrite`` fio creates the file if missing and
            **overwrites** bytes ``[offset, offset + size)`` in place; an
            existing larger file is not truncated, but its contents in that
            range are destroyed.
        op: ``"read"``, ``"write"``, ``"randread"`` or ``"randwrite"``.
        block_size: bytes per I/O (``--bs``).
        queue_depth: I/Os kept in flight (``--iodepth``; ignored by ``psync``).
        size: bytes in the region; moved exactly once unless ``runtime_s`` is set.
        direct: open with ``O_DIRECT`` (``--direct=1``), bypassing the page cache.
        ioengine: ``"io_uring"`` (default), ``"libaio"`` or ``"psync"``.
        runtime_s: if set, loop over the region for this many seconds
            (``--time_based --runtime``).
        offset: byte offset of the region in the file.
        number_ios: if set, stop after this many I/Os (``--number_ios``), e.g.
            a fixed count of random reads spread over a large ``size``.
        fresh: a write into a file that does not exist yet, with no
            preallocation (``--fallocate=none``), so block allocation is part
            of what is timed.  fio would otherwise ``fallocate`` the new file
            before the timed phase.

    One process (no ``--thread``), one job, ``--invalidate=1``,
    ``--randrepeat=0`` and, for random ops, ``--norandommap``.

    Raises:
        ValueError: bad arguments, a read target that is too small, or
            ``fresh`` with an existing path.
        NotFoundError: a read target that does not exist (a ``FileNotFoundError``).
        FioNotFoundError: fio is not installed.
        FioError: fio failed; carries the command line and fio's stderr.
    """
    _validate(
        path, op, block_size, queue_depth, size, ioengine, runtime_s, offset, number_ios, fresh
    )
    fio = shutil.which("fio")
    if fio is None:
        raise FioNotFoundError(f"fio not found on PATH; {_INSTALL_HINT}")
    cmd = _build_command(
        fio, path, op, block_size, queue_depth, size, direct, ioengine, runtime_s, offset,
        number_ios, fresh,
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise FioError(f"could not start fio ({exc})", cmd) from exc
    if proc.returncode != 0:
        raise FioError("fio failed", cmd, proc.stderr + proc.stdout[-2000:], proc.returncode)
    return _parse(proc.stdout, op, ioengine, cmd, proc.stderr)
