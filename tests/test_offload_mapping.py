"""offload.mapping: transformers' conversions as byte placements, checked against torch on index tensors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, Transpose  # noqa: E402

from llmtier.bench.families import make_family_model  # noqa: E402
from llmtier.offload import stream_model  # noqa: E402
from llmtier.offload.hf import ModelLayoutError  # noqa: E402
from llmtier.offload.mapping import _VT, _cat, _run_ops, _split, _stack  # noqa: E402
from llmtier.store.convert import convert  # noqa: E402


def leaf(name, shape):
    return _VT(tuple(shape), [(0, math.prod(shape), name, 0)])


def realize(vt, sources):
    """The tensor a virtual tensor describes, built from the sources' elements."""
    flat = torch.empty(math.prod(vt.shape), dtype=torch.int64)
    for start, n, src, s0 in vt.runs:
        flat[start:start + n] = sources[src].reshape(-1)[s0:s0 + n]
    return flat.reshape(vt.shape)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_virtual_cat_stack_split_match_torch(dim):
    g = torch.Generator().manual_seed(dim)
    shapes = {"a": (3, 4, 5), "b": (3, 4, 5), "c": (3, 4, 5)}
    src = {k: torch.randint(0, 1 << 30, s, generator=g) for k, s in shapes.items()}
    vts = [leaf(k, s) for k, s in shapes.items()]
    assert torch.equal(realize(_cat(vts, dim), src), torch.cat(list(src.values()), dim))
    assert torch.equal(realize(_stack(vts, dim), src), torch.stack(list(src.values()), dim))
    whole = _cat(vts, dim)
    parts = _split(whole, [1, whole.shape[dim] - 1], dim)
    want = torch.split(torch.cat(list(src.values()), dim), [1, whole.shape[dim] - 1], dim)
    for p, w in zip(parts, want):
        assert torch.equal(realize(p, src), w)


def test_moe_fusion_is_each_experts_blocks_one_after_another():
    E, I, H = 4, 3, 5  # noqa: E741 - the fused shapes [E, 2I, H] of the docs
    conv = SimpleNamespace(source_patterns=["w1", "w3"], target_patterns=["gate_up"],
                           operations=[MergeModulelist(dim=0), Concatenate(dim=1)])
    collected = {"w1": [leaf(f"g{e}", (I, H)) for e in range(E)], "w3": [leaf(f"u{e}", (I, H)) for e in range(E)]}
    out = _run_ops(conv, collected, "layers.0.experts.gate_up", SimpleNamespace(config=None))
    vt = out["gate_up"]
    assert vt.shape == (E, 2 * I, H)
    # one run per expert tensor, in the order gate_0, up_0, gate_1, up_1, ...
    assert [r[2] for r in vt.runs] == [n for e in range(E) for n in (f"g{e}", f"u{e}")]
    assert all(r[1] == I * H for r in vt.runs)


def test_chunk_splits_a_source_into_targets():
    conv = SimpleNamespace(source_patterns=["w13"], target_patterns=["gate", "up"], operations=[Chunk(dim=0)])
    out = _run_ops(conv, {"w13": [leaf("w", (6, 4))]}, "mlp.gate", SimpleNamespace(config=None))
    assert out["gate"].runs == [(0, 12, "w", 0)] and out["up"].runs == [(0, 12, "w", 12)]


def test_a_conversion_that_changes_bytes_is_refused_by_name():
    conv = SimpleNamespace(source_patterns=["w"], target_patterns=["t"], operations=[Transpose(dim0=0, dim1=1)])
    with pytest.raises(ModelLayoutError, match="Transpose"):
        _run_ops(conv, {"w": [leaf("w", (2, 3))]}, "x.t", SimpleNamespace(config=None))


def test_a_fused_moe_store_streams_exactly_and_checks_every_expert(tmp_path):
    import transformers

    path = make_family_model(str(tmp_path / "mixtral"), "mixtral")
    store = str(tmp_path / "mixtral.lts")
    convert(path, store)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.randint(1, 500, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    with stream_model(store, "64MiB", verify="always") as model, torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        g = model.llmtier.groups[0]
        assert len(g.checks) == 3 * 4  # gate, up and down of each of 4 experts, checked over their pieces
