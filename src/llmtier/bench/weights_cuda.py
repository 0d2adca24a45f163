"""``llmtier bench weights --device cuda``: weight streaming onto a GPU against its bounds and peers.

A TinyLlama-shaped model (random bf16 weights) runs greedy generation at
batch 1 in one process on the GPU, round by round:

* ``gpu``: the model fully in GPU memory -- the compute bound (time per token);
* ``llmtier-host``: a GPU budget holding about a third of the layers, the rest
  cached in pinned host memory and copied every pass;
* ``llmtier-disk``: the same GPU budget, the rest read from the disk through
  pinned slots, page cache dropped before the run;
* ``accelerate-cpu`` / ``accelerate-disk``: ``device_map="auto"`` with
  ``max_memory`` at the same GPU budget, the rest in CPU memory or in an
  ``offload_folder``.

Bounds measured in the same run: host-to-GPU copies from pinned memory
(GiB/s), the disk's direct-read bandwidth on the checkpoint file, and the
in-GPU time per token.  Efficiency of ``llmtier-host`` is
``1 / max(PCIe time, compute time)`` over its time per token, of
``llmtier-disk`` the disk time per token (streamed bytes / disk bandwidth)
over its time per token.  Every streamed run's tokens and logits are checked
against the in-GPU model's, bit for bit.
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any

from ..units import human

SYSTEMS = ("gpu", "llmtier-host", "llmtier-disk", "accelerate-cpu", "accelerate-disk")


def _h2d_gib_s(torch: Any, nbytes: int = 1 << 30) -> float:
    from ..engine.cuda import alloc_pinned  # noqa: PLC0415

    host = torch.from_numpy(alloc_pinned(nbytes))
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    rates = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(nbytes / (1 << 30) / (time.perf_counter() - t0))
    return statistics.median(rates)


def run_weights_cuda(directory: str, *, shape: tuple[int, ...] | None = None, resident_share: float = 1 / 3,
                     rounds: int = 3, new_tokens: int = 16, prompt_len: int = 32, batch: int = 1,
                     systems: tuple[str, ...] = SYSTEMS, progress: bool = True) -> dict[str, Any]:
    """Run the GPU weights study; a JSON-able dict of runs, bounds and verdicts."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from ..engine.cuda import require_cuda  # noqa: PLC0415
    from ..offload import stream_model  # noqa: PLC0415
    from ..offload.generate import generate_timed  # noqa: PLC0415
    from ..offload.layout import device_items, open_layout  # noqa: PLC0415
    from .store import Arch, ensure_checkpoint  # noqa: PLC0415
    from .system import drop_page_cache, engine_read_bw  # noqa: PLC0415
    from .weights import TINYLLAMA  # noqa: PLC0415

    require_cuda("bench weights --device cuda")
    ck = ensure_checkpoint(directory, Arch(*(shape or TINYLLAMA)), shard_bytes=8 << 30, progress=progress)
    model_dir = ck.hf_dir
    lay = open_layout(model_dir)
    try:
        n = len(lay.groups)
        slot = max(device_items(g)[1] for g in lay.groups)
        emb = lay.embedding_bytes
        budget = device_items(lay.outside)[1] + emb + (3 + round(n * resident_share)) * slot
        host_all = 2 * sum(g.nbytes for g in lay.groups)
    finally:
        lay.source.close()
    ids = torch.randint(0, 32000 if not shape else shape[2], (batch, prompt_len),
                        generator=torch.Generator().manual_seed(0)).cuda()
    out: dict[str, Any] = {"model": model_dir, "weights_bytes": ck.nbytes, "gpu_budget": budget, "batch": batch,
                           "new_tokens": new_tokens, "runs": {s: [] for s in systems}, "notes": []}
    out["h2d_gib_s"] = _h2d_gib_s(torch)
    out["disk_gib_s"] = []
    ref_tokens = ref_logits = None

    def timed(model: Any) -> dict[str, Any]:
        with torch.no_grad():
            logits = model(ids).logits
        t = generate_timed(model, ids, new_tokens)
        return {"tok_s": t.decode_tok_s, "s_per_token": 1 / t.decode_tok_s if t.decode_tok_s else None,
                "tokens": t.tokens, "logits": logits}

    for rnd in range(rounds):
        out["disk_gib_s"].append((engine_read_bw(ck.shards) or 0) / (1 << 30))
        for system in systems:
            r: dict[str, Any] = {"round": rnd}
            try:
                if system == "gpu":
                    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
                    r.update(timed(m))
                    ref_tokens, ref_logits = r["tokens"], r["logits"]
                elif system.startswith("llmtier"):
                    host = host_all if system == "llmtier-host" else None
                    if host is None:
                        drop_page_cache()
                    with stream_model(model_dir, budget, "cuda", host_memory=host) as m:
                        r.update(timed(m))
                        s, plan = m.llmtier.stats(), m.llmtier.plan
                        r.update(passes=s.passes, bytes_read=s.bytes_read, copied_bytes=s.copied_bytes,
                                 resident_layers=len(plan.resident), cached_layers=len(plan.cached),
                                 disk_layers=len(plan.from_disk), stall_s=s.stall_s,
                                 copied_per_pass=sum(m.llmtier.groups[i].data_bytes for i in plan.streamed),
                                 disk_per_pass=plan.disk_bytes_per_pass)
                    m = None
                else:
                    kw: dict[str, Any] = {"device_map": "auto",
                                          "max_memory": {0: budget, "cpu": (64 << 30) if system == "accelerate-cpu"
                                                         else (256 << 20)}}
                    if system == "accelerate-disk":
                        kw["offload_folder"] = os.path.join(directory, "accelerate-offload")
                        drop_page_cache()
                    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kw).eval()
                    where: dict[str, int] = {}
                    for v in m.hf_device_map.values():
                        where[str(v)] = where.get(str(v), 0) + 1
                    r["placement"] = where
                    r.update(timed(m))
                if ref_tokens is not None and system != "gpu":
                    r["tokens_equal"] = r["tokens"] == ref_tokens
                    r["logits_bitwise_equal"] = bool(torch.equal(r["logits"], ref_logits))
                r.pop("logits", None)
            except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, the study goes on
                r["error"] = f"{type(exc).__name__}: {exc}"[:500]
            m = None
            gc.collect()
            torch.cuda.empty_cache()
            out["runs"][system].append(r)
            if progress:
                print(f"round {rnd} {system}: " + (r.get("error") or f"{r.get('tok_s', 0):.2f} tok/s"), flush=True)
    return _verdicts(out)


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(xs) if xs else None


def _verdicts(out: dict[str, Any]) -> dict[str, Any]:
    runs = out["runs"]
    gib = 1 << 30
    compute = _median(runs.get("gpu", []), "s_per_token")
    v: dict[str, Any] = {"compute_s_per_token": compute}
    host = runs.get("llmtier-host", [])
    if host and compute:
        pcie = (_median(host, "copied_per_pass") or 0) / gib / out["h2d_gib_s"]
        t = _median(host, "s_per_token")
        v["host_pcie_s_per_token"] = pcie
        if t:
            v["host_efficiency"] = max(pcie, compute) / t
        acc = _median(runs.get("accelerate-cpu", []), "tok_s")
        if acc and t:
            v["host_vs_accelerate_cpu"] = (1 / t) / acc
    disk = runs.get("llmtier-disk", [])
    if disk and out["disk_gib_s"]:
        bound = (_median(disk, "disk_per_pass") or 0) / gib / statistics.median(out["disk_gib_s"])
        t = _median(disk, "s_per_token")
        v["disk_bound_s_per_token"] = bound
        if t:
            v["disk_efficiency"] = bound / t
    v["all_tokens_equal"] = all(r.get("tokens_equal", True) for s in ("llmtier-host", "llmtier-disk")
                                for r in runs.get(s, []))
    v["all_logits_bitwise_equal"] = all(r.get("logits_bitwise_equal", True) for s in ("llmtier-host", "llmtier-disk")
                                        for r in runs.get(s, []))
    out["verdicts"] = v
    return out


def format_report(out: dict[str, Any]) -> str:
    """Markdown: tok/s per system (median, min-max), the bounds and the efficiencies."""
    lines = [f"model {out['model']} ({human(out['weights_bytes'])}), GPU budget {human(out['gpu_budget'])}, "
             f"batch {out['batch']}, {out['new_tokens']} new tokens",
             f"pinned host->GPU {out['h2d_gib_s']:.1f} GiB/s; disk (direct reads of the checkpoint) "
             f"{', '.join(f'{x:.2f}' for x in out['disk_gib_s'])} GiB/s", "",
             "| system | tok/s median (min-max) | placement / tiers | tokens equal | logits bitwise |", "|---|---|---|---|---|"]
    for system, runs in out["runs"].items():
        ok = [r["tok_s"] for r in runs if r.get("tok_s")]
        errs = [r["error"] for r in runs if r.get("error")]
        tiers = runs[0].get("placement") if runs else None
        if runs and "resident_layers" in runs[0]:
            r0 = runs[0]
            tiers = f"{r0['resident_layers']} on GPU, {r0['cached_layers']} pinned host, {r0['disk_layers']} disk"
        cell = f"{statistics.median(ok):.2f} ({min(ok):.2f}-{max(ok):.2f})" if ok else f"error: {errs[0] if errs else '-'}"
        eq = {r.get("tokens_equal") for r in runs} - {None}
        lb = {r.get("logits_bitwise_equal") for r in runs} - {None}
        lines.append(f"| {system} | {cell} | {tiers or '-'} | {eq or '-'} | {lb or '-'} |")
    lines.append("")
    for k, x in out.get("verdicts", {}).items():
        lines.append(f"- {k}: {x:.3f}" if isinstance(x, float) else f"- {k}: {x}")
    return "\n".join(lines)


__all__ = ["SYSTEMS", "format_report", "run_weights_cuda"]
