"""The prefix store: reuse across requests and restarts, damage, capacity, pins, admission, the choice to load."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.hfmodels import make_model  # noqa: E402
from llmtier.offload.hfcompat import cache_kwargs  # noqa: E402
from llmtier.offload.kv import KVConfigError, PrefixStore, TieredCache, chain_keys, model_identity  # noqa: E402

DynamicCache = transformers.DynamicCache
C = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_model(str(tmp_path_factory.mktemp("pm") / "llama"), "llama", layers=4, tokenizer=False)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def ids_of(n, seed=0, batch=1):
    return torch.randint(1, 512, (batch, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, cache, new=6):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, **cache_kwargs(cache), output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


def prefill_and_save(model, store, ids):
    cache = DynamicCache(config=model.config)
    out = generate(model, ids, cache)
    return out, store.save(model, ids, cache)


def chunk_files(path):
    d = os.path.join(path, "chunks")
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n.endswith(".lts"))


def test_hit_gives_the_same_tokens_and_logits(model, tmp_path):
    ids = ids_of(300, batch=2)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        want, saved = prefill_and_save(model, store, ids)
        assert saved == 2 * (300 // C)
        assert store.lookup(model, ids[0].tolist()) == 288
        for cache in (DynamicCache(config=model.config),
                      TieredCache(model.config, memory=250_000, path=tmp_path / "spill", page_tokens=C, prefetch=1)):
            assert store.fetch(model, ids, cache) == 288
            got = generate(model, ids, cache)
            assert torch.equal(got.sequences, want.sequences)
            for a, b in zip(got.logits, want.logits):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-2)
            if isinstance(cache, TieredCache):
                assert cache.stats().spilled_layers > 0
                cache.close()
        m = store.metrics()
        assert m.hits == 2 * 2 * 18 and m.misses == 0 and m.hit_tokens == 2 * 2 * 288 and m.ssd_bytes > 0


def test_prompt_of_whole_chunks_loads_all_but_the_last_token(model, tmp_path):
    ids = ids_of(64)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        want, _ = prefill_and_save(model, store, ids)
        cache = DynamicCache(config=model.config)
        assert store.fetch(model, ids, cache) == 63
        assert torch.equal(generate(model, ids, cache).sequences, want.sequences)


def test_restart_in_a_fresh_process_hits_every_chunk(model, tmp_path):
    ids = ids_of(90, seed=3)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        prefill_and_save(model, store, ids)
    code = (
        "import json, sys, torch, transformers\n"
        "from llmtier.offload.kv import PrefixStore\n"
        "from llmtier.offload.hfcompat import cache_kwargs\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({model.name_or_path!r}, dtype=torch.bfloat16)\n"
        f"with PrefixStore({str(tmp_path)!r}, chunk_tokens={C}) as s:\n"
        f"    ids = torch.tensor([{ids[0].tolist()}])\n"
        "    c = transformers.DynamicCache(config=m.config)\n"
        "    n = s.fetch(m, ids, c)\n"
        "    print(json.dumps({'n': n, **s.metrics().as_dict()}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["n"] == 80 and got["hits"] == 5 and got["misses"] == 0 and got["dropped_at_open"] == 0


def test_corrupt_chunk_is_detected_dropped_and_recomputed(model, tmp_path):
    ids = ids_of(100, seed=4)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        want, _ = prefill_and_save(model, store, ids)
        keys = chain_keys(store.identity(model), ids[0].tolist(), C)
    victim = os.path.join(tmp_path, "chunks", f"{keys[2]}.lts")
    with PrefixStore(tmp_path, chunk_tokens=C) as store:  # the header is intact: start-up keeps it
        c = store._index[keys[2]]
        with open(victim, "r+b") as f:  # flip one payload byte
            f.seek(c.offset + 100)
            b = f.read(1)
            f.seek(c.offset + 100)
            f.write(bytes([b[0] ^ 0xFF]))
        cache = DynamicCache(config=model.config)
        n = store.fetch(model, ids, cache)
        assert n == 2 * C  # chunks 0 and 1 loaded; the damaged one and everything after it recomputed
        m = store.metrics()
        assert m.corrupt == 1 and not os.path.exists(victim)
        assert store.lookup(model, ids[0].tolist()) == 2 * C
        assert torch.equal(generate(model, ids, cache).sequences, want.sequences)


def test_truncated_and_hostile_files_are_dropped_at_start_up(model, tmp_path):
    ids = ids_of(100, seed=5)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        prefill_and_save(model, store, ids)
        keys = chain_keys(store.identity(model), ids[0].tolist(), C)
    d = os.path.join(tmp_path, "chunks")
    with open(os.path.join(d, f"{keys[4]}.lts"), "r+b") as f:  # truncated: the payload ends early
        f.truncate(6000)
    with open(os.path.join(d, "0" * 32 + ".lts"), "wb") as f:  # wrong magic
        f.write(b"NOTASTORE" + b"\0" * 5000)
    with open(os.path.join(d, "1" * 32 + ".lts"), "wb") as f:  # a header claiming a huge index
        f.write(b"LLMTIER\0" + (2**62).to_bytes(8, "little") * 8)
    with open(os.path.join(d, f".{keys[0]}.lts.tmp-1-deadbeef"), "wb") as f:  # a writer that died
        f.write(b"\0" * 4096)
    os.rename(os.path.join(d, f"{keys[1]}.lts"), os.path.join(d, "2" * 32 + ".lts"))  # name and key disagree
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        m = store.metrics()
        # keys[1] renamed, keys[4] truncated, two garbage files; keys[2], [3] and [5] lost their parent
        assert m.dropped_at_open == 7 and m.chunks == 1
        assert sorted(os.listdir(d)) == [f"{keys[0]}.lts"]
        assert store.lookup(model, ids[0].tolist()) == C


def test_capacity_evicts_least_recently_used_and_later_chunks_first(model, tmp_path):
    a, b = ids_of(64, seed=6), ids_of(64, seed=7)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        prefill_and_save(model, store, a)
        size = store.metrics().stored_bytes // 4
    with PrefixStore(tmp_path, chunk_tokens=C, capacity=6 * size) as store:
        prefill_and_save(model, store, b)  # 8 chunks into room for 6: a (older) loses its last two
        m = store.metrics()
        assert m.evictions == 2 and m.chunks == 6 and m.stored_bytes <= 6 * size
        assert store.lookup(model, a[0].tolist()) == 2 * C and store.lookup(model, b[0].tolist()) == 4 * C
        assert store.pin(model, a[0].tolist()) == 2
        c = ids_of(64, seed=8)
        prefill_and_save(model, store, c)  # b goes now: a is pinned
        assert store.lookup(model, a[0].tolist()) == 2 * C
        assert store.lookup(model, b[0].tolist()) == 0
        assert store.metrics().pinned == 2
    with PrefixStore(tmp_path, chunk_tokens=C, capacity=6 * size) as store:  # pins survive a restart
        assert store.metrics().pinned == 2
        assert store.unpin(model, a[0].tolist()) == 2 and store.metrics().pinned == 0


def test_admission_keeps_decode_kv_out_by_default(model, tmp_path):
    ids = ids_of(40, seed=9)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        cache = DynamicCache(config=model.config)
        out = generate(model, ids, cache, new=30)
        assert store.save(model, out.sequences, cache, prompt_tokens=40) == 2  # 40 prompt tokens: 2 whole chunks
    with PrefixStore(tmp_path / "all", chunk_tokens=C, admit="all") as store:
        cache = DynamicCache(config=model.config)
        out = generate(model, ids, cache, new=30)
        assert store.save(model, out.sequences, cache, prompt_tokens=40) == 4  # 69 tokens held: 4 whole chunks
    with pytest.raises(KVConfigError):
        PrefixStore(tmp_path, admit="sometimes")


def test_fetch_or_recompute_follows_the_measured_speeds(model, tmp_path):
    ids = ids_of(80, seed=10)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        prefill_and_save(model, store, ids)
        store.fetch(model, ids, DynamicCache(config=model.config))  # measures the load... (too small to count)
        store._m.load_gibps = 1e-6  # a disk of 1 KiB/s
        store.observe_prefill(model, 80, 0.01)
        assert store.fetch(model, ids, DynamicCache(config=model.config)) == 0
        assert store.metrics().recompute_chosen == 1
        assert store.fetch(model, ids, DynamicCache(config=model.config), force=True) == 79
        store._m.load_gibps = 100.0
        assert store.fetch(model, ids, DynamicCache(config=model.config)) == 79


def test_other_model_or_dtype_misses(model, tmp_path):
    ids = ids_of(50, seed=11)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        prefill_and_save(model, store, ids)
        assert model_identity(model.config, torch.bfloat16) != model_identity(model.config, torch.float32)
        other = transformers.AutoModelForCausalLM.from_config(model.config).to(torch.float32)
        assert store.lookup(other, ids[0].tolist()) == 0
        assert store.lookup(model, ids[0].tolist()) == 48


def test_dram_tier_serves_repeat_hits(model, tmp_path):
    ids = ids_of(70, seed=12)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        prefill_and_save(model, store, ids)
    with PrefixStore(tmp_path, chunk_tokens=C, memory="1MiB") as store:
        store.fetch(model, ids, DynamicCache(config=model.config))
        store.fetch(model, ids, DynamicCache(config=model.config))
        m = store.metrics()
        assert m.ssd_hits == 4 and m.dram_hits == 4 and m.dram_bytes == m.ssd_bytes


def test_writer_killed_mid_save_leaves_only_good_chunks(model, tmp_path):
    code = (
        "import torch, transformers\n"
        "from llmtier.offload.kv import PrefixStore\n"
        "from llmtier.offload.hfcompat import cache_kwargs\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({model.name_or_path!r}, dtype=torch.bfloat16)\n"
        f"s = PrefixStore({str(tmp_path)!r}, chunk_tokens={C})\n"
        "print('ready', flush=True)\n"
        "for seed in range(10000):\n"
        "    ids = torch.randint(1, 512, (1, 160), generator=torch.Generator().manual_seed(seed))\n"
        "    c = transformers.DynamicCache(config=m.config)\n"
        "    m(ids, **cache_kwargs(c, m), use_cache=True)\n"
        "    s.save(m, ids, c)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        deadline = time.time() + 60
        while len(chunk_files(tmp_path)) < 25 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        m = store.metrics()
        assert m.chunks >= 20
        leftovers = [n for n in os.listdir(os.path.join(tmp_path, "chunks")) if not n.endswith(".lts")]
        assert leftovers == []
        for seed in range(3):  # every indexed chunk loads and verifies
            ids = torch.randint(1, 512, (1, 160), generator=torch.Generator().manual_seed(seed))
            store.fetch(model, ids, DynamicCache(config=model.config), force=True)
        assert store.metrics().corrupt == 0


def test_another_chunk_size_is_refused_not_dropped(model, tmp_path):
    ids = ids_of(40, seed=13)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        prefill_and_save(model, store, ids)
    with pytest.raises(KVConfigError, match="chunks of 16 tokens"):
        PrefixStore(tmp_path, chunk_tokens=32)
    with PrefixStore(tmp_path, chunk_tokens=C) as store:
        assert store.metrics().chunks == 2
        with pytest.raises(KVConfigError, match="empty cache"):
            c = DynamicCache(config=model.config)
            store.fetch(model, ids, c)
            store.fetch(model, ids, c)
    (tmp_path / "store.json").write_text("{not json")
    with pytest.raises(KVConfigError, match="unreadable"):
        PrefixStore(tmp_path, chunk_tokens=C)
