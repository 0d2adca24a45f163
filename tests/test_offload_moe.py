"""Expert-granular streaming of MoE models: bitwise equal to the in-memory
model for Mixtral-, Qwen3-MoE- and DeepSeek-V3-shaped models with every
cache policy and with prediction on and off; bytes read equal the analytic
count; the cache and its policies."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.families import make_family_model  # noqa: E402
from llmtier.offload import stream_model  # noqa: E402
from llmtier.offload.experts import (  # noqa: E402
    LFU,
    PROFILE_NAME,
    ExpertCache,
    ExpertError,
    ExpertProfile,
    Policy,
    ProfilePolicy,
)

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3")
IDS = torch.randint(1, 500, (2, 7), generator=torch.Generator().manual_seed(0))


def generate(model, ids=IDS):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """A tiny MoE model, its reference output and an expert profile saved beside it."""
    path = make_family_model(str(tmp_path_factory.mktemp(request.param) / "m"), request.param)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    want = generate(ref)
    with stream_model(path, "70%", experts="lru", predict=False) as model:
        generate(model, IDS[:1, :4])
        model.llmtier.profile().save(path)
    return request.param, path, want


@pytest.mark.parametrize("predict", [False, True, "auto"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "profile"])
def test_experts_stream_exactly(family, policy, predict):
    name, path, want = family
    with stream_model(path, "70%", experts=policy, predict=predict) as model:
        got = generate(model)
        s = model.llmtier.stats()
        assert_evicted_pages_released(model.llmtier)
    assert torch.equal(got.sequences, want.sequences), f"{name}: tokens differ"
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert torch.equal(a, b), f"{name} {policy}: logits differ at step {step}"
    assert s.policy == policy and s.expert_misses > 0 and s.tokens == 2 * 7 + 2 * 5 and s.expert_layout == "slots"
    assert s.expert_overlap, model.llmtier.place.why_not_overlap
    assert s.expert_cache_used <= s.expert_cache_bytes
    # every byte read is a routed expert that was missing, a wrong guess, or a streamed dense layer
    assert s.total_bytes_read - s.expert_bytes_read + s.expert_payload_read == s.analytic_bytes + s.prefetch_wasted_bytes
    assert s.expert_bytes_read >= s.expert_payload_read
    if predict:
        assert s.predicted > 0 and 0 < s.prediction_recall <= 1 and 0 < s.prediction_precision <= 1
        assert s.prefetch_paused == 0 or predict == "auto"
    else:
        assert s.prefetch_bytes == 0 and s.expert_payload_read == s.active_missing_bytes
    # evicted experts' slots went to the experts read in their place
    assert s.expert_reads > len(model.llmtier.cache.resident)
    assert s.expert_bytes_released + s.expert_bytes_recycled > 0


def assert_evicted_pages_released(streamer):
    """Slots: the resident experts and only they hold a slot each, within the cache's bytes.  Rows: every whole
    page of an expert outside the cache was given back (reads zero, as fresh pages do)."""
    from llmtier.engine.buffers import PAGE

    place = streamer.place
    if place.kind == "slots":
        assert set(place.slot) == set(streamer.cache.resident)
        assert len(set(place.slot.values())) == len(place.slot) <= place.nslots
        assert place.nslots * streamer.moe[0].expert_bytes <= streamer.cache.capacity
        for i, m in enumerate(streamer.moe):
            assert place.maps[i].tolist() == [place.slot.get((m.layer, e), -1) for e in range(m.num_experts)]
        return
    for i, m in enumerate(streamer.moe):
        for buf, row in zip(place.bufs[i], m.row_bytes):
            for e in range(m.num_experts):
                a, b = -(-(e * row) // PAGE) * PAGE, (e + 1) * row // PAGE * PAGE
                if (m.layer, e) not in streamer.cache and b > a:
                    assert not buf[a:b].any(), f"layer {m.layer} expert {e}: evicted, yet its pages hold data"


def with_experts_implementation(path, impl):
    """The checkpoint's config.json asks transformers for ``impl`` (the in-memory model and ours both follow it)."""
    import json
    import os

    cfg = os.path.join(path, "config.json")
    with open(cfg) as f:
        doc = json.load(f)
    doc["experts_implementation"] = impl
    with open(cfg, "w") as f:
        json.dump(doc, f)
    return path


def stream_with_implementation(path, impl, predict):
    """Stream the model at ``path`` with transformers' ``impl`` experts; bitwise against the in-memory model
    with the same implementation; returns the streamer's stats."""
    with_experts_implementation(path, impl)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    want = generate(ref)
    with stream_model(path, "70%", experts="lru", predict=predict) as model:
        got = generate(model)
        s = model.llmtier.stats()
        assert_evicted_pages_released(model.llmtier)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    assert s.expert_misses > 0
    return s


@pytest.mark.parametrize("predict", [False, "auto"])
@pytest.mark.parametrize("name", FAMILIES)
def test_expert_rows_stream_exactly(name, predict, tmp_path):
    """transformers' ``eager`` experts add expert outputs in expert order, so the slot pool (which renumbers
    experts) would not be exact: the experts stay at their own rows, and the output is still bit for bit."""
    s = stream_with_implementation(make_family_model(str(tmp_path / name), name), "eager", predict)
    assert s.expert_layout == "rows" and s.expert_bytes_released + s.expert_bytes_recycled > 0


def test_batched_mm_experts_stream_exactly_in_slots(tmp_path):
    """``batched_mm`` computes each (token, expert) pair apart and sums the top-k in the router's order: slots
    are exact with it too (transformers' own forward on the pool, each layer waiting for its experts first)."""
    s = stream_with_implementation(make_family_model(str(tmp_path / "q"), "qwen3_moe"), "batched_mm", True)
    assert s.expert_layout == "slots" and not s.expert_overlap


def test_expert_slots_refuse_a_changed_implementation(tmp_path):
    path = make_family_model(str(tmp_path / "q"), "qwen3_moe")
    with stream_model(path, "70%", experts="lru", predict=False) as model:
        assert model.llmtier.stats().expert_layout == "slots"
        model.config._experts_implementation = "eager"
        with pytest.raises(ExpertError, match="became 'eager'"):
            generate(model)
    # closed: the experts modules have their own forward back
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_tight_budget_streams_dense_layers(family):
    """At the least budget the dense layers stream too; still exact."""
    _name, path, want = family
    from llmtier.offload.experts import find_experts, split_budget_for_experts
    from llmtier.offload.layout import open_layout

    lay = open_layout(path)
    try:
        moe, dense = find_experts(lay)
        least = max(m.num_experts * m.expert_bytes + m.top_k * m.expert_bytes for m in moe)
        outside = lay.outside.nbytes + lay.embedding_bytes
        budget = outside + 2 * max(g.nbytes for g in dense) + least
        eplan = split_budget_for_experts(budget, outside, [g.nbytes for g in dense], moe)
        assert eplan.dense.streamed and eplan.cache_bytes >= least
    finally:
        lay.source.close()
    with stream_model(path, budget, experts="lru") as model:
        got = generate(model)
        assert model.llmtier.stats().bytes_read > 0
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))


def test_everything_fits_reads_each_expert_once(family):
    _name, path, _want = family
    with stream_model(path, "100%", experts="lfu", predict=False) as model:
        generate(model)
        s = model.llmtier.stats()
    assert s.expert_reads == len({k for k in model.llmtier.cache.resident})
    assert s.expert_misses == s.expert_reads and s.bytes_read == 0


def test_dense_model_and_bad_policy_refused(tmp_path):
    path = make_family_model(str(tmp_path / "llama"), "llama", layers=2)
    with pytest.raises(ExpertError, match="no routed experts"):
        stream_model(path, "50%", experts="lru")
    moe = make_family_model(str(tmp_path / "mix"), "mixtral", layers=2)
    with pytest.raises(ExpertError, match="unknown expert cache policy"):
        stream_model(moe, "90%", experts="fifo")
    with pytest.raises(ExpertError, match="no expert profile"):
        stream_model(moe, "90%", experts="profile")


def test_policies_choose_victims():
    lru = Policy()
    for k in [(0, 0), (0, 1), (0, 2), (0, 0)]:
        lru.touch(k)
    assert lru.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)
    lfu = LFU()
    for k in [(0, 0), (0, 0), (0, 1), (0, 2), (0, 2), (0, 1), (0, 1)]:
        lfu.touch(k)
    assert lfu.victim([(0, 0), (0, 1), (0, 2)]) == (0, 0)  # 2 uses, older than (0, 2)'s
    prof = ProfilePolicy({(0, 0)})
    for k in [(0, 0), (0, 1)]:
        prof.touch(k)
    assert prof.victim([(0, 0), (0, 1)]) == (0, 1)
    assert prof.victim([(0, 0)]) == (0, 0)


def test_cache_takes_room_from_layers_over_quota():
    cache = ExpertCache(4, Policy(), quota={0: 2, 1: 2})
    for k in [(0, 0), (0, 1), (0, 2), (1, 0)]:
        cache.add(k, 1)
        cache.policy.touch(k)
    assert cache.victims(1, keep=set(), layer=1) == [(0, 0)]  # layer 0 holds 3 of its 2
    cache.remove((0, 0))
    cache.add((1, 1), 1)
    cache.policy.touch((1, 1))
    assert cache.victims(1, keep=set(), layer=1) == [(1, 0)]  # nobody over: the asking layer's own LRU
    assert cache.victims(1, keep={(0, 1), (0, 2), (1, 0), (1, 1)}, layer=1) is None


def test_profile_round_trip(tmp_path):
    p = ExpertProfile({0: [5, 1, 0, 9], 2: [3, 3, 3, 3]}, tokens=7)
    where = p.save(tmp_path)
    assert where.endswith(PROFILE_NAME)
    q = ExpertProfile.load(tmp_path)
    assert q.counts == p.counts and q.tokens == 7
    assert q.hottest(2, {0: 1, 2: 1}) == {(0, 3), (0, 0)}
    assert len(q.hottest(3, {0: 1, 2: 1})) == 3
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ExpertError, match="not an llmtier expert profile"):
        ExpertProfile.load(tmp_path / "bad.json")


def test_trace_tags_each_expert_and_report_shows_skew(tmp_path):
    from llmtier import trace
    from llmtier.trace.analysis import findings, summarize

    path = make_family_model(str(tmp_path / "mix"), "mixtral")
    out = tmp_path / "t.npz"
    with trace.record(out, block=False, diskstats=False):
        with stream_model(path, "70%", experts="lru") as model:
            generate(model)
            s = model.llmtier.stats()
    tr = trace.load(out)
    sm = summarize(tr)
    skew = sm["experts"]
    assert skew["bytes"] == s.expert_bytes_read
    assert 0 < skew["experts_read"] <= 4 * 4 and 0 <= skew["gini"] < 1
    assert sum(skew["timeline_bytes"]) == skew["bytes"] and skew["hottest"][0]["bytes"] > 0
    assert any(f.startswith("Expert reads:") for f in findings(tr, sm))


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe", "phimoe", "deepseek_v2", "granitemoe", "glm4_moe"])
def test_more_moe_families_stream_exactly(name, tmp_path):
    path = make_family_model(str(tmp_path / name), name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    want = generate(ref)
    with stream_model(path, "70%", experts="lru", predict=True) as model:
        got = generate(model)
        assert model.llmtier.stats().expert_reads > 0
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))


@pytest.mark.parametrize("name", ["gpt_oss", "llama4_text"])
def test_other_expert_interfaces_refused(name, tmp_path):
    path = make_family_model(str(tmp_path / name), name, layers=2)
    with pytest.raises(ExpertError, match="no routed experts"):
        stream_model(path, "70%", experts="lru")


def test_prediction_equals_next_router_on_this_input(tmp_path):
    """The guess is layer L+1's router applied to layer L's expert input, counted exactly: the streamer's
    counters equal those computed on the in-memory model; on a skewed model the guess is nearly always right."""
    from llmtier.bench.families import family_config
    from llmtier.bench.moe import QUICK, apply_skew

    shape = dict(QUICK["mixtral"])
    config = family_config("mixtral", layers=shape.pop("layers"), **shape)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    apply_skew(ref, 1.5)
    ref.save_pretrained(tmp_path / "m")
    calls: dict[int, list] = {}
    blocks = [layer.mlp for layer in ref.model.layers]
    for i, b in enumerate(blocks):
        b.experts.register_forward_pre_hook(lambda m, a, i=i: calls.setdefault(i, []).append((a[0].clone(), a[1].clone())))
    want = generate(ref)
    guessed = right = routed = 0
    for i in range(len(blocks) - 1):
        w = blocks[i + 1].gate.weight.float()
        for (h, _), (_, top) in zip(calls[i], calls[i + 1]):
            g = set(torch.unique((h.float() @ w.T).topk(config.num_experts_per_tok, dim=-1).indices).tolist())
            need = set(torch.unique(top).tolist())
            guessed, right, routed = guessed + len(g), right + len(g & need), routed + len(need)
    with stream_model(tmp_path / "m", "60%", experts="lru", predict=True) as model:
        got = generate(model)
        s = model.llmtier.stats()
    assert torch.equal(got.sequences, want.sequences)
    assert (s.predicted, s.predicted_right, s.routed_with_prediction) == (guessed, right, routed)
    assert s.prediction_recall > 0.9 and s.prediction_precision > 0.9


@pytest.mark.parametrize("routing", ["skew", "uniform"])
def test_auto_prediction_reads_guesses_only_while_they_are_right(routing, tmp_path):
    """``predict="auto"``: on the skewed model (guesses right) it reads what ``predict=True`` reads; on the
    uniformly routed one (guesses often wrong) it reads only its confident guesses, fewer bytes and righter
    ones; exact either way."""
    from llmtier.bench.families import family_config
    from llmtier.bench.moe import QUICK, apply_skew
    from llmtier.offload.moe import AUTO_WINDOW

    shape = dict(QUICK["mixtral"])
    config = family_config("mixtral", layers=shape.pop("layers"), **shape)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if routing == "skew":
        apply_skew(ref, 1.5)
    ref.save_pretrained(tmp_path / "m")
    ids = torch.randint(1, 500, (1, 6), generator=torch.Generator().manual_seed(3))
    want = generate(ref, ids)
    stats = {}
    for predict in (True, "auto"):
        with stream_model(tmp_path / "m", "40%", experts="lru", predict=predict) as model:
            for _ in range(3):  # more layer passes than AUTO_WINDOW
                got = generate(model, ids)
                assert torch.equal(got.sequences, want.sequences)
                assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
            stats[predict] = model.llmtier.stats()
    on, auto = stats[True], stats["auto"]
    assert on.predicted > AUTO_WINDOW and auto.predict == "auto" and on.prefetch_paused == 0
    if routing == "skew":
        assert auto.prediction_precision >= 0.9 and auto.prefetch_paused == 0
        assert auto.prefetch_bytes == on.prefetch_bytes
    else:
        assert auto.prediction_precision < 0.9 and auto.prefetch_paused > 0
        assert auto.prefetch_bytes < on.prefetch_bytes and auto.prefetch_wasted_bytes < on.prefetch_wasted_bytes

        def right(s):  # share of the guesses read that were routed to
            return 1 - s.prefetch_wasted_bytes / s.prefetch_bytes

        # the confident guesses it still reads are right more often than the guesses predict=True reads
        assert auto.prefetch_bytes > 0 and right(auto) > right(on)
        assert auto.expert_payload_read <= 1.1 * auto.active_missing_bytes
    with pytest.raises(ExpertError, match="predict must be"):
        stream_model(tmp_path / "m", "40%", experts="lru", predict="sometimes")


def test_auto_prediction_samples_its_guesses_while_no_band_reads(tmp_path):
    """``predict="auto"`` with every confidence band judged wrong: only one MoE layer pass in ``AUTO_SAMPLE``
    guesses (the others skip the router product), nothing is read ahead, and the tokens stay exact."""
    from llmtier.bench.families import family_config
    from llmtier.bench.moe import QUICK
    from llmtier.offload.moe import AUTO_SAMPLE, AUTO_WINDOW

    shape = dict(QUICK["mixtral"])
    config = family_config("mixtral", layers=shape.pop("layers"), **shape)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    ref.save_pretrained(tmp_path / "m")
    ids = torch.randint(1, 500, (1, 6), generator=torch.Generator().manual_seed(3))
    want = generate(ref, ids)
    with stream_model(tmp_path / "m", "40%", experts="lru", predict="auto") as model:
        s = model.llmtier
        for band in s._bands:  # as after a long run of wrong guesses
            band.extend([0] * band.maxlen)
        s._judged.extend([(2, 0)] * AUTO_WINDOW)
        got = generate(model, ids)
        st = s.stats()
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    passes = st.unguessed_passes + st.predicted // config.num_experts_per_tok  # batch 1 after the prompt
    assert st.unguessed_passes >= (AUTO_SAMPLE - 1) * (passes // AUTO_SAMPLE) - AUTO_SAMPLE
    assert st.predicted > 0 and st.prefetch_bytes == 0 and st.prefetch_paused > 0
