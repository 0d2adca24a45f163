"""Time one decoder layer of *this* model at *this* workload: the planner's compute term for decode.

The device profile's CPU rates come from generic probes (a tiny Llama's layer
cost, a 4096x4096 product's rate); a real layer at its own widths runs other
kernels (oneDNN picks them by shape), and a MoE layer adds its router and
expert dispatch.  On the development VM the generic terms predicted a
resident decode step 28-44% too fast (docs/BENCHMARKS.md, ``bench plan``).
This probe builds the model's own architecture from its config with random
weights, twice: with one and with :data:`PROBE_LAYERS` decoder layers (vocabulary shrunk, so
the head costs nothing), runs decode steps after a prefill of the workload's
batch and prompt, and takes the difference per layer: the seconds one decoder layer
adds to a decode step, weights, attention over the cache and Python
dispatch included.  It skips models whose probe layers would not fit in
:data:`MAX_PROBE_BYTES` (the planner then falls back to the profile's terms).
"""
from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np

from ..plan.profile import LayerTiming
from ..units import human

MAX_PROBE_BYTES = 1 << 30  # the probe's decoder layers are not built beyond this many bytes of weights
PROBE_LAYERS = 4  # against one: the difference of 3 layers (of 1, a MoE layer's swings with its routing)
PROBE_VOCAB = 256
PROBE_PROMPT = 256  # a longer prompt is probed at this length (attention's extra reads are the planner's KV term)


def _config(model: Any) -> Any:
    from transformers import AutoConfig, PretrainedConfig  # noqa: PLC0415

    if isinstance(model, PretrainedConfig):
        return copy.deepcopy(model)
    return AutoConfig.from_pretrained(model)


def _build(cfg: Any, layers: int) -> Any:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    c = copy.deepcopy(cfg)
    c.num_hidden_layers = layers
    c.vocab_size = PROBE_VOCAB
    if getattr(c, "first_k_dense_replace", None):  # DeepSeek-style: the probe's layers MoE, as the model's mostly are
        c.first_k_dense_replace = 0
    if getattr(c, "layer_types", None):
        c.layer_types = list(c.layer_types)[:layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)  # random weights, no denormals or NaN in uninitialised memory
        for b in model.buffers():  # rotary tables and the like, lost by to_empty: zeros time the same as their values
            b.zero_()
    return model


def _step_seconds(model: Any, batch: int, prompt: int, steps: int) -> float:
    import torch  # noqa: PLC0415
    from transformers import DynamicCache  # noqa: PLC0415

    from ..offload.hfcompat import cache_kwargs  # noqa: PLC0415

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, PROBE_VOCAB, (batch, prompt), generator=g)
    times = []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(ids, use_cache=True, **cache_kwargs(cache, model))
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(nxt, use_cache=True, **cache_kwargs(cache, model))
            times.append(time.perf_counter() - t0)
            nxt = out.logits[:, -1:].argmax(-1)
    return float(np.median(times[1:]))


def probe_layer(model: Any, batch: int, context: int, *, steps: int = 24, weight_bytes: int | None = None) -> LayerTiming | None:
    """Time a decoder layer of ``model`` (a config or a checkpoint directory) decoding ``batch`` sequences after
    ``context`` tokens; None when the probe would build more than :data:`MAX_PROBE_BYTES` of weights (``weight_bytes``:
    one layer's bytes, from the memory model) or the architecture cannot be built from its config."""
    if weight_bytes is not None and PROBE_LAYERS * weight_bytes > MAX_PROBE_BYTES:
        return None
    try:
        cfg = _config(model)
        prompt = max(1, min(context, PROBE_PROMPT))
        one, many = _build(cfg, 1), _build(cfg, PROBE_LAYERS)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, ImportError):
        return None
    _step_seconds(one, batch, prompt, 3)  # warm the kernels of these shapes
    a, b = [], []
    for _ in range(3):  # alternate, so a slow moment of the machine hits both
        a.append(_step_seconds(one, batch, prompt, steps))
        b.append(_step_seconds(many, batch, prompt, steps))
    layer_s = max(0.0, float(np.median(b)) - float(np.median(a))) / (PROBE_LAYERS - 1)
    nbytes = sum(p.numel() * p.element_size() for p in many.model.layers[1].parameters())
    return LayerTiming(layer_s, batch, prompt, f"a {human(nbytes)} decoder layer of the model, batch {batch}, "
                                              f"{prompt} tokens of context: {layer_s * 1e3:.3f} ms")


__all__ = ["MAX_PROBE_BYTES", "PROBE_LAYERS", "LayerTiming", "probe_layer"]
