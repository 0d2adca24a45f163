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
