"""Device counters from ``/proc/diskstats``, sampled in a background thread.

Always available (no privilege needed): reads and writes completed, sectors,
time spent, and requests in flight for the block device that backs a path.
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

# Fields after major, minor, name (Documentation/admin-guide/iostats.rst).
FIELDS = ("reads", "reads_merged", "read_sectors", "read_ms", "writes", "writes_merged", "write_sectors",
          "write_ms", "in_flight", "io_ms", "weighted_ms")


def device_of(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(device_name, reason)`` for the block device holding ``path``: the
    whole disk, not the partition; name is "" with a reason when unknown
    (e.g. overlay or network file systems)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    sys_path = f"/sys/dev/block/{major}:{minor}"
    if not os.path.exists(sys_path):
        return "", f"{path} is on device {major}:{minor}, which is not a block device (overlay, tmpfs or network?)"
    real = os.path.realpath(sys_path)
    if os.path.exists(os.path.join(real, "partition")):
        real = os.path.dirname(real)
    return os.path.basename(real), ""


def read_counters(device: str) -> list[int] | None:
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 + len(FIELDS) and parts[2] == device:
                return [int(x) for x in parts[3 : 3 + len(FIELDS)]]
    return None


class DiskStatsSampler:
    """Sample the counters of ``device`` every ``interval`` seconds until stopped."""

    def __init__(self, device: str, interval: float = 0.1) -> None:
        if read_counters(device) is None:
            raise ValueError(f"device {device!r} is not in /proc/diskstats")
        self.device = device
        self.interval = interval
        self._rows: list[list[int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmtier-diskstats", daemon=True)

    def start(self) -> DiskStatsSampler:
        self._sample()
        self._thread.start()
        return self

    def _sample(self) -> None:
        c = read_counters(self.device)
        if c is not None:
            self._rows.append([time.monotonic_ns(), *c])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> np.ndarray:
        """Stop and return the samples: columns ``t_ns`` then :data:`FIELDS`."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()
        return np.array(self._rows, dtype=np.int64).reshape(-1, 1 + len(FIELDS))
