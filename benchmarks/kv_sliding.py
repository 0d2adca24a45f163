"""Bytes the KV tier reads and writes for a sliding-window model, traced, against the analytic count.

    PYTHONPATH=src python benchmarks/kv_sliding.py --dir /tmp/kvs [--family ministral] [--window 512]

A random-weight model of the family (8 layers, 4 KV heads of 64, bf16) runs a
prefill of ``--context`` tokens and ``--steps`` one-token forwards with a
``TieredCache`` holding every layer on SSD (``spill_all``), under
``llmtier.trace.record``.  Printed: the tier's counters, the bytes the tracer
saw the engine read and write, and ``bench.kv.analytic_bytes`` with the
layers' windows; reads include the read-ahead of the pass that never came
(``discarded_bytes``), which the formula does not count.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from llmtier.bench.families import family_config
from llmtier.bench.kv import analytic_bytes
from llmtier.offload.kv import TieredCache, min_memory
from llmtier.offload.kv.tiered import layer_windows
from llmtier.trace import load, record
from llmtier.trace.analysis import rw_summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True, help="spill file and trace go here (a real disk, not tmpfs)")
    ap.add_argument("--family", default="ministral")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--page", type=int, default=128)
    a = ap.parse_args(argv)

    config = family_config(a.family, layers=8, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=64, sliding_window=a.window,
                           max_position_embeddings=4 * a.context)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    wins = [w for w in layer_windows(model.config) if w != 0]
    memory = min_memory(len(wins), a.batch, 4, 64, 2, a.context + a.steps + 1, page_tokens=a.page, windows=wins)
    os.makedirs(a.dir, exist_ok=True)
    trace_path = os.path.join(a.dir, "kv-sliding.trace.npz")
    ids = torch.randint(1, config.vocab_size, (a.batch, a.context), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    with TieredCache(model.config, memory=memory, path=a.dir, page_tokens=a.page, spill_all=True) as cache, \
            torch.no_grad(), record(trace_path, device_path=a.dir, label=f"KV sliding {a.family}"):
        nxt = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for _ in range(a.steps):
            nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        st = cache.stats()
    wall = time.perf_counter() - t0
    group = 2 * a.batch * 4 * 64 * 2 * a.page
    reads, writes = analytic_bytes(a.context, a.steps, len(wins), a.page, group, windows=wins)
    app = rw_summary(load(trace_path), "app")
    full = analytic_bytes(a.context, a.steps, len(wins), a.page, group)  # the same model without windows
    out = {"family": a.family, "windows": wins, "context": a.context, "steps": a.steps, "batch": a.batch,
           "page_tokens": a.page, "memory": memory, "wall_s": round(wall, 2),
           "counters": {"read": st.bytes_read, "discarded": st.discarded_bytes, "written": st.bytes_written,
                        "pages_dropped": st.pages_dropped, "peak_dram": st.peak_dram_bytes, "ssd_now": st.ssd_bytes},
           "traced": {"read": app["read_bytes"], "written": app["write_bytes"]},
           "analytic": {"read": reads, "written": writes},
           "full_attention_analytic": {"read": full[0], "written": full[1]},
           "traced_over_analytic": {"read": app["read_bytes"] / reads, "written": app["write_bytes"] / writes}}
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    os.unlink(trace_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
