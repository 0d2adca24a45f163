"""Run a child process under a memory cap: a cgroup v1 ``memory`` controller group.

A benchmark of an offloading runtime is only honest when the runtime cannot
quietly use more RAM than its budget.  This module makes a child memory cgroup
under the one this process is in, caps it (``memory.limit_in_bytes``, and
``memory.memsw.limit_in_bytes`` to the same value where the kernel has swap
accounting, so swap cannot be used to escape the cap), starts a command inside
it and reads back what the kernel recorded: peak usage, how often the limit was
hit, whether the OOM killer fired.

Only the cgroup v1 memory controller is used: on the machines this was written
for, cgroup v2 has no memory controller and ``systemd-run --scope -p
MemoryMax=`` does not work.

What the kernel charges to the group (v1): anonymous memory the child
allocates *and* the page cache pages it brings in (file reads, mmap'd files).
Pages that were already cached before the child ran stay charged to whoever
read them first and are not counted against the cap -- that is why
:func:`run_in_cgroup` drops the page cache first by default.  Cached pages are
reclaimable: under the cap the kernel evicts clean file pages before it
OOM-kills, so a child that mmaps a large file is slowed down, not killed.
"""
from __future__ import annotations

import errno as _errno
import os
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

from ..errors import LLMTierError
from .system import drop_page_cache

__all__ = ["CgroupError", "CgroupRun", "MemoryCgroup", "memory_cgroup_available", "run_in_cgroup", "run_json_child"]

_PROC_CGROUP = "/proc/self/cgroup"
_PROC_MOUNTINFO = "/proc/self/mountinfo"
_RMDIR_TRIES = 40
_RMDIR_PAUSE_S = 0.025


class CgroupError(LLMTierError, RuntimeError):
    """A memory cgroup cannot be made, configured, joined or read; the message says what is missing."""


def _own_memory_cgroup() -> tuple[str, str]:
    """``(directory, cgroup path)`` of the v1 memory cgroup this process is in.

    Raises:
        CgroupError: no v1 memory controller in ``/proc/self/cgroup`` or no
            mount of it in ``/proc/self/mountinfo``.
    """
    try:
        with open(_PROC_CGROUP, encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise CgroupError(f"cannot read {_PROC_CGROUP}: {exc.strerror}") from exc
    rel = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            rel = parts[2]
            break
    if rel is None:
        raise CgroupError(f"no cgroup v1 'memory' controller in {_PROC_CGROUP} "
                          "(cgroup v2 only, or the memory controller is not mounted)")
    try:
        with open(_PROC_MOUNTINFO, encoding="utf-8") as fh:
            mounts = fh.read().splitlines()
    except OSError as exc:
        raise CgroupError(f"cannot read {_PROC_MOUNTINFO}: {exc.strerror}") from exc
    for line in mounts:
        head, sep, tail = line.partition(" - ")
        fields, extra = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(extra) < 3:
            continue
        fstype, super_opts = extra[0], extra[2].split(",")
        if fstype != "cgroup" or "memory" not in super_opts:
            continue
        root, mount_point = fields[3], fields[4]
        # ``root`` is the cgroup seen at the mount point (not "/" inside some containers).
        if root != "/" and rel != root and not rel.startswith(root.rstrip("/") + "/"):
            continue
        below = rel[len(root):] if root != "/" else rel
        return os.path.join(mount_point, below.lstrip("/")), rel
    raise CgroupError(f"the cgroup v1 'memory' controller is not mounted (no 'cgroup ... memory' line in {_PROC_MOUNTINFO} "
                      f"that holds {rel!r})")


def memory_cgroup_available() -> tuple[bool, str]:
    """Whether a child memory cgroup can be made here: ``(True, parent dir)`` or ``(False, reason)``.

    Tries for real: makes and removes an empty probe group under this
    process's own memory cgroup (needs write permission there, usually root).
    """
    try:
        parent, _ = _own_memory_cgroup()
    except CgroupError as exc:
        return False, str(exc)
    if not os.path.isfile(os.path.join(parent, "memory.limit_in_bytes")):
        return False, f"{parent} has no memory.limit_in_bytes (not a v1 memory cgroup directory?)"
    probe = os.path.join(parent, f"llmtier-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except FileExistsError:
        pass  # left by an earlier process with this pid: as good a probe, removed below
    except OSError as exc:
        return False, f"cannot create a child memory cgroup in {parent}: {exc.strerror} (needs root or write access)"
    try:
        os.rmdir(probe)
    except OSError as exc:
        return False, f"made {probe} but cannot remove it: {exc.strerror}"
    return True, parent


def _write(path: str, text: str) -> None:
    """Write ``text`` to a cgroup control file (one ``write``, as the kernel expects)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path, encoding="ascii") as fh:
        return fh.read()


class MemoryCgroup:
    """A child memory cgroup with a cap; removed again by :meth:`close`.

    The group is made (and capped) by the constructor, under this process's own
    v1 memory cgroup.  Use it as a context manager: on exit every task still in
    it is moved back to the parent group and the directory is removed (retried
    briefly while the kernel finishes tearing down exited tasks; a warning if
    it still cannot be removed).

    Args:
        limit_bytes: the cap, written to ``memory.limit_in_bytes`` (the kernel
            rounds it down to whole pages).
        name: the group's directory name; by default ``llmtier-<pid>-<n>`` with
            the smallest ``n`` not taken.

    Attributes:
        path: the group's directory.
        parent: the directory of the group it was made in.
        swap_limited: whether ``memory.memsw.limit_in_bytes`` was set too (swap
            cannot be used to exceed the cap); ``False`` where the kernel has
            no swap accounting.

    Raises:
        CgroupError: no usable memory controller, no permission, a group of
            that name exists, or the kernel refused the limit.
    """

    def __init__(self, limit_bytes: int, name: str | None = None) -> None:
        if not isinstance(limit_bytes, int) or limit_bytes <= 0:
            raise CgroupError(f"limit_bytes must be a positive int, got {limit_bytes!r}")
        if name is not None and (not name or "/" in name or name in (".", "..")):
            raise CgroupError(f"invalid cgroup name {name!r}")
        self.parent, _ = _own_memory_cgroup()
        self.limit_bytes = limit_bytes
        self.path = self._make(name)
        self._closed = False
        self.swap_limited = False
        try:
            self._set_limits(limit_bytes)
        except BaseException:
            self.close()
            raise

    def _make(self, name: str | None) -> str:
        """Create the group's directory and return it."""
        candidates = [name] if name is not None else (f"llmtier-{os.getpid()}-{n}" for n in range(1 << 16))
        for cand in candidates:
            path = os.path.join(self.parent, cand)
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                if name is not None:
                    raise CgroupError(f"memory cgroup {path} already exists") from None
            except OSError as exc:
                raise CgroupError(f"cannot create memory cgroup {path}: {exc.strerror} "
                                  "(needs root or write access to the parent group)") from exc
        raise CgroupError(f"no free llmtier-{os.getpid()}-<n> name in {self.parent}")

    def _set_limits(self, limit: int) -> None:
        """Cap memory, then memory+swap; the kernel wants memsw >= memory at every step."""
        try:
            _write(self._file("memory.limit_in_bytes"), str(limit))
        except OSError as exc:
            raise CgroupError(f"cannot set {self._file('memory.limit_in_bytes')} to {limit}: {exc.strerror}") from exc
        memsw = self._file("memory.memsw.limit_in_bytes")
        if not os.path.exists(memsw):
            return  # no swap accounting (swapaccount=0): swap is not capped
        try:
            _write(memsw, str(limit))
            self.swap_limited = True
        except OSError as exc:
            warnings.warn(f"memory cgroup {self.path}: could not cap memory+swap ({exc.strerror}); "
                          "the child may swap past the cap", RuntimeWarning, stacklevel=3)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def _int(self, name: str) -> int:
        if self._closed:
            raise CgroupError(f"memory cgroup {self.path} is closed")
        try:
            return int(_read(self._file(name)).strip())
        except (OSError, ValueError) as exc:
            raise CgroupError(f"cannot read {self._file(name)}: {exc}") from exc

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group."""
        if self._closed:
            raise CgroupError(f"memory cgroup {self.path} is closed")
        try:
            _write(self._file("cgroup.procs"), str(pid))
        except OSError as exc:
            raise CgroupError(f"cannot move pid {pid} into {self.path}: {exc.strerror}") from exc

    def pids(self) -> list[int]:
        """The processes in the group now."""
        return [int(x) for x in _read(self._file("cgroup.procs")).split()]

    def usage_bytes(self) -> int:
        """Bytes charged to the group now (anonymous memory and page cache)."""
        return self._int("memory.usage_in_bytes")

    def peak_bytes(self) -> int:
        """The most bytes ever charged to the group (``memory.max_usage_in_bytes``)."""
        return self._int("memory.max_usage_in_bytes")

    def failcnt(self) -> int:
        """How many times a charge hit the cap: reclaim was needed, not necessarily an OOM kill.

        The sum of ``memory.failcnt`` and ``memory.memsw.failcnt``: with swap
        capped too, the kernel checks memory+swap first and counts a refused
        charge there only.  Some kernels do not count at all (Linux 6.18 left
        both at 0 for a child that was OOM-killed): use :meth:`oom_killed`.
        """
        total = self._int("memory.failcnt")
        if os.path.exists(self._file("memory.memsw.failcnt")):
            total += self._int("memory.memsw.failcnt")
        return total

    def stat(self) -> dict[str, int]:
        """``memory.stat`` as a dict (``rss``, ``cache``, ``mapped_file``, ``total_*`` ...)."""
        out: dict[str, int] = {}
        for line in _read(self._file("memory.stat")).splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                out[key] = int(value)
        return out

    def oom_killed(self) -> bool | None:
        """Whether the OOM killer killed a task of the group; ``None`` if the kernel does not say.

        Read from the ``oom_kill`` count in ``memory.oom_control`` (Linux >= 4.13).
        """
        try:
            text = _read(self._file("memory.oom_control"))
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value) > 0
        return None

    def preexec_join(self) -> Callable[[], None]:
        """A ``preexec_fn`` for :class:`subprocess.Popen` that puts the child in the group.

        It runs in the forked child before ``exec``, so everything the new
        program allocates is charged to the group.  It only calls ``os.open``,
        ``os.write`` and ``os.close`` on a path computed here, in the parent.
        """
        procs = self._file("cgroup.procs").encode()

        def join() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode("ascii"))
            finally:
                os.close(fd)

        return join

    def close(self) -> None:
        """Move remaining tasks to the parent group and remove the group (idempotent)."""
        if self._closed:
            return
        self._closed = True
        parent_procs = os.path.join(self.parent, "cgroup.procs")
        last: OSError | None = None
        for _ in range(_RMDIR_TRIES):
            try:
                for pid in self.pids():
                    try:
                        _write(parent_procs, str(pid))
                    except ProcessLookupError:
                        pass  # exited meanwhile
            except FileNotFoundError:
                return  # someone else removed it
            except OSError as exc:
                last = exc
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                last = exc
                if exc.errno not in (_errno.EBUSY, _errno.EAGAIN):
                    break
            time.sleep(_RMDIR_PAUSE_S)
        why = f"{last.strerror}" if last is not None else "unknown"
        warnings.warn(f"memory cgroup {self.path} could not be removed ({why}); remove it with `rmdir {self.path}`",
                      RuntimeWarning, stacklevel=2)

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemoryCgroup({self.path!r}, limit_bytes={self.limit_bytes}{', closed' if self._closed else ''})"


@dataclass(frozen=True)
class CgroupRun:
    """What :func:`run_in_cgroup` saw.

    ``returncode`` is negative when a signal ended the child (``-9``: killed,
    typically by the OOM killer when ``oom_killed`` is true).  ``peak_bytes``
    and ``failcnt`` are the group's, so they include the page cache the child
    brought in.
    """

    argv: tuple[str, ...]
    limit_bytes: int
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int
    failcnt: int
    oom_killed: bool | None
    seconds: float
    timed_out: bool
    cache_dropped: bool
    cache_note: str
    swap_limited: bool


def run_in_cgroup(
    argv: Sequence[str],
    limit_bytes: int,
    *,
    drop_caches: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> CgroupRun:
    """Run ``argv`` in a fresh memory cgroup capped at ``limit_bytes`` and wait for it.

    The page cache is dropped first when asked (needs root; ``cache_dropped``
    and ``cache_note`` say whether it worked): pages cached before the run are
    charged to someone else and would escape the cap.  The child joins the
    group in a ``preexec_fn``, before ``exec``, so none of its memory is
    charged elsewhere.  On ``timeout`` the child is killed and ``timed_out``
    is set.  stdout and stderr are collected whole (decoded as UTF-8 with
    replacement).

    Raises:
        CgroupError: no usable memory cgroup, or the child could not join it.
        FileNotFoundError: ``argv[0]`` does not exist.
    """
    argv = tuple(argv)
    if not argv:
        raise CgroupError("argv is empty: nothing to run")
    with MemoryCgroup(limit_bytes) as cg:
        if drop_caches:
            cache_dropped, cache_note = drop_page_cache()
        else:
            cache_dropped, cache_note = False, "page cache not dropped (drop_caches=False); cached pages escape the cap"
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=dict(env) if env is not None else None, preexec_fn=cg.preexec_join())
        except subprocess.SubprocessError as exc:  # the preexec_fn failed in the child
            raise CgroupError(f"the child could not join {cg.path}: {exc}") from exc
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - t0
        return CgroupRun(
            argv=argv,
            limit_bytes=limit_bytes,
            returncode=proc.returncode,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            peak_bytes=cg.peak_bytes(),
            failcnt=cg.failcnt(),
            oom_killed=cg.oom_killed(),
            seconds=seconds,
            timed_out=timed_out,
            cache_dropped=cache_dropped,
            cache_note=cache_note,
            swap_limited=cg.swap_limited,
        )


def run_json_child(module: str, job: Mapping[str, object], limit: int | None, *, timeout: float = 3600.0) -> dict:
    """Run ``python -m module --child JOB_JSON`` in a fresh process -- in a memory cgroup of ``limit`` bytes
    (``None``: uncapped) with the page cache dropped first -- and return the last JSON line it printed, with
    ``ok=True`` and ``cgroup_peak_bytes`` added; or ``{"ok": False, "error": ..., "stderr": ...}`` when it
    failed or was killed by the cap.  The bench children of ``bench weights``, ``bench moe`` and ``bench plan``."""
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415

    argv = [sys.executable, "-m", module, "--child", json.dumps(job)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    if limit is None:
        drop_page_cache()
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
        rc, out, err, peak, oom = p.returncode, p.stdout, p.stderr, None, False
    else:
        r = run_in_cgroup(argv, limit, drop_caches=True, env=env, timeout=timeout)
        rc, out, err, peak, oom = r.returncode, r.stdout, r.stderr, r.peak_bytes, bool(r.oom_killed)
    line = next((x for x in reversed(out.splitlines()) if x.startswith("{")), None)
    if rc != 0 or line is None:
        why = "killed by the memory cap (OOM)" if oom or rc in (-9, 137) else f"exit {rc}"
        return {"ok": False, "error": why, "stderr": err.strip()[-800:], "cgroup_peak_bytes": peak}
    res = json.loads(line)
    res.update(ok=True, cgroup_peak_bytes=peak)
    return res
