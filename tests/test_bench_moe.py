"""``llmtier bench moe``: the synthetic skew makes expert popularity uneven,
and a quick run checks every system's tokens against the in-memory model."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmtier.bench.moe import MoEBenchConfig, ensure_model, format_report, gini, run_moe_bench  # noqa: E402
from llmtier.offload import stream_model  # noqa: E402


def test_gini():
    assert gini([5, 5, 5, 5]) == 0
    assert gini([0, 0, 0, 12]) == pytest.approx(0.75)
    assert gini([]) == 0


def test_skew_makes_popularity_uneven(tmp_path):
    cfg = MoEBenchConfig.quick_config(str(tmp_path))
    ids = torch.randint(1, 500, (4, 16), generator=torch.Generator().manual_seed(3))
    g = {}
    for routing in ("uniform", "skew"):
        path = ensure_model(str(tmp_path), "mixtral", routing, cfg, progress=False)
        with stream_model(path, "100%", experts="lru", predict=False) as model, torch.no_grad():
            model(ids)
            g[routing] = gini([c for cs in model.llmtier.expert_counts().values() for c in cs])
    assert g["skew"] > g["uniform"] + 0.1


@pytest.mark.slow
def test_bench_moe_quick(tmp_path):
    res = run_moe_bench(MoEBenchConfig.quick_config(str(tmp_path), passes=2), progress=False)
    rows = {r["system"]: r for r in res["tables"][0]["rows"]}
    assert all(r["ok"] for r in rows.values()), rows
    assert all(len(raw["runs"]) == 2 for raw in res["tables"][0]["raw"].values())  # one round in each of two passes
    assert all(r["tokens_match"] for s, r in rows.items() if s != "memory")
    assert rows["experts-lru"]["hit_rate"] is not None and rows["layers"]["bytes_per_token"] > 0
    assert "experts-profile" in format_report(res)


def test_oracle_reads_ahead_what_the_in_memory_model_routed(tmp_path):
    """The prediction ceiling of `bench moe`: the calls recorded on the in-memory model are what the streamed
    model routes (no mismatch), reading them ahead leaves nothing to read on demand after the first call, and
    the tokens and logits stay the in-memory model's; an oracle system needs `memory` before it."""
    import transformers

    from llmtier.bench.moe_oracle import Oracle, load_routing, record_routing, save_routing

    cfg = MoEBenchConfig.quick_config(str(tmp_path))
    path = ensure_model(str(tmp_path), "mixtral", "uniform", cfg, progress=False)
    ids = torch.randint(1, 500, (1, 6), generator=torch.Generator().manual_seed(5))
    kw = {"max_new_tokens": 5, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    calls, remove = record_routing(ref)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
    remove()
    save_routing(str(tmp_path / "routing.json"), [calls])
    routing = load_routing(str(tmp_path / "routing.json"))
    assert routing == [[(i, sorted(es)) for i, es in calls]] and len(calls) == 6 * 5  # 6 MoE layers, 5 forward calls
    with stream_model(path, "60%", experts="lru", predict=False, verify="never") as model:
        seer = Oracle(model.llmtier, 2)
        seer.start(routing[0])
        with torch.no_grad():
            got = model.generate(ids, **kw)
        s = model.llmtier.stats()
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    assert seer.mismatches == 0 and seer.read_ahead > 0
    assert seer.no_room == 0 and s.prefetch_hits > 0
    assert s.expert_misses == len(routing[0][0][1])  # only the very first call read on demand
    with pytest.raises(ValueError, match="memory"):
        run_moe_bench(MoEBenchConfig.quick_config(str(tmp_path), systems=("experts-lru-oracle1", "memory")), progress=False)
    with pytest.raises(ValueError, match="unknown system"):
        run_moe_bench(MoEBenchConfig.quick_config(str(tmp_path), systems=("memory", "experts-lru-oracle0")), progress=False)
