"""Several processes share one PrefixStore: each sees the others' chunks, the capacity holds for all of
them together, evictions by another process are misses (not corruption), and no request ever loads KV
other than its own (issue 13)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.hfmodels import make_model  # noqa: E402
from llmtier.offload.hfcompat import cache_kwargs  # noqa: E402
from llmtier.offload.kv import KVConfigError, PrefixStore  # noqa: E402

C = 8
WORKER = os.path.join(os.path.dirname(__file__), "prefix_worker.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("shared") / "llama"), "llama", layers=2, tokenizer=False)


def chunk_bytes(store_dir):
    d = os.path.join(store_dir, "chunks")
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".lts"))


def test_three_processes_save_load_and_evict_safely(model_dir, tmp_path):
    store = str(tmp_path / "prefix")
    capacity = 96 << 10
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, WORKER, model_dir, store, str(seed), "14", str(capacity), str(C)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for seed in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["corrupt"] == 0 for r in results), results  # another process's evictions are misses
    assert sum(r["checked"] for r in results) > 0 and sum(r["evictions"] for r in results) > 0, results
    assert max(r["worst"] for r in results) < 0.02, results  # every load was the prompt's own KV
    assert chunk_bytes(store) <= capacity  # the capacity held for the three together
    with PrefixStore(store, capacity=capacity, chunk_tokens=C) as s:
        assert s.metrics().dropped_at_open == 0 and s.metrics().stored_bytes <= capacity


def test_a_store_opened_earlier_sees_what_another_saved(model_dir, tmp_path):
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    ids = torch.randint(1, 512, (1, 4 * C + 1), generator=torch.Generator().manual_seed(3))
    with PrefixStore(tmp_path, chunk_tokens=C) as early, PrefixStore(tmp_path, chunk_tokens=C) as other, \
            torch.no_grad():
        cache = transformers.DynamicCache(config=m.config)
        m(ids, **cache_kwargs(cache, m), use_cache=True)
        assert other.save(m, ids, cache) == 4
        assert early.lookup(m, ids[0].tolist()) == 4 * C
        assert early.fetch(m, ids, transformers.DynamicCache(config=m.config), force=True) == 4 * C
        other._drop(next(iter(other._index)))  # evicted elsewhere (chunk 0 and all after it)
        other._bump()
        assert early.fetch(m, ids, transformers.DynamicCache(config=m.config), force=True) == 0
        assert early.metrics().corrupt == 0


def test_save_keeps_only_unpadded_rows(model_dir, tmp_path):
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(4)
    long = torch.randint(1, 512, (1, 3 * C), generator=g)
    short = torch.cat([torch.zeros(1, C, dtype=long.dtype), torch.randint(1, 512, (1, 2 * C), generator=g)], dim=1)
    batch = torch.cat([long, short])
    mask = torch.cat([torch.ones(1, 3 * C), torch.cat([torch.zeros(1, C), torch.ones(1, 2 * C)], dim=1)]).long()
    with PrefixStore(tmp_path, chunk_tokens=C) as s, torch.no_grad():
        cache = transformers.DynamicCache(config=m.config)
        m(batch, attention_mask=mask, **cache_kwargs(cache, m), use_cache=True)
        with pytest.raises(KVConfigError, match="attention_mask"):
            s.save(m, batch, cache)  # looks left-padded: refused without the mask
        assert s.save(m, batch, cache, attention_mask=mask) == 3  # the unpadded row's chunks only
        assert s.lookup(m, short[0, C:].tolist()) == 0 and s.lookup(m, long[0].tolist()) == 3 * C
        assert s.fetch(m, batch, transformers.DynamicCache(config=m.config), attention_mask=mask) == 0
