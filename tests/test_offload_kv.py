"""The KV tier: TieredCache against DynamicCache, byte counts, budgets, spill files; errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.hfmodels import ARCHS, make_model  # noqa: E402
from llmtier.bench.kv import analytic_bytes  # noqa: E402
from llmtier.offload import BudgetError, stream_model  # noqa: E402
from llmtier.offload.hfcompat import cache_kwargs  # noqa: E402
from llmtier.offload.kv import KVConfigError, TieredCache, min_memory, spill_order  # noqa: E402
from llmtier.offload.kv.spill import remove_stale  # noqa: E402
from llmtier.offload.kv.tiered import layer_windows  # noqa: E402
from llmtier.offload.weights import open_layout  # noqa: E402

DynamicCache = transformers.DynamicCache
PAGE = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kvmodels")
    return {a: make_model(str(root / a), a, layers=6, seed=i, tokenizer=False) for i, a in enumerate(ARCHS)}


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def geometry(model):
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, heads, head_dim


def least(model, batch, tokens, prefetch=2):
    layers, heads, head_dim = geometry(model)
    windows = layer_windows(model.config)
    return min_memory(layers, batch, heads, head_dim, 2, tokens, page_tokens=PAGE, prefetch=prefetch, windows=windows)


def kv_bytes(model, batch, tokens):
    layers, heads, head_dim = geometry(model)
    return 2 * heads * head_dim * 2 * batch * tokens * layers


def generate(model, ids, cache, new=12):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, **cache_kwargs(cache), output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)


def prompt(batch, length, seed=0):
    return torch.randint(1, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tokens_and_logits_match_dynamic_cache(models, arch, batch, tmp_path):
    model = load(models[arch])
    ids = prompt(batch, 70)
    want = generate(model, ids, DynamicCache(config=model.config))
    low = least(model, batch, 82)
    # all resident; every layer spilled (at this short context the whole cache costs less DRAM than the
    # staging of a spilled one, so only spill_all puts layers on SSD; the mix of resident and spilled layers
    # is exercised by test_export_and_crop_agree_with_dynamic_cache and test_offload_kv_families)
    for memory in (1 << 30, low):
        with TieredCache(model.config, memory=memory, path=tmp_path, page_tokens=PAGE, spill_all=memory == low) as cache:
            got = generate(model, ids, cache)
            st = cache.stats()
        assert torch.equal(got.sequences, want.sequences), f"{arch} b{batch} memory {memory}: tokens differ"
        for a, b in zip(got.logits, want.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-2)  # bf16: equal in practice, a rounding step allowed
        if memory == low:
            assert st.spilled_layers == model.config.num_hidden_layers and st.bytes_read > 0
        if memory == 1 << 30:
            assert st.spilled_layers == 0 and st.bytes_read == 0 and st.bytes_written == 0
        assert st.peak_dram_bytes <= memory


def test_bytes_match_the_analytic_count(models, tmp_path):
    model = load(models["llama"])
    context, new = 200, 20  # long enough that every layer spills at the prefill already
    ids = prompt(2, context)
    with TieredCache(model.config, memory=least(model, 2, context + new), path=tmp_path, page_tokens=PAGE) as cache:
        generate(model, ids, cache, new=new)
        st = cache.stats()
    layers, heads, head_dim = geometry(model)
    assert st.spilled_layers == layers
    group = 2 * heads * head_dim * 2 * 2 * PAGE
    # the prefill reads nothing (no past); each of the new - 1 decode forwards reads every full page
    reads, writes = analytic_bytes(context, new - 1, layers, PAGE, group)
    assert st.bytes_read == reads and st.bytes_written == writes
    assert st.discarded_bytes <= 2 * (context + new) // PAGE * group  # the read-ahead of a pass that never came
    pages = st.reads_by_page
    assert pages[0] == (new - 1) * layers and pages[max(pages)] < pages[0]  # older pages are read more often


def test_budget_too_small_is_a_clear_error(models, tmp_path):
    model = load(models["llama"])
    ids = prompt(2, 64)
    with TieredCache(model.config, memory=least(model, 2, 64) - 1, path=tmp_path, page_tokens=PAGE) as cache:
        with pytest.raises(BudgetError, match="even with every layer on SSD"):
            generate(model, ids, cache)
    with pytest.raises(KVConfigError):
        TieredCache(model.config, memory=0, path=tmp_path)
    with pytest.raises(KVConfigError):
        TieredCache(model.config, memory="1GiB", path=tmp_path, page_tokens=0)


def test_spill_file_removed_on_close_and_stale_ones_cleaned(models, tmp_path):
    model = load(models["llama"])
    stale = tmp_path / ".llmtier-kv-999999999-deadbeef.spill"  # a PID that cannot be running
    stale.write_bytes(b"x" * 100)
    other = tmp_path / "keep.spill"
    other.write_bytes(b"y")
    with TieredCache(model.config, memory=least(model, 1, 210), path=tmp_path, page_tokens=PAGE, spill_all=True) as cache:
        assert not stale.exists() and other.exists()
        generate(model, prompt(1, 200), cache, new=4)
        assert len([p for p in os.listdir(tmp_path) if p.endswith(".spill") and p.startswith(".")]) == 1
    assert [p for p in os.listdir(tmp_path) if p.startswith(".llmtier-kv")] == []
    assert remove_stale(str(tmp_path)) == []
    with pytest.raises(KVConfigError, match="closed"):
        cache.update(torch.zeros(1, 2, 1, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 1, 16, dtype=torch.bfloat16), 0)


def test_export_and_crop_agree_with_dynamic_cache(models, tmp_path):
    model = load(models["llama"])
    ids = prompt(2, 300)
    ref = DynamicCache(config=model.config)
    generate(model, ids, ref, new=9)
    two_layers = 2 * kv_bytes(model, 2, 320) // model.config.num_hidden_layers
    with TieredCache(model.config, memory=least(model, 2, 320) + two_layers, path=tmp_path, page_tokens=PAGE) as cache:
        generate(model, ids, cache, new=9)
        st = cache.stats()
        assert 0 < st.spilled_layers < model.config.num_hidden_layers  # both kinds of layer are exercised
        n = ref.get_seq_length()
        assert cache.get_seq_length() == n
        for layer in range(model.config.num_hidden_layers):
            k, v = cache.export(layer, 5, n)
            assert torch.equal(k, ref.layers[layer].keys[:, :, 5:n]) and torch.equal(v, ref.layers[layer].values[:, :, 5:n])
        cache.crop(-20)  # back into a page that was written: it comes back as the tail
        ref.crop(-20)
        assert cache.get_seq_length() == n - 20
        more = torch.randint(1, 512, (2, 3), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            a = model(more, **cache_kwargs(cache, model), use_cache=True).logits
            b = model(more, **cache_kwargs(ref, model), use_cache=True).logits
        assert torch.equal(a, b)
        with pytest.raises(KVConfigError):
            cache.export(0, 0, n + 100)


def test_beam_search_and_gpu_refused(models, tmp_path):
    model = load(models["llama"])
    ids = prompt(1, 20)
    with TieredCache(model.config, memory="64MiB", path=tmp_path, page_tokens=PAGE) as cache:
        with pytest.raises(KVConfigError, match="beam search"), torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, num_beams=2,
                           do_sample=False, **cache_kwargs(cache), pad_token_id=0)
    with TieredCache(model.config, memory="64MiB", path=tmp_path, page_tokens=PAGE) as cache:
        with pytest.raises(KVConfigError, match="shape"):
            cache.update(torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16), torch.zeros(1, 2, 3, 16, dtype=torch.bfloat16), 0)
            cache.update(torch.zeros(2, 2, 3, 16, dtype=torch.bfloat16), torch.zeros(2, 2, 3, 16, dtype=torch.bfloat16), 0)


def test_with_weight_streaming(models, tmp_path):
    path = models["llama"]
    ref = load(path)
    ids = prompt(2, 60)
    want = generate(ref, ids, DynamicCache(config=ref.config))
    lay = open_layout(path)
    least_weights = lay.least_memory
    lay.source.close()
    with stream_model(path, least_weights) as model:
        assert model.llmtier.plan.streamed
        with TieredCache(model.config, memory=least(ref, 2, 72), path=tmp_path, page_tokens=PAGE) as cache:
            got = generate(model, ids, cache)
            assert cache.stats().bytes_read > 0 and model.llmtier.stats().bytes_read > 0
    assert torch.equal(got.sequences, want.sequences)


def test_spill_order_spreads_layers():
    for n in (1, 2, 5, 22, 40):
        order = spill_order(n)
        assert sorted(order) == list(range(n))
    assert spill_order(22)[:4] == [0, 11, 5, 16]


def test_killed_process_leaves_no_spill_file_behind_after_next_open(models, tmp_path):
    memory = least(load(models["llama"]), 2, 300)
    code = (
        "import sys, torch, transformers, time\n"
        "from llmtier.offload.kv import TieredCache\n"
        "from llmtier.offload.hfcompat import cache_kwargs\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({models['llama']!r}, dtype=torch.bfloat16)\n"
        f"c = TieredCache(m.config, memory={memory}, path={str(tmp_path)!r}, page_tokens=16)\n"
        "m(torch.randint(1, 500, (2, 300)), **cache_kwargs(c, m), use_cache=True)\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert any(n.startswith(".llmtier-kv") for n in os.listdir(tmp_path))
    finally:
        p.kill()
        p.wait()
    removed = remove_stale(str(tmp_path))
    assert len(removed) == 1 and not any(n.startswith(".llmtier-kv") for n in os.listdir(tmp_path))


def test_reset_starts_over_with_another_batch(models, tmp_path):
    model = load(models["llama"])
    memory = max(least(model, 2, 410), least(model, 3, 210))
    with TieredCache(model.config, memory=memory, path=tmp_path, page_tokens=PAGE) as cache:
        generate(model, prompt(2, 400), cache, new=4)
        written = cache.stats().bytes_written
        assert written > 0 and cache.stats().spilled_layers > 0
        cache.reset()
        assert cache.get_seq_length() == 0
        assert [p for p in os.listdir(tmp_path) if p.startswith(".llmtier-kv")] == []
        ids = prompt(3, 200, seed=4)
        want = generate(model, ids, DynamicCache(config=model.config), new=4)
        got = generate(model, ids, cache, new=4)
        assert torch.equal(got.sequences, want.sequences)
        assert cache.stats().bytes_written > written  # counters run on across the reset
