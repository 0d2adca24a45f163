"""The KV tier on the model families of the matrix: sliding windows, chunked attention, MLA, refusals.

Each family is a tiny random-weight model (``bench.families``); the tier runs
with every layer spilled (``min_memory``) and with some layers resident, and
must give the tokens and the logits of transformers' ``DynamicCache``, bit for bit.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.families import LIMITS, installed, make_family_model  # noqa: E402
from llmtier.bench.kv import analytic_bytes  # noqa: E402
from llmtier.offload.hfcompat import cache_kwargs  # noqa: E402
from llmtier.offload.kv import KVConfigError, PrefixStore, TieredCache, min_memory  # noqa: E402
from llmtier.offload.kv.budget import resident_tokens  # noqa: E402
from llmtier.offload.kv.tiered import layer_windows  # noqa: E402

PAGE = 4  # small pages: a window of 8 tokens spans several, so pages leave it and are dropped
PROMPT, NEW = 30, 8
PARTLY = {"gemma2", "deepseek_v2", "llama4_text", "ministral"}  # also run with some layers resident

# family -> overrides on top of its tiny config (what makes the test exercise the point)
EXACT = {
    "mistral": {"sliding_window": 8}, "ministral": {}, "gemma2": {}, "gemma3_text": {}, "cohere2": {}, "exaone4": {},
    "gpt_oss": {}, "llama4_text": {"attention_chunk_size": 8}, "deepseek_v2": {},
    "deepseek_v3": {"head_dim": 8},  # rope over qk_rope_head_dim (the tiny config's head_dim 16 breaks the model itself)
    "llama": {},
}


def generate(model, ids, cache, new=NEW):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, output_logits=True, **cache_kwargs(cache),
                              return_dict_in_generate=True, pad_token_id=0)


def build(tmp_path, family, **overrides):
    if not installed(family):
        pytest.skip(f"this transformers ({transformers.__version__}) has no {family}")
    path = make_family_model(str(tmp_path / family), family, **overrides)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def least(model, ref, batch, tokens, page=PAGE):
    """``min_memory`` from the shapes the reference cache holds (K and V may differ: MLA)."""
    wins = [w for w in layer_windows(model.config) if w != 0]
    lay = next(lay for lay in ref.layers if getattr(lay, "keys", None) is not None)
    k, v = lay.keys, lay.values
    return min_memory(len(wins), batch, k.shape[1], k.shape[3], 2, tokens, page_tokens=page, v_heads=v.shape[1],
                      v_head_dim=v.shape[3], windows=wins)


@pytest.mark.parametrize("family", sorted(EXACT))
def test_family_bitwise_equal_to_dynamic_cache(family, tmp_path):
    if (family, "kv") in LIMITS:
        pytest.xfail(LIMITS[family, "kv"])
    model = build(tmp_path, family, **EXACT[family])
    ids = torch.randint(1, 512, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    ref = transformers.DynamicCache(config=model.config)
    want = generate(model, ids, ref)
    wins = [w for w in layer_windows(model.config) if w != 0]
    lay = ref.layers[0]
    if family.startswith("deepseek") and lay.keys.shape[-1] != lay.values.shape[-1]:
        # MLA: K and V head sizes differ (older transformers pad V to K's size in the cache: nothing to refuse)
        with PrefixStore(tmp_path / "store", chunk_tokens=16) as store, pytest.raises(KVConfigError, match="latent"):
            store.save(model, want.sequences, ref)  # the prefix store keeps one head size: refused
    low = least(model, ref, 2, PROMPT + NEW)
    lay = next(lay for lay in ref.layers if getattr(lay, "keys", None) is not None)
    tb = 2 * (lay.keys.shape[1] * lay.keys.shape[3] + lay.values.shape[1] * lay.values.shape[3]) * 2
    all_resident = sum(resident_tokens(PROMPT + NEW - 2, 1, w, PAGE) for w in wins) * tb
    spill = tmp_path / "spill"
    memories = (low, max(low, all_resident - 1)) if family in PARTLY else (low,)
    for memory in memories:  # every layer spilled; some resident (sliding ones move their window)
        with TieredCache(model.config, memory=memory, path=spill, page_tokens=PAGE, spill_all=memory == low) as cache:
            got = generate(model, ids, cache)
            st = cache.stats()
            assert cache.get_seq_length() == ref.get_seq_length()
            for i, lay in enumerate(cache.layers):
                if hasattr(lay, "window"):
                    assert lay.get_max_length() == ref.layers[i].get_max_length()
                    assert lay.get_mask_sizes(1) == ref.layers[i].get_mask_sizes(1)
        assert torch.equal(got.sequences, want.sequences), f"{family} memory {memory}: tokens differ"
        for step, (a, b) in enumerate(zip(got.logits, want.logits)):
            assert torch.equal(a, b), f"{family} memory {memory}: logits of step {step} differ"
        assert st.peak_dram_bytes <= memory
        if memory == low:
            assert st.spilled_layers == len(wins) and st.bytes_read > 0
            group = st.bytes_written // max(1, st.page_writes) if st.page_writes else 0
            reads, writes = analytic_bytes(PROMPT, NEW - 1, len(wins), PAGE, group, windows=wins)
            assert (st.bytes_read, st.bytes_written) == (reads, writes)
            if any(w is not None for w in wins):
                assert st.pages_dropped > 0
        else:
            assert st.spilled_layers >= 1


def test_sliding_layer_keeps_only_its_window(tmp_path):
    """Every layer sliding: the spill file holds the window, not the context; pages out of it are never read."""
    model = build(tmp_path, "ministral", sliding_window=12)
    ids = torch.randint(1, 512, (1, 100), generator=torch.Generator().manual_seed(2))
    ref = transformers.DynamicCache(config=model.config)
    want = generate(model, ids, ref, new=10)
    low = least(model, ref, 1, 110)
    full_ctx = min_memory(4, 1, 2, 16, 2, 110, page_tokens=PAGE)  # the same model with full attention
    with TieredCache(model.config, memory=low, path=tmp_path / "spill", page_tokens=PAGE, spill_all=True) as cache:
        got = generate(model, ids, cache, new=10)
        st = cache.stats()
        assert st.ssd_bytes <= 4 * (12 // PAGE + 2) * st.bytes_written // st.page_writes  # window pages per layer
        assert max(st.reads_by_page) >= 100 // PAGE - 1 and min(st.reads_by_page) >= 100 // PAGE - 12 // PAGE - 1
        with pytest.raises(KVConfigError, match="sliding"):
            cache.export(0, 0, 10)
        with pytest.raises(KVConfigError, match="window"):
            cache.crop(-100)
        with PrefixStore(tmp_path / "store", chunk_tokens=16) as store, pytest.raises(KVConfigError, match="sliding"):
            store.save(model, ids, cache)
        k, v = cache.export(0, 100, 109)
        assert torch.equal(k, ref.layers[0].keys[:, :, -9:]) and torch.equal(v, ref.layers[0].values[:, :, -9:])
    assert low < full_ctx and st.peak_dram_bytes <= low
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert torch.equal(a, b)


def test_use_cache_false_refused_with_a_hint(tmp_path):
    model = build(tmp_path, "mpt")
    assert model.config.use_cache is False
    with pytest.raises(KVConfigError, match="use_cache = True"):
        TieredCache(model.config, memory="64MiB", path=tmp_path)
    model.config.use_cache = model.generation_config.use_cache = True  # the hint, followed: then it is exact
    ids = torch.randint(1, 512, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    ref = transformers.DynamicCache(config=model.config)
    want = generate(model, ids, ref)
    with TieredCache(model.config, memory=least(model, ref, 1, PROMPT + NEW), path=tmp_path, page_tokens=PAGE,
                     spill_all=True) as c:
        got = generate(model, ids, c)
        assert c.stats().spilled_layers == model.config.n_layers
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["mamba", "qwen3_next"])
def test_recurrent_state_layers_refused(family, tmp_path):
    from llmtier.bench.families import family_config

    with pytest.raises(KVConfigError, match="linear_attention"):
        TieredCache(family_config(family), memory="64MiB", path=tmp_path)


def test_dummy_layers_hold_nothing(tmp_path):
    """A layer without KV (transformers' "dummy": MoE/MLP-only or KV-sharing) takes no storage."""
    try:
        from transformers.cache_utils import DummyLayer
    except ImportError:
        pytest.skip(f"this transformers ({transformers.__version__}) has no dummy cache layers")

    from llmtier.bench.families import family_config

    config = family_config("llama", layers=3)
    config.layer_types = ["full_attention", "dummy", "full_attention"]
    with TieredCache(config, memory="64MiB", path=tmp_path, page_tokens=PAGE) as cache:
        assert isinstance(cache.layers[1], DummyLayer)
        k = torch.randn(1, 2, 5, 16).to(torch.bfloat16)
        for i in (0, 2):
            a, _ = cache.update(k, k, i)
            assert torch.equal(a, k)
        assert cache.get_seq_length() == 5 and cache.stats().resident_layers == 2
    config.layer_types = ["dummy"] * 3
    with pytest.raises(KVConfigError, match="no attention layer"):
        TieredCache(config, memory="64MiB", path=tmp_path)
