"""The accelerate disk-offload peer: both loaders give the in-memory model's tokens.

A tiny random Llama (4 layers) saved with ``save_pretrained``; the budget keeps
about half of the layer bytes in RAM, so some layers are on ``"disk"``.
"""
from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from llmtier.bench.peers_hf import (  # noqa: E402  (after the importorskips)
    HFPeerError,
    accelerate_device_map,
    load_accelerate,
    plan_device_map,
)
from llmtier.offload.generate import generate_timed as _timed  # noqa: E402


def generate_timed(model, ids, new):
    return _timed(model, ids, new).record()


def prompt_ids(vocab, batch, length, seed):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))

NEW = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=4, vocab_size=256, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def plan(model_dir):
    probe = plan_device_map(model_dir, 0)
    budget = probe.other_bytes + sum(probe.layer_bytes) // 2
    return plan_device_map(model_dir, budget), budget


@pytest.fixture(scope="module")
def reference(model_dir):
    # Loaded from the saved directory, as the peers load it (a model built in
    # fp32 and cast would cast its rotary buffers too).
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    ids = prompt_ids(model.config.vocab_size, 2, 8, seed=1)
    return ids, generate_timed(model, ids, NEW)


def test_device_map_splits_layers(plan, model_dir):
    p, budget = plan
    dm = p.device_map
    assert p.layers == "model.layers" and len(p.layer_bytes) == 4
    assert p.cpu_layers == 2 and p.disk_layers == 2  # the first half fits
    assert [dm[f"model.layers.{i}"] for i in range(4)] == ["cpu", "cpu", "disk", "disk"]
    for name in ("model.embed_tokens", "model.norm", "lm_head", "model.rotary_emb"):
        assert dm[name] == "cpu"
    assert accelerate_device_map(model_dir, budget) == dm
    assert set(plan_device_map(model_dir, 0).device_map.values()) == {"cpu", "disk"}
    assert plan_device_map(model_dir, 0).cpu_layers == 0
    assert plan_device_map(model_dir, 1 << 30).disk_layers == 0


def test_reference_timing(reference):
    _, ref = reference
    assert len(ref["tokens"]) == 2 and all(len(row) == NEW for row in ref["tokens"])
    assert ref["prefill_s"] > 0 and ref["decode_s"] > 0 and ref["total_s"] >= ref["prefill_s"] + ref["decode_s"]
    assert ref["decode_tok_s"] == pytest.approx((NEW - 1) / ref["decode_s"])


@pytest.mark.parametrize("loader", ["hf", "dispatch"])
def test_loaders_match_in_memory_model(loader, model_dir, plan, reference, tmp_path):
    p, budget = plan
    ids, ref = reference
    model = load_accelerate(model_dir, budget, loader, str(tmp_path / "offload"))
    assert model.hf_device_map == p.device_map
    got = generate_timed(model, ids, NEW)
    assert got["tokens"] == ref["tokens"]
    assert model.model.layers[3].self_attn.q_proj.weight.device.type == "meta"  # streamed, not resident
    written = sorted(os.listdir(tmp_path / "offload"))
    if loader == "dispatch":  # the disk half re-saved as .dat files
        assert "index.json" in written and any(f.startswith("model.layers.3.") for f in written)
        assert not any(f.startswith("model.layers.0.") for f in written)
    else:  # read in place from the safetensors shard
        assert written == []


def test_bad_arguments(model_dir, tmp_path):
    with pytest.raises(HFPeerError, match="unknown loader"):
        load_accelerate(model_dir, 0, "nope", str(tmp_path))
    with pytest.raises(HFPeerError, match="offload_dir"):
        load_accelerate(model_dir, 0, "hf", None)
