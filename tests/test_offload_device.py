"""The GPU weight-streaming schedule (three tiers, slot rings, events), run on
its CPU stand-in; and the CUDA checks themselves, skipped without a GPU."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.hfmodels import make_model  # noqa: E402
from llmtier.engine.cuda import cuda_reason  # noqa: E402
from llmtier.errors import EngineUnavailableError, LLMTierError  # noqa: E402
from llmtier.offload import BudgetError, stream_model  # noqa: E402
from llmtier.offload.hfcompat import cache_kwargs  # noqa: E402
from llmtier.offload.layout import DEVICE_ALIGN, device_items, open_layout  # noqa: E402
from llmtier.offload.weights import bind_streamer  # noqa: E402

NO_CUDA = cuda_reason()
cuda = pytest.mark.skipif(bool(NO_CUDA), reason=f"needs a CUDA GPU: {NO_CUDA}")
LAYERS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("dev") / "llama"), "llama", layers=LAYERS, seed=3)


def prompt(batch=2, length=9):
    return torch.randint(1, 512, (batch, length), generator=torch.Generator().manual_seed(1))


def reference(path, device="cpu"):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()


def stand_in(path, resident, cached):
    """A GPU plan (GPU budget for ``resident`` layers, host budget caching
    ``cached`` of the streamed ones) bound on the CPU stand-in."""
    lay = open_layout(path)
    dev = [device_items(g)[1] for g in lay.groups]
    outside = device_items(lay.outside)[1]
    slot, hslot = max(dev), max(g.nbytes for g in lay.groups)
    gpu = outside + 2 * slot + resident * slot
    if cached == "all":
        host = 10 * sum(g.nbytes for g in lay.groups)
    else:
        host = None if cached is None else 2 * hslot + cached * hslot
    plan = lay.device_plan(gpu, host, prefetch=1)  # two slots a ring: the tightest schedule
    model = lay.model
    from llmtier.offload.weights import _streamed_class

    streamer = bind_streamer(lay, plan, "cpu")
    model.__class__ = _streamed_class(type(model))
    model.llmtier = streamer
    return model


def test_device_layout_aligns_every_tensor(model_dir):
    lay = open_layout(model_dir)
    try:
        for g in [lay.outside, *lay.groups]:
            items, size = device_items(g)
            assert all(dpos % DEVICE_ALIGN == 0 for _, _, _, dpos in items)
            assert size >= sum(t.nbytes for _, t, _, _ in items)
    finally:
        lay.source.close()


@pytest.mark.parametrize("resident,cached", [(0, None), (2, None), (1, 2), (0, "all"), (2, 1)])
def test_tiered_schedule_is_exact(model_dir, resident, cached):
    ref = reference(model_dir)
    ids = prompt()
    with torch.no_grad():
        want_logits = ref(ids).logits
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    with stand_in(model_dir, resident, cached) as model:
        plan = model.llmtier.plan
        assert plan.device == "cuda" and len(plan.resident) == resident
        if cached == "all":
            assert plan.cached == plan.streamed and not plan.from_disk and plan.host_slots == 0
        elif cached is None:
            assert not plan.cached and plan.from_disk == plan.streamed
        else:
            assert len(plan.cached) == cached and plan.host_slots >= 2
        with torch.no_grad():
            got_logits = model(ids).logits
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        assert torch.equal(got_logits, want_logits)
        assert torch.equal(got, want)
        s = model.llmtier.stats()
        passes = 1 + 5  # the logits, then prefill + 4 decode steps (the 5th token needs no pass)
        assert s.passes == passes
        assert s.bytes_read == passes * plan.disk_bytes_per_pass
        per_pass = sum(model.llmtier.groups[i].data_bytes for i in plan.streamed)
        assert s.copied_bytes == passes * per_pass
        assert s.cached_layers == len(plan.cached)


def test_out_of_order_layers_restart_the_cycle(model_dir):
    ref = reference(model_dir)
    ids = prompt(1)
    with torch.no_grad():
        want = ref(ids).logits
    with stand_in(model_dir, 1, 1) as model, torch.no_grad():
        with pytest.raises(RuntimeError):
            model(ids, position_ids=torch.zeros(1, 99, dtype=torch.long))  # a pass cut short mid-way
        assert torch.equal(model(ids).logits, want)


def test_host_budget_below_two_slots_is_refused(model_dir):
    lay = open_layout(model_dir)
    try:
        with pytest.raises(BudgetError, match="host memory budget"):
            lay.device_plan(device_items(lay.outside)[1] + 3 * max(device_items(g)[1] for g in lay.groups), 4096)
    finally:
        lay.source.close()


def test_cuda_refused_clearly_without_a_gpu(model_dir):
    if not NO_CUDA:
        pytest.skip("a GPU is here")
    with pytest.raises(EngineUnavailableError, match="needs a CUDA GPU"):
        stream_model(model_dir, "1GiB", device="cuda")
    with pytest.raises(LLMTierError, match="host_memory"):
        stream_model(model_dir, "1GiB", host_memory="1GiB")
    with pytest.raises(LLMTierError, match="CPU or to a CUDA GPU"):
        stream_model(model_dir, "1GiB", device="mps")


@cuda
@pytest.mark.parametrize("resident,host", [(0, None), (2, "1GiB"), (1, None)])
def test_cuda_logits_bitwise_equal_to_the_model_in_gpu_memory(model_dir, resident, host):
    ref = reference(model_dir, "cuda")
    ids = prompt().cuda()
    with torch.no_grad():
        want_logits = ref(ids).logits
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    lay = open_layout(model_dir)
    slot = max(device_items(g)[1] for g in lay.groups)
    gpu = device_items(lay.outside)[1] + (3 + resident) * slot + lay.embedding_bytes
    lay.source.close()
    with stream_model(model_dir, gpu, device="cuda", host_memory=host) as model, torch.no_grad():
        assert model.device.type == "cuda"
        got_logits = model(ids).logits
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(got_logits, want_logits)
    assert torch.equal(got, want)


@cuda
@pytest.mark.parametrize("share", [1.0, 0.3, 0.0])
def test_cuda_kv_tier_matches_dynamic_cache(model_dir, tmp_path, share):
    from llmtier.offload.kv import TieredCache, min_memory

    ref = reference(model_dir, "cuda")
    ids = prompt(3, 40).cuda()
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24, do_sample=False,
              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        want = ref.generate(ids, **cache_kwargs(transformers.DynamicCache(config=ref.config)), **kw)
    c = ref.config
    least = min_memory(c.num_hidden_layers, 3, c.num_key_value_heads, c.head_dim, 2, 64, page_tokens=16)
    full = 2 * c.num_key_value_heads * c.head_dim * 2 * 3 * 64 * c.num_hidden_layers
    memory = max(least, int(full * share)) if share < 1 else 4 * full
    with TieredCache(ref.config, memory=memory, path=tmp_path, page_tokens=16) as cache, torch.no_grad():
        got = ref.generate(ids, **cache_kwargs(cache), **kw)
        s = cache.stats()
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    assert (s.spilled_layers > 0) == (share < 1)
    assert s.device_bytes > 0


def test_damaged_disk_layer_is_refused_when_reached_and_the_rest_still_works(model_dir, tmp_path):
    from llmtier.errors import ChecksumError
    from llmtier.store.convert import convert

    store = str(tmp_path / "m.lts")
    convert(model_dir, store, progress=False)
    lay = open_layout(store)
    t = lay.groups[LAYERS - 1].items[0][1]  # a layer the plan streams from the disk
    lay.source.close()
    with open(store, "r+b") as f:
        f.seek(t.offset + 7)
        b = f.read(1)
        f.seek(t.offset + 7)
        f.write(bytes([b[0] ^ 0xFF]))
    with stand_in(store, 0, None) as model, torch.no_grad():
        assert LAYERS - 1 in model.llmtier.plan.from_disk
        with pytest.raises(ChecksumError):
            model(prompt(1))
        with pytest.raises(ChecksumError):  # checked again: a damaged layer never computes
            model(prompt(1))
