"""`llmtier demo` (make demo) end to end on a tiny model: streamed weights, spilled KV, a prefix hit, a report."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmtier.bench.demo import DemoConfig, run_demo, summary


def test_demo_runs_the_main_job(tmp_path):
    small = {"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4, "num_key_value_heads": 2}
    res = run_demo(DemoConfig(str(tmp_path), layers=8, new_tokens=4, budget_share=0.7, model=small), progress=False)
    assert res.streamed_layers and res.budget < res.model_bytes
    first, second = res.requests
    assert first["loaded_tokens"] == 0 and second["loaded_tokens"] > 0  # the second request hit the prefix cache
    assert res.kv["spilled_layers"] > 0 and res.kv["bytes_written"] > 0
    assert all(r["bytes_streamed"] > 0 for r in res.requests)
    assert os.path.isfile(res.report) and os.path.isfile(res.trace)
    assert any("report:" in line for line in summary(res))
