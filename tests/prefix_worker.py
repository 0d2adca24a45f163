"""One of several processes sharing a PrefixStore (tests/test_prefix_shared.py): saves, loads and
(through a small capacity) evicts, and checks that every load is the KV of its own prompt."""
from __future__ import annotations

import json
import random
import sys

import torch
import transformers
from transformers import DynamicCache

from llmtier.offload.hfcompat import cache_kwargs
from llmtier.offload.kv import PrefixStore


def main() -> None:
    path, store_dir, seed, iters, capacity, chunk = sys.argv[1:7]
    seed, iters, chunk = int(seed), int(iters), int(chunk)
    torch.set_num_threads(1)
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1234)  # the same prompts in every process: they share prefixes
    pool = [torch.randint(1, 512, (1, 6 * chunk), generator=g) for _ in range(4)]
    rng = random.Random(seed)
    checked = loaded = worst = 0.0
    with PrefixStore(store_dir, capacity=int(capacity), chunk_tokens=chunk) as s, torch.no_grad():
        for _ in range(iters):
            n = rng.randint(chunk + 1, 6 * chunk)
            ids = rng.choice(pool)[:, :n].clone()
            if rng.random() < 0.5:  # the same start, then this process's own tokens
                cut = rng.randint(1, n - 1)
                ids[0, cut:] = torch.tensor([rng.randint(1, 511) for _ in range(n - cut)])
            cache = DynamicCache(config=m.config)
            got = s.fetch(m, ids, cache, force=True)
            if got:  # what was loaded must be this prompt's KV: compare with a fresh prefill of it
                ref = DynamicCache(config=m.config)
                m(ids[:, :got], **cache_kwargs(ref, m), use_cache=True)
                for a, b in zip(cache.layers, ref.layers):
                    for x, y in ((a.keys, b.keys), (a.values, b.values)):
                        diff = float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp(min=1e-6))
                        worst = max(worst, diff)
                checked += 1
                loaded += got
            m(ids[:, got:], **cache_kwargs(cache, m), use_cache=True)
            s.save(m, ids, cache)
        met = s.metrics()
    print(json.dumps({"checked": checked, "loaded": loaded, "worst": worst, "corrupt": met.corrupt,
                      "evictions": met.evictions, "hits": met.hits}))


if __name__ == "__main__":
    main()
