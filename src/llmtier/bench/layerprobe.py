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
#: bytes of weights a cold probe cycles through, step by step: twice the development VM's 32 MiB L3, so that a step's
#: weights were evicted since they were last used (measured there: a resident MoE model's layers ran 7.9 ms per step
#: warm and 13.5 ms with the caches flushed before each layer; streamed, 12.0)
COLD_BYTES = 64 << 20
COLD_SETS = 64  # copies at most
PROBE_PROMPT = 256  # a longer prompt is probed at this length (attention's extra reads are the planner's KV term)
#: training steps of a memory probe (:func:`probe_train_memory`).  On the development VM a Mixtral-shaped model's
#: RSS growth beyond its weights at 200 steps was 90% (one layer) and 98% (four layers) of its growth at 300 steps
CREEP_STEPS = 200
#: fresh processes per memory probe, the largest peak kept: on the development VM one of five probes of the same
#: MoE model came out 20% below the others (the difference of two layers' figures multiplies such a miss)
PROBE_REPEATS = 2


def _growth(job: dict[str, Any], repeats: int) -> int | None:
    """The largest peak RSS growth of ``repeats`` runs of ``job`` in fresh processes (``bench.plan``'s children),
    beyond the process after its imports: as the child measured it (its peak reset after the imports), else its peak
    against a process that only imports (measured once); None when a run failed."""
    from .plan import base_bytes, run_child  # noqa: PLC0415

    grown, base = [], None
    for _ in range(max(1, repeats)):
        res = run_child(job, 8 << 30)
        if not res.get("ok"):
            return None
        if res.get("rss_job_growth") is None and base is None:
            base = base_bytes(job["dir"])
        grown.append(res["rss_job_growth"] if res.get("rss_job_growth") is not None else res["rss_peak"] - base)
    return max(grown)


def _whole(kept: list[int], layers: int) -> int | None:
    """The model's figure from its first layer's (``kept[0]``) and, where measured, its first two's: the one-layer
    figure plus the per-layer difference (never below 0) for each other layer.  None for a one-layer figure at or
    below zero: beneath the process and the model's own terms, a measurement gone wrong, not a figure."""
    if kept[0] <= 0:
        return None
    return kept[0] + (layers - 1) * max(0, kept[1] - kept[0]) if len(kept) > 1 else kept[0]


def _config(model: Any) -> Any:
    from transformers import AutoConfig, PretrainedConfig  # noqa: PLC0415

    if isinstance(model, PretrainedConfig):
        return copy.deepcopy(model)
    return AutoConfig.from_pretrained(model)


def _build(cfg: Any, layers: int, vocab: int | None = PROBE_VOCAB) -> Any:
    """The model of ``cfg`` with ``layers`` decoder layers (and a ``vocab``-entry vocabulary; None: its own), random
    weights."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    c = copy.deepcopy(cfg)
    c.num_hidden_layers = layers
    if vocab is not None:
        c.vocab_size = vocab
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


def _weight_sets(model: Any) -> tuple[list[Any], list[list[Any]]] | None:
    """The decoder layers' parameters of ``model`` and copies of them, enough that cycling through the copies step
    by step passes :data:`COLD_BYTES` (so a step finds its weights in no CPU cache, as a layer just read from the
    disk into a slot does); None when the layers alone pass it (their weights come from memory every step anyway)."""
    params = list(model.model.layers.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in params)
    if not nbytes or nbytes >= COLD_BYTES:
        return None
    k = min(COLD_SETS, -(-COLD_BYTES // nbytes))
    return params, [[p.detach().clone() for p in params] for _ in range(k)]


def _step_seconds(model: Any, batch: int, prompt: int, steps: int, sets: Any = None) -> float:
    """The median decode step of ``model`` after a prefill of ``prompt`` tokens (``sets``: from :func:`_weight_sets`,
    the layers' weights swapped for the next copy before every step, untimed)."""
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
        for k in range(steps):
            if sets is not None:
                for p, t in zip(sets[0], sets[1][k % len(sets[1])]):
                    p.data = t
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
    # the same with the layers' weights in no CPU cache, as a streamed layer's are (read by DMA into its slot)
    cold_s = layer_s
    sets_one, sets_many = _weight_sets(one), _weight_sets(many)
    if sets_many is not None and sets_one is not None:
        a, b = [], []
        for _ in range(3):
            a.append(_step_seconds(one, batch, prompt, steps, sets_one))
            b.append(_step_seconds(many, batch, prompt, steps, sets_many))
        cold_s = max(layer_s, (float(np.median(b)) - float(np.median(a))) / (PROBE_LAYERS - 1))
    nbytes = sum(p.numel() * p.element_size() for p in many.model.layers[1].parameters())
    return LayerTiming(layer_s, batch, prompt, f"a {human(nbytes)} decoder layer of the model, batch {batch}, "
                                              f"{prompt} tokens of context: {layer_s * 1e3:.3f} ms "
                                              f"({cold_s * 1e3:.3f} ms with its weights in no CPU cache)",
                       cold_layer_s=cold_s)


def probe_infer_memory(model: str, batch: int, prompt: int, new_tokens: int, directory: str, *,
                       repeats: int = PROBE_REPEATS, per_layer: bool = True) -> int | None:
    """What generating ``new_tokens`` after ``prompt`` tokens in ``batch`` sequences keeps beyond the process, the
    weights, the KV cache and the prefill term: the run overhead of *this* model at *this* workload.  For MoE
    models: on a CPU with oneDNN's bf16 kernels they keep 25-45 MiB more than the profile's probe (a small dense
    model) measures, for the kernels built for each shape their expert products take; for a long prefill of a
    narrow dense model, the allocator's slack beyond the prefill term (~4 KiB a token at hidden 128, batch 4;
    docs/BENCHMARKS.md).  Measured on the model's first layer and first two, built from its config with random
    weights and read from llmtier stores in ``directory`` (made once), resident, each in a fresh process
    (``repeats`` times, the largest peak kept); the full model's is the one-layer figure plus the per-layer
    difference for the others.  ``per_layer`` False (dense models, whose layers share their shapes and run one at a
    time): the first layer only, its figure the model's.  None when a probe failed or two layers would exceed
    :data:`MAX_PROBE_BYTES`."""
    import hashlib  # noqa: PLC0415
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    from ..plan import model_memory  # noqa: PLC0415
    from .moe_models import ensure_store  # noqa: PLC0415

    try:
        m = model_memory(model)
        cfg = _config(model)
    except Exception:  # noqa: BLE001 - a model the memory model cannot read is not probed
        return None
    layers = len(m.layers)
    if layers == 0 or 2 * max(m.layer_bytes) > MAX_PROBE_BYTES:
        return None
    tag = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    kept = []
    for n in (1, 2) if layers > 1 and per_layer else (1,):
        path = os.path.join(directory, f"probe-infer-{tag}-{n}")
        try:
            if not os.path.exists(os.path.join(path, "config.json")):
                _build(cfg, n, vocab=None).save_pretrained(path)
            store = ensure_store(path)
            mn = model_memory(store)
        except (ValueError, KeyError, TypeError, AttributeError, OSError, ImportError):
            return None
        job = {"kind": "infer", "model": store, "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "steps": 0,
               "weights_memory": 1 << 50, "kv_memory": 0, "kv_spill": False, "dir": directory}
        grown = _growth(job, repeats)
        if grown is None:
            return None
        kept.append(grown - mn.weight_bytes - mn.kv_bytes(batch, prompt + new_tokens)
                    - mn.prefill_activation_bytes(batch, prompt))
    return _whole(kept, layers)


def probe_train_memory(model: str, batch: int, seq: int, directory: str, *, steps: int = CREEP_STEPS,
                       repeats: int = PROBE_REPEATS) -> int | None:
    """What ``steps`` training steps of ``model`` (a checkpoint directory) at ``batch`` x ``seq`` keep beyond the
    process, its weights, gradients and optimizer buffers: activations, the allocator's and the kernels' workspaces.
    For MoE models: on a CPU with oneDNN's bf16 kernels their training memory climbs for a hundred or more steps
    (the expert products change shape with every routing and oneDNN keeps what it built for each shape) to several
    times what the activation formula counts (docs/BENCHMARKS.md, ``bench plan``), so the probe runs long enough
    to see most of that climb.  Measured as the planner's runs train (``OffloadedAdamW``, a small chunk budget),
    each in a fresh process (``repeats`` times, the largest peak kept): with the model's first layer, and with its
    first two; the full model's is the one-layer figure plus the per-layer difference for the others.  None when a
    probe failed or two layers would exceed :data:`MAX_PROBE_BYTES`."""
    from ..plan import model_memory  # noqa: PLC0415
    from ..plan.optim import BYTES_PER_ELEM  # noqa: PLC0415

    try:
        m = model_memory(model)
    except Exception:  # noqa: BLE001 - a model the memory model cannot read is not probed
        return None
    layers = len(m.layers)
    if layers == 0 or 2 * 2 * max(m.layer_bytes) > MAX_PROBE_BYTES:  # weights and gradients of two layers
        return None
    optim = BYTES_PER_ELEM * 65536
    kept = []
    for n in (1, 2) if layers > 1 else (1,):
        grown = _growth({"kind": "train", "model": model, "batch": batch, "prompt": seq, "steps": steps,
                         "layers": n, "dir": directory, "optim_memory": optim}, repeats)
        if grown is None:
            return None
        held = m.outside_bytes + m.embedding_bytes + sum(m.layer_bytes[:n])  # weights; gradients as many bytes
        kept.append(grown - 2 * held - optim)
    return _whole(kept, layers)


__all__ = ["CREEP_STEPS", "MAX_PROBE_BYTES", "PROBE_LAYERS", "PROBE_REPEATS", "LayerTiming", "probe_infer_memory",
           "probe_layer", "probe_train_memory"]
