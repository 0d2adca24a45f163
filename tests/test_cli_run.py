"""`llmtier run` and `llmtier bench weights --quick` end to end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.hfmodels import make_model  # noqa: E402
from llmtier.offload.generate import generate_timed  # noqa: E402
from llmtier.offload.weights import open_layout  # noqa: E402


def llmtier(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "llmtier.cli", *args], capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("run") / "llama")
    make_model(d, "llama", layers=4)
    lay = open_layout(d)
    least = lay.least_memory
    lay.source.close()
    return d, least


def test_run_json_matches_the_in_memory_model(model):
    path, least = model
    out = json.loads(llmtier("run", "--model", path, "--memory", str(least), "--prompt-ids", "5,6,7,8",
                             "--max-new-tokens", "6", "--batch", "2", "--json").stdout)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[5, 6, 7, 8]] * 2)
    with torch.no_grad():  # generate() as transformers runs it: generation_config.json, EOS included
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6)[:, 4:].tolist()
    assert out["tokens"] == want
    assert out["streamed_layers"] == [0, 1, 2, 3] and out["bytes_read"] > 0
    assert out["decode_steps"] == len(want[0]) - 1 and out["prefill_s"] > 0
    assert out["weights_memory_bytes"] <= least and len(out["text"]) == 2


def test_run_text_prompt_and_summary(model):
    path, least = model
    p = llmtier("run", "--model", path, "--memory", str(least + (1 << 20)), "--prompt", "The disk reads",
                "--max-new-tokens", "4", "--no-progress")
    assert p.stdout.strip()  # the answer, streamed to stdout as it came
    assert "decode" in p.stderr and "streamed" in p.stderr  # the summary
    assert "resident" in p.stderr  # the plan


def test_run_errors_are_clear(model, tmp_path):
    path, _ = model
    p = llmtier("run", "--model", path, "--memory", "1k", "--prompt-ids", "1", check=False)
    assert p.returncode == 1 and "below the least" in p.stderr
    bare = str(tmp_path / "bare")
    shutil.copytree(path, bare)
    os.remove(os.path.join(bare, "tokenizer.json"))
    p = llmtier("run", "--model", bare, "--memory", "1GiB", "--prompt", "hi", check=False)
    assert p.returncode != 0 and "--prompt-ids" in p.stderr
    p = llmtier("run", "--model", path, "--memory", "1GiB", "--prompt-ids", "a,b", check=False)
    assert p.returncode != 0 and "comma-separated integers" in p.stderr


def test_run_trace_records_the_streamed_reads(model, tmp_path):
    from llmtier.trace import load

    path, least = model
    trace = str(tmp_path / "run.npz")
    out = json.loads(llmtier("run", "--model", path, "--memory", str(least), "--prompt-ids", "1,2,3",
                             "--max-new-tokens", "3", "--json", "--trace", trace).stdout)
    t = load(trace)
    reads = t.app["op"] == 0
    # every streamed byte is in the trace, tagged with its layer (+ the resident set and read-ahead)
    assert int(t.app["size"][reads].sum()) >= out["bytes_read"]
    tags = {t.tags[i] for i in np.unique(t.app["tag"][reads])}
    assert {f"weights:model.layers.{i}" for i in range(4)} <= tags
    assert out["trace"] == trace


def test_bench_weights_quick(tmp_path):
    p = llmtier("bench", "weights", "--quick", "--dir", str(tmp_path / "bw"), "--no-progress",
                "--json", str(tmp_path / "bw.json"))
    res = json.loads((tmp_path / "bw.json").read_text())
    systems = {r["system"] for r in res["rows"]}
    assert {"memory", "llmtier"} <= systems
    for r in res["rows"]:
        assert not r["failed"], (r, p.stdout)
        assert r["decode_tok_s"] > 0
    row = next(r for r in res["rows"] if r["system"] == "llmtier")
    assert row["streamed_bytes_per_token"] > 0 and row["compute_bound_s"] > 0
    assert "| llmtier | 50% | 1 |" in p.stdout


def test_run_kv_offload_and_prefix_cache(tmp_path):
    path = make_model(str(tmp_path / "deep"), "llama", layers=12, tokenizer=False)  # deep enough to spill
    lay = open_layout(path)
    least = lay.least_memory
    lay.source.close()
    ids = ",".join(str(5 + i % 400) for i in range(150))
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    want = generate_timed(ref, torch.tensor([[5 + i % 400 for i in range(150)]] * 2), 6).tokens
    common = ["run", "--model", path, "--memory", str(least), "--prompt-ids", ids, "--max-new-tokens", "6",
              "--batch", "2", "--kv-offload", "--kv-memory", "300KiB", "--kv-dir", str(tmp_path / "spill"),
              "--kv-page-tokens", "16", "--prefix-cache", str(tmp_path / "prefix"), "--json"]
    first = json.loads(llmtier(*common).stdout)
    assert first["tokens"] == want
    assert first["kv"]["spilled_layers"] > 0 and first["kv"]["bytes_read"] > 0 and first["kv"]["bytes_written"] > 0
    assert first["kv"]["peak_dram_bytes"] <= 300 * 1024
    assert first["prefix"]["loaded_tokens"] == 0 and first["prefix"]["chunks"] == 9  # 150 tokens: 9 whole chunks
    second = json.loads(llmtier(*common).stdout)  # a new process: the store is reopened from disk
    assert second["tokens"] == want
    assert second["prefix"]["loaded_tokens"] == 144 and second["prefix"]["hits"] == 18
    assert second["prefix"]["misses"] == 0
    p = llmtier(*common[:-1], "--no-progress")
    assert "prefix cache: 144 tokens loaded" in p.stderr and "layers on SSD" in p.stderr
    assert os.listdir(tmp_path / "spill") == []  # the spill file went with the process


def test_bench_kv_quick(tmp_path):
    out = tmp_path / "kv.json"
    p = llmtier("bench", "kv", "--quick", "--dir", str(tmp_path), "--json", str(out), "--no-progress")
    assert "(a) offloaded decode" in p.stdout and "(c) restart: 4/4" in p.stdout
    res = json.loads(out.read_text())
    assert all(c["tokens_identical"] for c in res["decode"])
    assert res["restart"]["hit_rate"] == 1.0
    assert all(r["same_logits_as_recomputed_kv"] for r in res["ttft"])
