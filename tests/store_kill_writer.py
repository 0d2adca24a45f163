"""The writer process of the SIGKILL test in ``test_store_hardening.py``.

``python store_kill_writer.py PATH WHICH MAX_SHARD_BYTES`` writes the
deterministic content ``WHICH`` ("old" or "new") to ``PATH`` (a sharded
store when ``MAX_SHARD_BYTES`` > 0).  It prints ``ready`` once the content is
in memory, just before the write starts, and ``done`` after the commit.  The
test imports :func:`content` from here so both sides agree on the bytes.
"""
from __future__ import annotations

import sys

import numpy as np

from llmtier.store import write_store

# name -> (numpy dtype, shape); "old" and "new" share some names with
# different sizes and dtypes, so a mix of the two can never pass as either.
_LAYOUT = {
    "old": {"w0": ("float32", (512, 1024)), "w1": ("int16", (1 << 20,)), "w2": ("uint8", (3 << 20,)),
            "w3": ("float64", (256, 1024)), "old_only": ("int64", (1000, 3)), "empty": ("float32", (0, 7)),
            "scalar": ("int32", ())},
    "new": {"w0": ("float32", (2048, 1024)), "w1": ("int16", (3 << 20,)), "w2": ("uint8", (9 << 20,)),
            "w3": ("float64", (1024, 1024)), "new_only_a": ("int8", (7 << 20,)),
            "new_only_b": ("float16", (2 << 20,)), "empty": ("float32", (0, 7)), "scalar": ("int32", ())},
}


def content(which: str) -> dict[str, np.ndarray]:
    """Random bits (so every byte differs between old and new with high probability)."""
    rng = np.random.default_rng({"old": 1, "new": 2}[which])
    out = {}
    for name, (dtype, shape) in _LAYOUT[which].items():
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out[name] = np.frombuffer(rng.bytes(n), dtype=dt).reshape(shape)
    return out


def tags(which: str) -> dict[str, dict[str, int]]:
    """One decoder "layer" per tensor, so a sharded writer may split anywhere."""
    return {name: {"layer": i} for i, name in enumerate(_LAYOUT[which])}


def main(argv: list[str]) -> int:
    path, which, max_shard = argv[1], argv[2], int(argv[3])
    data = content(which)
    print("ready", flush=True)
    write_store(path, data, tags=tags(which), max_shard_bytes=max_shard or None)
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
