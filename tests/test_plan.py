"""The planner: memory model from HF configs, the seed's 10B table, profiles, placements the runtimes take."""
from __future__ import annotations

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.families import make_family_model  # noqa: E402
from llmtier.bench.hfmodels import make_model  # noqa: E402
from llmtier.cli import main  # noqa: E402
from llmtier.errors import BudgetError  # noqa: E402
from llmtier.offload import kv as kvtier  # noqa: E402
from llmtier.offload import layout as wlayout  # noqa: E402
from llmtier.offload.hfcompat import cache_kwargs  # noqa: E402
from llmtier.offload.optim import layout as olayout  # noqa: E402
from llmtier.plan import (  # noqa: E402
    DeviceProfile,
    Workload,
    load_profile,
    model_memory,
    plan_given,
    plan_inference,
    plan_training,
    save_profile,
)
from llmtier.plan import kv as kvplan  # noqa: E402
from llmtier.plan import optim as optplan  # noqa: E402
from llmtier.plan import weights as wplan  # noqa: E402
from llmtier.plan.pipeline import stream_step  # noqa: E402

TEN_B = {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 30,
         "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 47252, "tie_word_embeddings": False,
         "torch_dtype": "float16"}
SEED_TABLE = """| Component              | Memory Usage |
|------------------------|--------------|
| Model Weights          | 20 GB        |
| Gradients              | 20 GB        |
| Optimizer State (Adam) | 60 GB        |
| **Total per GPU**      | **100 GB**   |"""


def profile(**kw):
    base = {"read_bw": {1 << 20: 1e9, 16 << 20: 2e9}, "write_bw": {1 << 20: 5e8, 16 << 20: 1e9},
            "dram_copy_bw": 5e9, "gemm_flops": 5e10, "gemv_bw": 4e9, "layer_overhead_s": 2e-4,
            "adam_elems_s": 1e8, "base_bytes": 300 << 20}
    return DeviceProfile(**{**base, **kw})


def test_seed_10b_table_reproduced_from_a_config(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TEN_B))
    assert main(["plan", "--model", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert SEED_TABLE in out
    m = model_memory(str(cfg))
    assert m.params == 10_000_000_000 and m.weight_bytes == 20_000_000_000
    t = m.training(1, 2048)
    assert (t.weights, t.gradients, t.optimizer, t.total) == (20 * 10**9, 20 * 10**9, 60 * 10**9, 100 * 10**9)
    assert t.offloaded_state_bytes == 120 * 10**9  # what OffloadedAdamW keeps: fp32 master + 2 fp32 moments
    assert m.kv_token_bytes == 2 * 30 * 5120 * 2  # the seed's 2 x 2 x D x L per token


def _dynamic_kv_bytes(model, tokens):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(1, 200, (1, tokens)), use_cache=True, **cache_kwargs(cache, model))
    total = 0
    for layer in cache.layers:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if k is not None and k.numel():
            total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return total


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "deepseek_v3", "gemma2", "mixtral"])
def test_memory_model_matches_the_checkpoint_and_dynamic_cache(tmp_path, family):
    d = make_family_model(str(tmp_path / family), family)
    m = model_memory(d)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    params = {id(p): p for p in model.parameters()}
    assert m.params == sum(p.numel() for p in params.values())
    assert m.weight_bytes == sum(p.numel() * p.element_size() for p in params.values())
    if family in ("qwen2_moe", "mixtral", "deepseek_v3"):
        assert m.expert_bytes > 0 and m.experts_per_token == 2
    tokens = 6  # below gemma2's tiny window (8)
    got = _dynamic_kv_bytes(model, tokens)
    if family == "deepseek_v3" and got != m.kv_bytes(1, tokens):
        k = model.config.kv_lora_rank
        pytest.skip(f"this transformers ({transformers.__version__}) caches MLA per head, not compressed "
                    f"(K of {k} per token): the memory model counts the compressed cache of newer versions")
    assert m.kv_bytes(1, tokens) == got
    if family == "gemma2":
        assert 8 in m.windows and None in m.windows


def test_weight_bytes_as_stored_and_layers_as_the_streamer_groups_them(tmp_path):
    d = make_model(str(tmp_path / "m"), "llama", layers=4, tokenizer=False)
    m = model_memory(d)
    assert m.from_checkpoint
    lay = wlayout.open_layout(d)
    try:
        assert m.layer_bytes == [g.data_bytes for g in lay.groups]
        assert m.embedding_bytes == lay.embedding_bytes
    finally:
        lay.source.close()


def test_runtimes_take_their_placement_from_the_planner():
    # one decision each, living in plan/: the runtimes re-export or call it, none keeps its own
    assert wlayout.make_plan is wplan.make_plan and wlayout.plan_host_tier is wplan.plan_host_tier
    assert kvtier.budget.need is kvplan.need and kvtier.budget.choose_spills is kvplan.choose_spills
    assert kvtier.min_memory is kvplan.min_memory
    assert olayout.BYTES_PER_ELEM == optplan.BYTES_PER_ELEM and olayout.OptimizerBudgetError is optplan.OptimizerBudgetError
    params = [[torch.nn.Parameter(torch.zeros(5000)), torch.nn.Parameter(torch.zeros(3, 7))]]
    flat = [optplan.round_up(5000, optplan.ALIGN) + 21]
    for budget in (optplan.least_budget(flat), 3 << 20):
        assert olayout.chunk_elems_for(budget, params) == optplan.chunk_elems_for(budget, flat)


def test_choose_spills_is_what_the_tier_spills():
    geo = kvplan.Geometry(1, 2, 16, 2, 16, 16, None, 2)
    wins = [None, 8, None, 8]
    order = kvplan.spill_order(4)
    every = set(range(4))
    n = 4000
    full = kvplan.need(n, 1, wins, every, geo, 2)
    assert kvplan.choose_spills(n, 1, wins, every, order, geo, 2, full) == []
    out = kvplan.choose_spills(n, 1, wins, every, order, geo, 2, full - 1)
    assert out and out[0] in (0, 2)  # full-attention layers hold most: they go first
    assert sorted(kvplan.choose_spills(n, 1, wins, every, order, geo, 2, 1 << 40, spill_all=True)) == [0, 1, 2, 3]


def test_plan_inference_places_weights_and_kv_within_the_budget(tmp_path):
    d = make_model(str(tmp_path / "m"), "llama", layers=8, tokenizer=False, hidden_size=256, intermediate_size=512)
    m = model_memory(d)
    prof = profile()
    w = Workload(batch=2, prompt=64, new_tokens=16)
    roomy = plan_inference(m, w, 4 << 30, prof)
    assert not roomy.weights.streamed and not roomy.kv_spilled
    tight = plan_inference(m, w, int((prof.base_bytes + wplan.RUN_OVERHEAD + roomy.activation_bytes + roomy.kv_bytes
                                      + m.weight_bytes // 2) / 0.97), prof)
    assert tight.weights.streamed and tight.predicted_peak <= tight.memory
    assert tight.prediction is not None and tight.prediction.seconds > 0
    assert "bound by" in tight.describe()
    with pytest.raises(BudgetError):
        plan_inference(m, w, prof.base_bytes, prof)


def test_plan_training_sizes_the_optimizer_chunks(tmp_path):
    d = make_model(str(tmp_path / "m"), "llama", layers=2, tokenizer=False)
    m = model_memory(d)
    prof = profile()
    w = Workload(batch=2, prompt=32, train=True)
    t = m.training(2, 32)
    need = prof.base_bytes + t.weights + t.gradients + t.activations
    p = plan_training(m, w, int((need + (4 << 20) + wplan.RUN_OVERHEAD) / 0.97) + 1, prof)
    assert p.optim_on_ssd and p.chunk_elems == optplan.chunk_elems_for(p.optim_memory, [m.params])
    assert p.predicted_peak <= p.memory and p.prediction.seconds > 0


def test_profile_round_trip_and_interpolation(tmp_path):
    prof = profile()
    path = save_profile(prof, tmp_path / "p.json")
    back = load_profile(path)
    assert back == prof
    assert back.read_at(1 << 10) == 1e9 and back.read_at(64 << 20) == 2e9
    assert 1e9 < back.read_at(8 << 20) < 2e9
    assert load_profile(tmp_path / "none.json") is None
    skinny = profile(matmul_bw={1: 8e9, 4: 2e9})  # time per weight byte: interpolated, then growing with the batch
    assert load_profile(save_profile(skinny, tmp_path / "q.json")) == skinny
    assert skinny.weights_s(8e9, 1) == pytest.approx(1.0) and skinny.weights_s(8e9, 4) == pytest.approx(4.0)
    assert skinny.weights_s(8e9, 2) == pytest.approx(2.0) and skinny.weights_s(8e9, 8) == pytest.approx(8.0)


def test_cli_plan_prints_the_plan_and_prediction(tmp_path, capsys):
    d = make_model(str(tmp_path / "m"), "llama", layers=4, tokenizer=False)
    prof = save_profile(profile(), tmp_path / "p.json")
    assert main(["plan", "--model", d, "--memory", "400MiB", "--batch", "2", "--context", "96",
                 "--profile", prof, "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "predicted:" in out and "KV:" in out
    assert json.loads((tmp_path / "plan.json").read_text())["plan"]["predicted_s"] > 0
    assert main(["plan", "--model", d, "--memory", "1GiB", "--train", "--context", "32", "--profile", prof]) == 0
    assert "optimizer: AdamW state on SSD" in capsys.readouterr().out
    scratch = tmp_path / "not" / "yet"  # --dir need not exist: the probes' scratch directory is made
    assert main(["plan", "--model", d, "--memory", "400MiB", "--profile", prof, "--dir", str(scratch)]) == 0
    assert scratch.is_dir() and not list(scratch.iterdir())


def test_profile_disk_probe_and_format(tmp_path):
    from llmtier.bench.profile import _disk, format_profile

    read, write = _disk(str(tmp_path), 4 << 20, (1 << 20,), 1)
    assert read[1 << 20] > 0 and write[1 << 20] > 0
    assert not list(tmp_path.iterdir())  # the probe file is gone
    assert "1024 KiB requests" in format_profile(profile(read_bw=read, write_bw=write))


def test_bench_plan_budgets_are_ones_the_planner_accepts(tmp_path):
    from llmtier.bench.plan import Config, Row, _memory_for, format_table
    from llmtier.plan.planner import least_memory

    d = make_model(str(tmp_path / "m"), "llama", layers=4, tokenizer=False)
    m = model_memory(d)
    prof = profile()
    for c in (Config("a", "dense", 4, 64, weights=0.05), Config("b", "dense", 1, 64, kv_share=0.2)):
        w = Workload(c.batch, c.prompt, c.new_tokens)
        mem = _memory_for(m, c, prof.base_bytes)
        assert mem >= least_memory(m, w, prof.base_bytes)
        p = plan_inference(m, w, mem, prof)
        assert p.predicted_peak <= mem
        # with a run overhead measured on the model's own layers (larger than the profile's), as bench plan probes:
        # the budget is still one the planner accepts with that overhead (run Q of the seventh session was refused)
        over = 70 << 20
        mem = _memory_for(m, c, prof.base_bytes, prof, overhead=over)
        assert mem >= least_memory(m, w, prof.base_bytes, prof, overhead_bytes=over)
        plan_inference(m, w, mem, prof, overhead_bytes=over)
    row = Row(Config("a", "dense", 1, 64), 1 << 30, 900 << 20, 0.1, "compute (CPU)", p.as_dict(), 1000 << 20, 1100 << 20,
              0.12, (0.1, 0.2), True)
    table = format_table({"rows": [row]})
    assert "-10.0%" in table and "-16.7%" in table and "| yes |" in table


def test_runtimes_consume_the_planners_plan_objects(tmp_path):
    # plan_inference's parts are what stream_model / TieredCache take; plan_training's what OffloadedAdamW takes
    from llmtier.offload import stream_model
    from llmtier.offload.kv import TieredCache
    from llmtier.offload.optim import OffloadedAdamW
    from llmtier.plan import KVPlan, OptimPlan

    d = make_model(str(tmp_path / "m"), "llama", layers=4, tokenizer=False, hidden_size=128, intermediate_size=256)
    m = model_memory(d)
    prof = profile()
    w = Workload(batch=1, prompt=16, new_tokens=4)
    from llmtier.plan.planner import least_memory

    p = plan_inference(m, w, least_memory(m, w, prof.base_bytes, prof) + m.weight_bytes // 4, prof)
    assert p.weights.streamed and isinstance(p.kv, KVPlan) and p.optim is None
    ids = torch.randint(1, 100, (1, 16))
    with stream_model(d, plan=p.weights, verify="never") as model, \
            TieredCache(model.config, plan=p.kv, path=str(tmp_path / "kv")) as cache:
        st = model.llmtier
        assert st.plan.resident == p.weights.resident and st.plan.slots == p.weights.slots
        assert st.plan.memory_bytes <= p.weights.budget
        assert cache.memory == p.kv.memory
        with torch.no_grad():
            model(ids, use_cache=True, **cache_kwargs(cache, model))
    with pytest.raises(wlayout.BudgetError, match="decoder layers"):
        wplan.adopt_plan(p.weights, 0, 0, [1, 2])
    with pytest.raises(kvtier.KVConfigError):
        TieredCache(model.config)
    t = plan_training(m, Workload(batch=1, prompt=16, train=True), 4 << 30, prof)
    assert isinstance(t.optim, OptimPlan) and t.kv is None
    net = torch.nn.Linear(64, 64).to(torch.bfloat16)
    op = OptimPlan(optplan.BYTES_PER_ELEM * 8192, 8192)
    with OffloadedAdamW(net.parameters(), plan=op, path=str(tmp_path / "opt")) as opt:
        assert opt.budget == op.memory and opt.chunk_elems == 5120  # the plan's chunk, capped at the flat length


def test_expert_split_is_the_planners(tmp_path):
    from llmtier.offload import experts as oexperts
    from llmtier.plan import experts as pexperts
    from llmtier.plan.planner import choose_experts

    assert oexperts.split_budget_for_experts is pexperts.split_budget_for_experts
    assert oexperts.ExpertPlan is pexperts.ExpertPlan
    d = make_family_model(str(tmp_path / "moe"), "mixtral", layers=2, vocab_size=512, hidden_size=64,
                          intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)
    m = model_memory(d)
    one = m.layers[0].expert_bytes // 4
    budget = m.weight_bytes - m.expert_bytes + 6 * one
    ex = choose_experts(m, wplan.make_plan(budget, 0, [1], 1), budget)
    assert ex.split is not None and ex.split.cache_bytes == 6 * one and ex.cached_experts == 6
    p = plan_inference(m, Workload(1, 16, 4), 4 << 30, profile(), experts="lru")
    assert p.experts.split is not None and p.predicted_peak >= p.weights.memory_bytes + p.experts.split.cache_bytes
    with pytest.raises(BudgetError):
        pexperts.split_budget_for_experts(one, 0, [0, 0], [pexperts.ExpertLayer(0, 4, 2, one)])


def test_layer_probe_times_the_models_own_layer_and_the_planner_uses_it(tmp_path):
    from llmtier.bench.layerprobe import MAX_PROBE_BYTES, PROBE_LAYERS, PROBE_PROMPT, probe_layer
    from llmtier.plan import LayerTiming

    d = make_model(str(tmp_path / "m"), "llama", layers=3, tokenizer=False, hidden_size=128, intermediate_size=256)
    m = model_memory(d)
    lt = probe_layer(d, 2, 1000, steps=4)
    assert lt is not None and lt.layer_s >= 0 and lt.batch == 2 and lt.context == PROBE_PROMPT
    assert "decoder layer of the model, batch 2" in lt.note
    assert lt.cold_layer_s is not None and lt.cold_layer_s >= lt.layer_s and "in no CPU cache" in lt.note
    assert probe_layer(d, 1, 8, weight_bytes=MAX_PROBE_BYTES // PROBE_LAYERS + 1) is None  # too big to build
    assert probe_layer(str(tmp_path / "no-such-model"), 1, 8) is None
    mix = make_family_model(str(tmp_path / "x"), "mixtral", layers=2, vocab_size=256, hidden_size=64,
                            intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)
    assert probe_layer(mix, 1, 16, steps=4) is not None  # a MoE layer: router and experts in the timing
    prof = profile(matmul_bw={1: 4e9, 4: 4e9}, step_overhead_s=1e-3, stream_overlap_loss=0.5)
    w = Workload(batch=1, prompt=64, new_tokens=16)
    generic = plan_inference(m, w, 4 << 30, prof)
    slow = LayerTiming(0.01, 1, 64, "a test layer")
    timed = plan_inference(m, w, 4 << 30, prof, layer_timing=slow)
    # the timed layers replace the generic terms: layers x their time, plus the step, the head, the longer context
    head = prof.weights_s(m.outside_bytes, 1)
    kv = (m.kv_bytes(1, w.context) - m.kv_bytes(1, 64)) / prof.dram_copy_bw
    assert timed.prediction.compute_s == pytest.approx(3 * 0.01 + 1e-3 + head + kv)
    assert generic.prediction.compute_s < timed.prediction.compute_s
    assert "compute per layer timed on a test layer" in timed.describe()
    assert "generic rates" in generic.describe()
    other = plan_inference(m, Workload(batch=4, prompt=64, new_tokens=16), 4 << 30, prof, layer_timing=slow)
    assert "generic rates" in other.describe()  # timed at another batch: not used
    # streamed: the streamer's pipeline (never faster than the larger of compute and reads) plus the profile's
    # unhidden share of the smaller
    least = m.outside_bytes + m.embedding_bytes + 2 * max(m.layer_bytes)
    streamed = plan_given(m, w, prof, weights_memory=least, layer_timing=slow)
    wp = streamed.weights
    assert wp.streamed
    pr = streamed.prediction
    c, io = pr.compute_s, pr.parts["weights_io_s"]
    rate = prof.read_at(min(1 << 20, wp.slot_bytes))
    per = 0.01 + kv / 3
    pipe = stream_step([per] * 3, [wp.layer_bytes[i] / rate if i in wp.streamed else None for i in range(3)], wp.slots,
                       after_s=c - 3 * per, rows_first=bool(wp.on_demand_bytes), slowdown=prof.read_slowdown)
    assert io > 0 and pipe >= max(c, io) - 1e-12
    assert pr.seconds == pytest.approx(pr.parts["kv_io_s"] + pipe + 0.5 * min(c, io))
    # the streamer's own CPU is added to each layer read from the disk
    busy = dataclasses.replace(prof, stream_layer_s=0.002)
    assert plan_given(m, w, busy, weights_memory=least, layer_timing=slow).prediction.compute_s == \
        pytest.approx(c + 0.002 * len(wp.from_disk))
    # a layer read from the disk computes with its weights in no CPU cache: its cold timing, the others' warm one
    cold = plan_given(m, w, prof, weights_memory=least, layer_timing=LayerTiming(0.01, 1, 64, "", cold_layer_s=0.03))
    assert cold.prediction.compute_s == pytest.approx(c + 0.02 * len(wp.from_disk))
    assert cold.prediction.seconds > pr.seconds


def test_pipeline_model_of_a_streamed_step():
    """plan.pipeline.stream_step: the streamer's slots and the disk's one queue, event by event."""
    with pytest.raises(ValueError, match="layers' reads"):
        stream_step([1.0, 1.0], [None], 2)
    assert stream_step([1.0, 2.0], [None, None], 3, after_s=0.5) == pytest.approx(3.5)  # nothing read: compute
    # one slot: a layer's read starts only after the previous layer computed, nothing overlaps
    assert stream_step([1.0] * 4, [2.0] * 4, 1) == pytest.approx(4 * 3.0)
    # slots enough and reads far shorter than compute: compute alone; the reverse: the disk alone
    assert stream_step([1.0] * 4, [0.1] * 4, 3) == pytest.approx(4.0)
    assert stream_step([0.1] * 4, [1.0] * 4, 3) == pytest.approx(4.0)
    # balanced: reads ahead hide under compute, but the rows read behind the queued reads makes the pass wait
    plain = stream_step([1.0] * 4, [1.0] * 4, 3)
    rows = stream_step([1.0] * 4, [1.0] * 4, 3, rows_first=True)
    assert plain >= 4.0 and rows > plain
    # resident layers between streamed ones compute while the disk reads ahead
    assert stream_step([1.0] * 4, [2.0, None, 2.0, None], 2) == pytest.approx(4.0)
    # compute slowed while the disk is busy: the balanced pass grows, a disk-bound one does not
    assert stream_step([1.0] * 4, [1.0] * 4, 3, slowdown=1.5) > plain
    assert stream_step([0.1] * 4, [1.0] * 4, 3, slowdown=2.0) == pytest.approx(4.0)


def test_read_slowdown_probe(tmp_path):
    from llmtier.bench.profile import read_slowdown

    f = read_slowdown(str(tmp_path), rounds=1, reps=1)
    assert f >= 1.0 and list(tmp_path.iterdir()) == []  # a factor, and its scratch file removed


def test_old_profiles_without_the_new_terms_still_load(tmp_path):
    d = profile().as_dict()
    for k in ("stream_overlap_loss", "moe_train_overhead_bytes", "step_overhead_s", "matmul_bw", "read_slowdown",
              "stream_layer_s"):
        d.pop(k)
    (tmp_path / "old.json").write_text(json.dumps(d))
    old = load_profile(tmp_path / "old.json")
    assert old.stream_overlap_loss == 0.0 and old.matmul_bw == {} and old.read_slowdown == 1.0
    assert old.stream_layer_s == 0.0


def test_stream_overlap_probe_measures_a_share(tmp_path):
    from llmtier.bench.plan import stream_overlap

    prof = profile(read_bw={1 << 20: 1.5e9}, write_bw={1 << 20: 1.5e9}, matmul_bw={1: 1e10}, step_overhead_s=1e-4)
    loss = stream_overlap(str(tmp_path), prof)
    assert loss is not None and 0.0 <= loss <= 1.0  # the streamed child ran and its step was held against the model
    assert (tmp_path / "model-probe-stream" / "config.json").exists()


def test_prefill_square_term_follows_the_attention_implementation(tmp_path):
    d = make_model(str(tmp_path / "m"), "llama", layers=2, tokenizer=False, hidden_size=128, intermediate_size=256)
    sdpa = model_memory(d)
    eager = model_memory(transformers.AutoConfig.from_pretrained(d, attn_implementation="eager"))
    assert sdpa.attn_implementation == "sdpa" and eager.attn_implementation == "eager"
    b, t = 2, 1024
    # eager keeps every head's scores and probabilities; SDPA's blocked kernel keeps at most a boolean mask
    assert eager.prefill_activation_bytes(b, t) - sdpa.prefill_activation_bytes(b, t) == \
        2 * b * sdpa.heads * t * t * sdpa.itemsize - b * t * t


def test_training_memory_probe_and_the_planner_taking_it(tmp_path):
    """A MoE model's training memory measured on its first layers (two real training children) is what the plan
    counts for its activations and overhead, and what its budget leaves room for."""
    from llmtier.bench.layerprobe import probe_train_memory

    d = str(tmp_path / "m")
    # large enough that what the runs keep (tens of MiB) is well above how the RSS of a process swings (a few MiB
    # with transparent huge pages), small enough for seconds
    make_family_model(d, "mixtral", layers=3, vocab_size=4096, hidden_size=256, intermediate_size=512,
                      num_local_experts=4, num_experts_per_tok=2)
    m = model_memory(d)
    assert m.expert_bytes > 0
    kept = probe_train_memory(d, 2, 64, str(tmp_path), steps=2, repeats=1)
    assert kept is not None and kept > 0
    assert probe_train_memory(str(tmp_path / "missing"), 1, 16, str(tmp_path)) is None
    prof = profile()
    w = Workload(batch=2, prompt=64, train=True)
    t = m.training(2, 64)
    memory = int((prof.base_bytes + 2 * kept + t.weights + t.gradients + (8 << 20)) / 0.97)
    p = plan_training(m, w, memory, prof, kept_bytes=kept)
    assert p.activation_bytes == kept and p.overhead_bytes == 0
    assert p.predicted_peak == prof.base_bytes + kept + t.weights + t.gradients + p.optim_memory
    assert p.predicted_peak <= memory and "measured on the model's own layers" in p.describe()


def test_moe_run_overhead_probe_and_the_planner_taking_it(tmp_path):
    """A MoE model's run overhead measured on its first layers (two real generation children, from stores) is what
    the plan reserves and predicts beyond the memory model's terms."""
    from llmtier.bench.layerprobe import probe_infer_memory

    d = str(tmp_path / "m")
    # large enough that what the runs keep (tens of MiB) is well above how the RSS of a process swings (a few MiB
    # with transparent huge pages), small enough for seconds
    make_family_model(d, "mixtral", layers=3, vocab_size=4096, hidden_size=256, intermediate_size=512,
                      num_local_experts=4, num_experts_per_tok=2)
    m = model_memory(d)
    over = probe_infer_memory(d, 2, 32, 4, str(tmp_path), repeats=1)
    assert over is not None and over > 0
    assert probe_infer_memory(str(tmp_path / "missing"), 1, 8, 4, str(tmp_path)) is None
    prof = profile()
    w = Workload(batch=2, prompt=32, new_tokens=4)
    memory = 1 << 30
    p = plan_inference(m, w, memory, prof, overhead_bytes=over)
    generic = plan_inference(m, w, memory, prof)
    assert p.overhead_bytes == over and generic.overhead_bytes != over
    assert p.predicted_peak - generic.predicted_peak == over - generic.overhead_bytes
    assert "measured on the model's own first layers" in p.describe()


def test_training_activations_take_the_profiles_measured_scale(tmp_path):
    from llmtier.plan.planner import training_activations

    d = make_model(str(tmp_path / "m"), "llama", layers=2, tokenizer=False)
    m = model_memory(d)
    w = Workload(batch=2, prompt=32, train=True)
    formula = m.training(2, 32).activations
    assert training_activations(m, w) == formula  # no profile: the formula
    assert training_activations(m, w, profile(train_activation_scale=0.8)) == int(formula * 0.8)
    for odd in (0.0, 0.2, 3.0):  # unmeasured, or a probe outside 0.5-1.5: the formula
        assert training_activations(m, w, profile(train_activation_scale=odd)) == formula
    ck = Workload(batch=2, prompt=32, train=True, checkpointing=True)
    assert training_activations(m, ck, profile(train_activation_scale=0.8)) == int(m.training(2, 32).activations_checkpointed * 0.8)
    mem = 1 << 30
    full, scaled = plan_training(m, w, mem, profile()), plan_training(m, w, mem, profile(train_activation_scale=0.8))
    assert full.predicted_peak - scaled.predicted_peak == formula - int(formula * 0.8)


def test_activation_scale_probe_measures_a_ratio(tmp_path):
    from llmtier.bench.plan import activation_scale

    s = activation_scale(str(tmp_path), repeats=1)  # two real training children: the difference of their peaks
    assert 0.3 < s < 2.0
    assert (tmp_path / "model-probe-acts" / "config.json").exists()


def test_bench_plan_predicts_at_the_median_of_its_childrens_rates():
    from llmtier.bench.plan import RATES, median_profile

    ps = [profile(read_bw={1 << 20: r}, gemm_flops=g, matmul_bw={1: g / 10}, train_flops=g / 2)
          for r, g in ((1e9, 5e10), (3e9, 1e10), (2e9, 9e10))]
    mp = median_profile(ps)
    assert mp.read_bw == {1 << 20: 2e9} and mp.gemm_flops == 5e10 and mp.matmul_bw == {1: 5e9}
    assert mp.train_flops == 2.5e10 and mp.base_bytes == ps[0].base_bytes
    assert set(RATES) <= set(DeviceProfile.__dataclass_fields__)
