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


def test_io_bound_is_per_decode_step():
    """A step makes one token per row and `decode_tok_s` counts steps, so the I/O bound is the bytes of a step
    at the rate fio measured before the round's child (at batch 4 it had been the bytes of one row's token)."""
    from llmtier.bench.moe import _row

    mib, gib = 1 << 20, 1 << 30

    def run(tok_s, step_bytes, fio):
        return {"decode_tok_s": tok_s, "prefill_s": 0.1, "digest": "x", "decode_steps": 7, "fio_bytes_per_s": fio,
                "decode_total_bytes_read": 7 * step_bytes, "decode_bytes_per_token": 7 * step_bytes / (7 * 4),
                "decode_analytic_bytes": 7 * step_bytes}
    ref = {"ok": True, "runs": [{"decode_tok_s": 4.0, "digest": "x", "prefill_s": 0.1}], "peak_rss_bytes": 1}
    res = {"ok": True, "runs": [run(2.0, 512 * mib, gib), run(1.0, 512 * mib, 0.5 * gib)], "peak_rss_bytes": 1}
    row = _row("experts-lru", res, ref)
    assert row["bytes_per_token"] == 128 * mib  # per row's token
    assert row["io_bound_s"] == pytest.approx(0.75)  # median of 0.5 s and 1.0 s per step
    assert row["io_efficiency"] == pytest.approx(1.0)  # 0.5 s x 2 steps/s, 1.0 s x 1 step/s
    assert row["bound_efficiency"] == pytest.approx(1.0)  # compute 0.25 s per step binds nowhere
    assert row["bytes_vs_analytic"] == 1.0 and row["tokens_match"]
