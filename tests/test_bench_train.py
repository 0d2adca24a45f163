"""`llmtier train` and `llmtier bench train --quick`: smoke tests on real files."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from llmtier.bench.fio import fio_available
from llmtier.cli import main


def test_train_cli_budgets_agree_and_trace_shows_the_pattern(tmp_path, capsys):
    out_json = tmp_path / "runs.json"
    rc = main(["train", "--dir", str(tmp_path), "--params", "300k", "--steps", "3", "--context", "32", "--batch", "2",
               "--tokens", "200000", "--budgets", "0.25,0.5", "--no-fio", "--trace", "--checkpoint-every", "2", "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "loss curves identical across budgets: yes" in text
    assert "checkpoint (budget 0.25) at step 2" in text
    runs = json.loads(out_json.read_text())
    assert len(runs) == 2 and all(len(r["steps"]) == 3 for r in runs)
    for r in runs:
        assert all(s["read"] == r["analytic_read"] and s["written"] == r["analytic_write"] for s in r["steps"])
    from llmtier.trace import load
    from llmtier.trace.analysis import per_tag

    t = load(runs[0]["trace"])
    tags = {row["tag"]: row for row in per_tag(t)}
    chunks = [k for k in tags if k.startswith("optim:chunk")]
    assert len(chunks) == runs[0]["chunks"]
    # read-modify-write: each chunk written once per step and once when the state is created, read once per
    # step and (its pieces) once more by the checkpoint at step 2
    assert all(tags[k]["write_bytes"] % 4 == 0 and tags[k]["read_bytes"] >= 3 * tags[k]["write_bytes"] // 4 > 0
               for k in chunks)
    assert tags["data:window"]["read_bytes"] > 0 and tags["data:window"]["write_bytes"] == 0
    assert main(["report", runs[0]["trace"], "-o", str(tmp_path / "report")]) == 0


@pytest.mark.skipif(not fio_available()[0], reason="fio is not installed")
def test_bench_train_quick(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main(["bench", "train", "--quick", "--dir", str(tmp_path), "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())
    assert [r["system"] for r in res["optim"]] == ["memory", "llmtier"]
    assert all(r["ok"] for r in res["optim"]), res["optim"]
    ours = res["optim"][1]
    assert ours["bytes_read"] == ours["bytes_written"] == ours["state_bytes"] * 3
    assert res["loader"]["batches"] == 4 and res["loader"]["fio_bytes_s"] > 0
    assert "TokenDataset" in capsys.readouterr().out
