"""The memory cgroup runner: a child over its cap is stopped, one under it is not.

Skipped (with the reason) where no v1 memory cgroup can be made.  The page
cache is not dropped here (``drop_caches=False``): that is a machine-wide act
and other measurements may be running; the drop path is checked with a stub.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmtier.bench import cgroup
from llmtier.bench.cgroup import CgroupError, MemoryCgroup, memory_cgroup_available, run_in_cgroup

MiB = 1 << 20
OK, WHY = memory_cgroup_available()
needs_cgroup = pytest.mark.skipif(not OK, reason=f"no memory cgroup here: {WHY}")


def _alloc(mib: int) -> list[str]:
    """A child that allocates and touches ``mib`` MiB, then says so."""
    return [sys.executable, "-S", "-c", f"b = b'\\x01' * ({mib} << 20); print('done', len(b) >> 20)"]


def _swap_total() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) << 10
    return 0


def test_available_says_why():
    ok, why = memory_cgroup_available()
    assert isinstance(ok, bool) and why


@needs_cgroup
def test_over_the_cap_is_stopped():
    run = run_in_cgroup(_alloc(300), 200 * MiB, drop_caches=False, timeout=60)
    assert not run.timed_out
    if run.swap_limited or _swap_total() == 0:
        assert run.returncode in (-9, 137), (run.returncode, run.stderr)
        assert "done" not in run.stdout
        # Linux 6.18 leaves failcnt at 0 on an OOM kill; oom_kill (>= 4.13) says it.
        assert run.oom_killed or (run.oom_killed is None and run.failcnt > 0)
        assert run.peak_bytes <= 200 * MiB
    else:  # swap exists and is not capped: the child may survive by swapping
        assert run.returncode in (0, -9, 137)


@needs_cgroup
def test_under_the_cap_runs():
    run = run_in_cgroup(_alloc(50), 200 * MiB, drop_caches=False, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["done", "50"]
    assert 50 * MiB < run.peak_bytes < 200 * MiB
    assert run.oom_killed in (False, None)
    assert run.seconds > 0 and not run.cache_dropped and "not dropped" in run.cache_note


@needs_cgroup
def test_drop_cache_result_is_reported(monkeypatch):
    calls = []

    def fake() -> tuple[bool, str]:
        calls.append(1)
        return False, "page cache NOT dropped (stub)"

    monkeypatch.setattr(cgroup, "drop_page_cache", fake)
    run = run_in_cgroup([sys.executable, "-S", "-c", "pass"], 100 * MiB)
    assert calls == [1] and run.returncode == 0
    assert not run.cache_dropped and run.cache_note == "page cache NOT dropped (stub)"


@needs_cgroup
def test_group_removed_and_reusable():
    paths = []
    for _ in range(2):
        with MemoryCgroup(64 * MiB, name=f"llmtier-test-{os.getpid()}") as cg:
            paths.append(cg.path)
            assert os.path.isdir(cg.path)
            with open(os.path.join(cg.path, "memory.limit_in_bytes")) as fh:
                assert int(fh.read()) == 64 * MiB
            assert cg.usage_bytes() == 0 and cg.pids() == []
        assert not os.path.exists(cg.path)
        cg.close()  # idempotent
    assert paths[0] == paths[1]
    with MemoryCgroup(64 * MiB) as a, MemoryCgroup(64 * MiB) as b:  # default names do not collide
        assert a.path != b.path
    assert not os.path.exists(a.path) and not os.path.exists(b.path)


@needs_cgroup
def test_tasks_moved_back_on_exit():
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with MemoryCgroup(64 * MiB) as cg:
            cg.add(proc.pid)
            assert cg.pids() == [proc.pid]
            with open(f"/proc/{proc.pid}/cgroup") as fh:
                assert any(os.path.basename(cg.path) in line for line in fh if ":memory:" in line)
        assert not os.path.exists(cg.path)
        with open(f"/proc/{proc.pid}/cgroup") as fh:
            assert not any(os.path.basename(cg.path) in line for line in fh)
    finally:
        proc.kill()
        proc.wait()


@needs_cgroup
def test_errors_are_typed():
    with pytest.raises(CgroupError):
        MemoryCgroup(0)
    with pytest.raises(CgroupError):
        MemoryCgroup(MiB, name="a/b")
    with MemoryCgroup(MiB) as cg, pytest.raises(CgroupError, match="already exists"):
        MemoryCgroup(MiB, name=os.path.basename(cg.path))
    with pytest.raises(CgroupError, match="closed"):
        cg.peak_bytes()
    with pytest.raises(CgroupError, match="empty"):
        run_in_cgroup([], MiB)


def test_unavailable_is_typed(monkeypatch, tmp_path):
    fake = tmp_path / "cgroup"
    fake.write_text("0::/\n")
    monkeypatch.setattr(cgroup, "_PROC_CGROUP", str(fake))
    ok, why = memory_cgroup_available()
    assert not ok and "memory" in why
    with pytest.raises(CgroupError, match="no cgroup v1 'memory' controller"):
        MemoryCgroup(MiB)


@needs_cgroup
def test_warns_when_group_cannot_be_removed(monkeypatch):
    real_rmdir = os.rmdir

    def busy(path):
        raise OSError(16, "Device or resource busy", path)

    monkeypatch.setattr(cgroup, "_RMDIR_TRIES", 2)
    cg = MemoryCgroup(MiB)
    monkeypatch.setattr(os, "rmdir", busy)
    try:
        with pytest.warns(RuntimeWarning, match="could not be removed"):
            cg.close()
    finally:
        monkeypatch.setattr(os, "rmdir", real_rmdir)
        real_rmdir(cg.path)
