"""Where resident experts lie, paired in one process: the same MoE store
streamed three ways and the in-memory model, generation by generation in
turn (the same prompts; the VM's drifts hit all four alike).

* ``rows``: experts at their own rows of sparse full-size buffers, evictions
  move pages (``mremap``), each layer waits for its missing experts first;
* ``slots``: a shared pool of expert-sized slots in huge pages, transformers'
  own grouped forward on the pool, each layer still waiting first;
* ``overlap``: slots, and the experts computed one by one, resident first,
  so the reads of the missing ones overlap the products of the resident ones
  (the default of ``stream_model(..., experts=...)``);
* ``memory``: ``from_pretrained`` (add ``--memory``).

Usage (a store written by ``llmtier bench moe``)::

    python benchmarks/moe_layouts.py STORE --budget 25% --rounds 12 --predict auto --memory
"""
from __future__ import annotations

import argparse
import statistics

import torch

from llmtier.offload.generate import generate_timed
from llmtier.offload.layout import open_layout
from llmtier.offload.moe import bind_moe_streamer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store")
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--predict", choices=("auto", "true", "false"), default="auto")
    ap.add_argument("--memory", action="store_true", help="also the in-memory model (the HF directory beside the store)")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    a = ap.parse_args()
    predict = {"auto": "auto", "true": True, "false": False}[a.predict]
    torch.set_num_threads(2)
    models = {}
    for name, slots, overlap in (("rows", False, None), ("slots", True, False), ("overlap", True, None)):
        lay = open_layout(a.store)
        s = bind_moe_streamer(lay, a.budget, policy="lru", predict=predict, verify="never", slots=slots)
        if overlap is False:
            s.place.overlap = False
            s.place.why_not_overlap = "turned off for this comparison"
        models[name] = (lay.model, s)
    if a.memory:
        import transformers  # noqa: PLC0415

        ref = transformers.AutoModelForCausalLM.from_pretrained(a.store.removesuffix(".store"), dtype=torch.bfloat16)
        models["memory"] = (ref.eval(), None)
    vocab = models["rows"][0].config.vocab_size
    decode = {k: [] for k in models}
    stall = {k: [] for k in models}
    for rnd in range(a.rounds + 1):  # round 0 warms up (first touches of every buffer)
        ids = torch.randint(1, vocab, (1, a.prompt), generator=torch.Generator().manual_seed(rnd))
        for name, (m, s) in models.items():
            s0 = s.stats().expert_stall_s if s else 0.0
            rec = generate_timed(m, ids, a.new_tokens).record()
            if rnd:
                decode[name].append(rec["decode_s"] / max(1, rec["decode_steps"]))
                stall[name].append((s.stats().expert_stall_s - s0) if s else 0.0)
    ref_s = statistics.median(decode["memory"]) if a.memory else None
    print(f"{a.store} budget {a.budget} predict {a.predict}, {a.rounds} rounds of {a.prompt} + {a.new_tokens} tokens")
    print("| layout | decode ms/token, median (min-max) | expert wait ms per generation | of in-memory |")
    print("|---|---|---|---|")
    for name, xs in decode.items():
        med = statistics.median(xs)
        ratio = f"{ref_s / med:.2f}" if ref_s else "-"
        print(f"| {name} | {med * 1e3:.1f} ({min(xs) * 1e3:.1f}-{max(xs) * 1e3:.1f}) | "
              f"{statistics.median(stall[name]) * 1e3:.0f} | {ratio} |")
    for _, s in models.values():
        if s is not None:
            s.close()


if __name__ == "__main__":
    main()
