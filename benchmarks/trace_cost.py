"""Recording cost on 1 MiB sequential reads: 1 GiB file, pread_many of 1024 x 1 MiB, interleaved rounds.

    python benchmarks/trace_cost.py FILE [app|all]

``app``: application records and device counters; ``all`` (default): also the block layer (root).
"""
import os
import statistics as st
import sys
import time

import llmtier.trace as trace
from llmtier.engine import alloc, open_engine

N = 1 << 30  # FILE must exist and hold at least 1 GiB
OUT = "/tmp/cost.npz"


def main(path: str, block: bool) -> None:
    buf = alloc(N)
    buf[::4096] = 0  # fault the buffer in before any timing
    views = [buf[i << 20:(i + 1) << 20] for i in range(N >> 20)]
    offs = [i << 20 for i in range(N >> 20)]
    res: dict[str, list[float]] = {"off": [], "on": []}
    with open_engine() as eng, eng.open(path) as f:
        f.pread_many(views, offs).result()  # warm-up

        def timed() -> float:
            t = time.perf_counter()
            f.pread_many(views, offs).result()
            return time.perf_counter() - t

        for r in range(9):
            for mode in (("off", "on") if r % 2 else ("on", "off")):
                if mode == "on":
                    with trace.record(OUT, device_path=os.path.dirname(os.path.abspath(path)), block=block):
                        d = timed()
                else:
                    d = timed()
                res[mode].append(N / d / 1e9)
    for k, v in res.items():
        print(k, f"median {st.median(v):.3f} GB/s [{min(v):.2f}-{max(v):.2f}]")
    ratios = [a / b for a, b in zip(res["on"], res["off"])]
    print(f"on/off per round median {st.median(ratios):.3f}", [f"{x:.2f}" for x in ratios])
    t = trace.load(OUT)
    print("events in last trace: app", len(t), "block", len(t.block.get("size", [])), "missing", t.missing)


if __name__ == "__main__":
    main(sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "all") == "all")
