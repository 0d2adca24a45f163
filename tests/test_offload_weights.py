"""Weight streaming: exact outputs against the in-memory model, plans, errors."""
from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.hfmodels import ARCHS, make_model  # noqa: E402
from llmtier.errors import ChecksumError, LLMTierError  # noqa: E402
from llmtier.offload import BudgetError, stream_model  # noqa: E402
from llmtier.offload.hf import ModelLayoutError  # noqa: E402
from llmtier.offload.weights import MAX_SLOTS, make_plan, open_layout, spread  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {a: make_model(str(root / a), a, layers=5, seed=i) for i, a in enumerate(ARCHS)}


def reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def budget(path, resident_layers):
    lay = open_layout(path)
    try:
        return lay.least_memory + resident_layers * max(g.nbytes for g in lay.groups)
    finally:
        lay.source.close()


def prompt(batch, length=10, vocab=512, seed=0):
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_exact_logits_and_greedy_tokens(models, arch, batch):
    path = models[arch]
    ref = reference(path)
    ids = prompt(batch)
    with torch.no_grad():
        want_logits = ref(ids).logits
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    for resident, prefetch in ((0, 1), (2, 1), (None, None)):  # None: the depth and resident set it picks
        with stream_model(path, budget(path, 2 if resident is None else resident), prefetch=prefetch) as model:
            plan = model.llmtier.plan
            if resident is not None:
                assert len(plan.resident) == resident and len(plan.streamed) == 5 - resident
            else:
                assert plan.slots > 2 and plan.streamed  # tiny layers: a deeper read-ahead
            with torch.no_grad():
                got_logits = model(ids).logits
                got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
            assert torch.equal(got_logits, want_logits), f"{arch} batch {batch}: logits differ"
            assert torch.equal(got, want), f"{arch} batch {batch}: tokens differ"
            s = model.llmtier.stats()
            # one pass for the logits, then prefill + 5 decode steps
            assert s.passes == 7
            assert s.bytes_read == 7 * plan.streamed_bytes_per_pass
            assert isinstance(model, type(ref))


def test_sampling_matches_with_the_same_seed(models):
    path = models["llama"]
    ref = reference(path)
    ids = prompt(2)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=True, top_k=50, temperature=0.9)
    torch.manual_seed(7)
    want = ref.generate(ids, **kw)
    with stream_model(path, budget(path, 1)) as model:
        torch.manual_seed(7)
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)


def test_everything_fits_streams_nothing(models):
    path = models["qwen2"]
    with stream_model(path, "1GiB") as model:
        assert model.llmtier.plan.streamed == []
        with torch.no_grad():
            assert torch.equal(model(prompt(1)).logits, reference(path)(prompt(1)).logits)
        assert model.llmtier.stats().bytes_read == 0


def test_budget_too_small_is_a_clear_error(models):
    path = models["llama"]
    with pytest.raises(BudgetError, match="below the least"):
        stream_model(path, budget(path, 0) - 1)
    with pytest.raises(BudgetError, match="below the least"):
        stream_model(path, budget(path, 1), prefetch=3)


def test_out_of_order_layers_and_a_failing_forward(models):
    path = models["llama"]
    ref = reference(path)
    ids = prompt(1)
    with stream_model(path, budget(path, 0)) as model:
        with torch.no_grad():
            with pytest.raises(Exception):  # noqa: B017 - any failure inside the model
                model(torch.full((1, 4), 10_000))  # token ids beyond the vocabulary
            # the next call starts a fresh pass and is still exact
            assert torch.equal(model(ids).logits, ref(ids).logits)
            # a layer run by hand, out of turn
            layer = model.model.layers[3]
            h = torch.randn(1, 4, 64, dtype=torch.bfloat16)
            pos = model.model.rotary_emb(h, torch.arange(4)[None])
            out = layer(h, attention_mask=None, position_embeddings=pos)
            want = ref.model.layers[3](h, attention_mask=None, position_embeddings=pos)
            first = lambda x: x[0] if isinstance(x, tuple) else x  # noqa: E731
            assert torch.equal(first(out), first(want))
            assert torch.equal(model(ids).logits, ref(ids).logits)


def test_generate_logits_bitwise_at_batch_8(tmp_path):
    # generate() slices the last position before the head: a strided input, the case where
    # torch's matmul path depends on requires_grad (a head wide enough to round differently)
    path = make_model(str(tmp_path / "wide"), "qwen2", layers=1, vocab=4096, hidden_size=2048, intermediate_size=256,
                      num_attention_heads=16, num_key_value_heads=2, tokenizer=False)
    ref = reference(path)
    ids = prompt(8, vocab=4096)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    want = ref.generate(ids, **kw).logits
    with stream_model(path, budget(path, 1), prefetch=1) as model:
        got = model.generate(ids, **kw).logits
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_bookkeeping_is_timed_between_forwards_and_leaves_the_model_exact(models):
    path = models["llama"]
    ref = reference(path)
    ids = prompt(1)
    with stream_model(path, budget(path, 0)) as model, torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        spent = model.llmtier.bookkeeping_s(rounds=3)
        assert 0.0 < spent < 1.0  # seconds of CPU per streamed layer, the disk's time left out
        assert torch.equal(model(ids).logits, ref(ids).logits)  # the read-ahead was restored
        layer = model.model.layers[model.llmtier.plan.streamed[0]]
        hook = layer.register_forward_pre_hook(lambda m, a: model.llmtier.bookkeeping_s())
        with pytest.raises(LLMTierError, match="between forwards"):
            model(ids)
        hook.remove()


def test_grad_mode_is_refused(models):
    path = models["llama"]
    with stream_model(path, budget(path, 1), prefetch=1) as model:
        with pytest.raises(LLMTierError, match="no_grad"):
            model(prompt(1))
        with torch.inference_mode():
            model(prompt(1))


def test_close_releases_everything(models):
    path = models["llama"]
    model = stream_model(path, budget(path, 1))
    model.close()
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(LLMTierError, match="closed"), torch.no_grad():
        model(prompt(1))
    model.close()  # idempotent


def test_store_made_by_convert_streams_and_verifies(models, tmp_path):
    from llmtier.store.convert import convert

    path = models["opt"]
    store = str(tmp_path / "opt.lts")
    convert(path, store, progress=False)
    ids = prompt(2)
    with stream_model(store, budget(store, 1)) as model, torch.no_grad():
        assert torch.equal(model(ids).logits, reference(path)(ids).logits)
    # damage one byte of a streamed layer: the first read of it says so
    lay = open_layout(store)
    g = lay.groups[0]
    lay.source.close()
    t = g.items[0][1]
    with open(store, "r+b") as f:
        f.seek(t.offset + 5)
        b = f.read(1)
        f.seek(t.offset + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    with stream_model(store, budget(store, 0)) as model, torch.no_grad(), pytest.raises(ChecksumError):
        model(ids)
    with stream_model(store, budget(store, 0), verify="never") as model, torch.no_grad():
        model(ids)  # not checked: runs (on damaged weights)


def test_truncated_checkpoint_is_a_clear_error(models, tmp_path):
    import shutil

    path = str(tmp_path / "cut")
    shutil.copytree(models["llama"], path)
    lay = open_layout(path)
    least = lay.least_memory
    lay.source.close()
    with stream_model(path, least) as model:  # opened whole; cut while in use
        st = os.path.join(path, "model.safetensors")
        os.truncate(st, os.path.getsize(st) // 2)
        with pytest.raises(LLMTierError), torch.no_grad():
            for _ in range(3):
                model(prompt(1))


def test_missing_tensor_is_named(models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path = str(tmp_path / "missing")
    shutil.copytree(models["llama"], path)
    st = os.path.join(path, "model.safetensors")
    tensors = load_file(st)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(ModelLayoutError, match="no tensor in the checkpoint"):
        stream_model(path, "1GiB")


def test_plan_spreads_resident_layers():
    assert spread(2, 8) == [2, 6]
    assert spread(0, 8) == []
    assert spread(8, 8) == list(range(8))
    p = make_plan(100 + 2 * 10 + 3 * 10 + 5, 100, [10] * 8, 10, inflight_bytes=10)
    assert p.resident == spread(3, 8) and p.slots == 2
    # small layers: enough slots to keep inflight_bytes reading, within the budget and MAX_SLOTS
    p = make_plan(100 + 5 * 10 + 5, 100, [10] * 8, 10, inflight_bytes=30)
    assert p.slots == 4 and len(p.resident) == 1
    p = make_plan(100 + 3 * 10, 100, [10] * 8, 10, inflight_bytes=1000)
    assert p.slots == 3 and p.resident == []
    p = make_plan(1_000, 100, [10] * 800, 10, inflight_bytes=1000)
    assert p.slots == MAX_SLOTS
    assert p.memory_bytes <= p.budget
    # an explicit prefetch depth takes its slots before resident layers
    p = make_plan(100 + 2 * 10 + 4 * 10 + 5, 100, [10] * 8, 10, prefetch=3)
    assert p.slots == 4 and len(p.resident) == 2
    with pytest.raises(BudgetError):
        make_plan(119, 100, [10] * 8, 10)


def test_untied_embedding_is_read_by_rows(models, tmp_path):
    path = models["llama"]  # untied: the table is read row by row
    ref = reference(path)
    ids = torch.tensor([[5, 9, 5, 200], [9, 9, 1, 0]])
    with stream_model(path, budget(path, 1), prefetch=1) as model:
        plan = model.llmtier.plan
        emb = model.get_input_embeddings()
        assert plan.on_demand_bytes == emb.weight.numel() * 2 and "rows of its tokens" in plan.describe()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
        assert model.llmtier.stats().embedding_bytes_read == 5 * 64 * 2  # 5 distinct ids, 64 bf16 each
        assert emb.padding_idx == ref.get_input_embeddings().padding_idx
        # between passes: a stand-in on the compute device holding one element, not the table
        assert emb.weight.device.type == "cpu" and emb.weight.untyped_storage().nbytes() == 2
        assert emb.weight.shape == ref.get_input_embeddings().weight.shape
        with torch.no_grad(), pytest.raises(IndexError):
            model(torch.tensor([[512]]))
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
    assert emb.padding_idx == ref.get_input_embeddings().padding_idx  # restored by close()
    assert emb.weight.device.type == "meta"  # and the placeholder too
    with stream_model(models["qwen2"], budget(models["qwen2"], 1), prefetch=1) as model:
        assert model.llmtier.plan.on_demand_bytes == 0  # tied to the head: held
    with stream_model(path, "1GiB") as model:
        assert model.llmtier.plan.on_demand_bytes == 0  # all fits: held
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)


def test_damaged_embedding_table_is_caught_at_open(models, tmp_path):
    from llmtier.store.convert import convert

    store = str(tmp_path / "llama.lts")
    convert(models["llama"], store, progress=False)
    lay = open_layout(store)
    t = lay.embedding[1]
    lay.source.close()
    with open(store, "r+b") as f:
        f.seek(t.offset + t.nbytes - 3)
        b = f.read(1)
        f.seek(t.offset + t.nbytes - 3)
        f.write(bytes([b[0] ^ 0x55]))
    with pytest.raises(ChecksumError, match="embed"):
        stream_model(store, budget(store, 0), prefetch=1)
