"""Expert access skew from a trace of a MoE model streamed by experts.

Expert streaming (:mod:`llmtier.offload.moe`) tags each expert's reads
``weights:<layer path>.experts.<e>`` (``weights:model.layers.3.mlp.experts.17``).
From those tags alone this module tells which experts were read and how
often: bytes per (layer, expert), the Gini coefficient of those bytes over
every expert read at least once, the hottest experts, and the expert bytes
read per tenth of the run (misses fall as the cache warms).  Experts that were
hits cause no I/O and are not in a trace: the cache's hit rate is in
``model.llmtier.stats()``.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from .block import OP_READ

_TAG = re.compile(r"layers\.(\d+)\..*experts\.(\d+)$")


def gini(values: Any) -> float:
    """Gini coefficient of non-negative ``values`` (0: all equal; towards 1: one takes all)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = len(x), float(x.sum())
    if n == 0 or total == 0:
        return 0.0
    return float(((2 * np.arange(n) - n + 1) * x).sum() / (n * total))


def expert_skew(trace: Any, buckets: int = 10, top: int = 5) -> dict[str, Any] | None:
    """Per-expert read bytes of ``trace`` (None when no request carries an expert tag)."""
    app = trace.app
    if not len(app["tag"]):
        return None
    ids: dict[int, tuple[int, int]] = {}
    for t, name in enumerate(trace.tags):
        m = _TAG.search(name or "")
        if m:
            ids[t] = (int(m.group(1)), int(m.group(2)))
    if not ids:
        return None
    sel = np.isin(app["tag"], list(ids)) & (app["op"] == OP_READ)
    if not sel.any():
        return None
    tags, sizes, when = app["tag"][sel], app["size"][sel].astype(np.int64), app["submit_ns"][sel]
    per: dict[tuple[int, int], int] = {}
    for t in np.unique(tags):
        per[ids[int(t)]] = int(sizes[tags == t].sum())
    layers = sorted({k[0] for k in per})
    per_layer = {}
    for layer in layers:
        mine = [v for (lay, _), v in per.items() if lay == layer]
        per_layer[layer] = {"experts_read": len(mine), "bytes": sum(mine), "gini": gini(mine)}
    edges = np.linspace(when.min(), when.max() + 1, buckets + 1)
    timeline = np.histogram(when, bins=edges, weights=sizes)[0].astype(np.int64).tolist()
    hottest = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    return {"experts_read": len(per), "bytes": int(sizes.sum()), "gini": gini(list(per.values())),
            "hottest": [{"layer": lay, "expert": e, "bytes": b} for (lay, e), b in hottest],
            "per_layer": per_layer, "timeline_bytes": timeline,
            "timeline_s": float((when.max() - when.min()) / 1e9)}


def expert_findings(skew: dict[str, Any] | None, fmt_size: Any) -> list[str]:
    """The skew as sentences for the report."""
    if not skew:
        return []
    hot = ", ".join(f"layer {h['layer']} expert {h['expert']} ({fmt_size(h['bytes'])})" for h in skew["hottest"][:3])
    tl = skew["timeline_bytes"]
    first, last = tl[0], tl[-1]
    return [f"Expert reads: {skew['experts_read']} experts read, {fmt_size(skew['bytes'])} in all; skew of the "
            f"bytes per expert Gini {skew['gini']:.2f}; most read: {hot}. Expert bytes per tenth of the run went "
            f"from {fmt_size(first)} to {fmt_size(last)} (hits cause no reads: the hit rate is in stats())."]


__all__ = ["expert_findings", "expert_skew", "gini"]
