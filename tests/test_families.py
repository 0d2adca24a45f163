"""The coverage matrix: every causal-LM family of bench.families streams with
bitwise-equal logits (weights at the least budget that streams), or is an
xfail whose reason names why (bench.families.LIMITS)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmtier.bench.families import FAMILIES, LIMITS, installed, make_family_model  # noqa: E402
from llmtier.offload import stream_model  # noqa: E402
from llmtier.offload.layout import open_layout  # noqa: E402


def _param(family: str, runtime: str):
    why = LIMITS.get((family, runtime))
    return pytest.param(family, marks=pytest.mark.xfail(reason=why, strict=True)) if why else family


def generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("family", [_param(f, "weights") for f in sorted(FAMILIES)])
def test_weights_stream_exactly(family, tmp_path):
    if not installed(family):
        pytest.skip(f"this transformers ({transformers.__version__}) has no {family}")
    path = make_family_model(str(tmp_path / family), family)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.randint(1, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    want = generate(ref, ids)
    lay = open_layout(path)
    least = lay.least_memory
    lay.source.close()
    with stream_model(path, least) as model:
        assert model.llmtier.plan.streamed, "the least budget must stream"
        got = generate(model, ids)
    assert torch.equal(got.sequences, want.sequences), f"{family}: tokens differ"
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert torch.equal(a, b), f"{family}: logits differ at step {step} by {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("family", [_param(f, "kv") for f in sorted(FAMILIES)])
def test_kv_tier_exactly(family, tmp_path):
    """Every layer's KV on SSD (``spill_all``): tokens and logits of transformers' ``DynamicCache``."""
    if not installed(family):
        pytest.skip(f"this transformers ({transformers.__version__}) has no {family}")
    from llmtier.offload.hfcompat import cache_kwargs
    from llmtier.offload.kv import TieredCache

    path = make_family_model(str(tmp_path / family), family)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ref.config.use_cache = ref.generation_config.use_cache = True  # mpt's config turns the cache off
    ids = torch.randint(1, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    want = generate(ref, ids)
    with TieredCache(ref.config, memory="64MiB", path=tmp_path / "kv", page_tokens=4, spill_all=True) as cache:
        got = generate(ref, ids, **cache_kwargs(cache))
        spilled = cache.stats().spilled_layers
    assert spilled > 0, "spill_all must put the layers on SSD"
    assert torch.equal(got.sequences, want.sequences), f"{family}: tokens differ"
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert torch.equal(a, b), f"{family}: logits differ at step {step} by {(a.float() - b.float()).abs().max()}"
