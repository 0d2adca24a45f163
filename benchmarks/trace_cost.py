"""Recording cost on 1 MiB sequential reads: 1 GiB file, pread_many of 1024 x 1 MiB, interleaved rounds.

    python benchmarks/trace_cost.py FILE [app|all]

``app``: application records and device counters; ``all`` (default): also the block layer (root).
"""
import os, time, statistics as st, tempfile
import numpy as np
import llmtier.trace as trace
from llmtier.engine import open_engine, alloc
import sys
p = sys.argv[1]; N = 1 << 30  # an existing file of at least 1 GiB
block = (sys.argv[2] if len(sys.argv) > 2 else "all") == "all"
buf = alloc(N); buf[::4096] = 0
views = [buf[i << 20:(i + 1) << 20] for i in range(N >> 20)]
offs = [i << 20 for i in range(N >> 20)]
res = {"off": [], "on": []}
with open_engine() as eng, eng.open(p) as f:
    f.pread_many(views, offs).result()
    for r in range(9):
        for mode in (("off", "on") if r % 2 else ("on", "off")):
            if mode == "on":
                with trace.record("/tmp/cost.npz", device_path=os.path.dirname(os.path.abspath(p)), block=block):
                    t = time.perf_counter(); f.pread_many(views, offs).result(); d = time.perf_counter() - t
            else:
                t = time.perf_counter(); f.pread_many(views, offs).result(); d = time.perf_counter() - t
            res[mode].append(N / d / 1e9)
for k, v in res.items():
    print(k, "median %.3f GB/s [%.2f-%.2f]" % (st.median(v), min(v), max(v)))
ratios = [a / b for a, b in zip(res["on"], res["off"])]
print("on/off per round median %.3f" % st.median(ratios), ["%.2f" % x for x in ratios])
t = trace.load("/tmp/cost.npz")
print("events in last trace: app", len(t), "block", len(t.block.get("size", [])), "missing", t.missing)
