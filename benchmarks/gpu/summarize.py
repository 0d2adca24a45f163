"""Summarize a GPU check: the sections' JSON -> gpu-check.json and gpu-check.md, with the issue's targets.

    python benchmarks/gpu/summarize.py WORK_DIR OUT_DIR

Targets (issue 11): SSD->GPU reads >= 0.95x the same engine's SSD->host and
>= 1.0x kvikio (tensors >= 64 MiB); weights from host DRAM >= 0.85 of the
bound and >= 4x accelerate's CPU offload; from the disk >= 0.85 of the disk
bound; tokens and logits equal; KV decode >= 0.85 of max(I/O, compute).
"""
from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Any


def _load(path: str) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _tests(work: str) -> dict[str, Any] | None:
    try:
        root = ET.parse(os.path.join(work, "tests.xml")).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed": failed}


def _io(doc: Any) -> dict[str, Any]:
    if not doc:
        return {}
    by = {(c["path"], c["op"], c["size_bytes"]): c["gib_per_s"] for c in doc["cells"]}
    out: dict[str, Any] = {"stand_in": bool(doc.get("stand_in"))}
    big = sorted({s for (p, op, s) in by if op == "read" and s >= 64 << 20})
    for s in big:
        ours, host, kv = by.get(("llmtier", "read", s)), by.get(("host", "read", s)), by.get(("kvikio", "read", s))
        out[f"read_{s >> 20}MiB_vs_host"] = ours / host if ours and host else None
        out[f"read_{s >> 20}MiB_vs_kvikio"] = ours / kv if ours and kv else None
    ratios = [v for k, v in out.items() if k.endswith("_vs_host") and v is not None]
    kv = [v for k, v in out.items() if k.endswith("_vs_kvikio") and v is not None]
    out["target_read_vs_host_0.95"] = bool(ratios) and min(ratios) >= 0.95
    out["target_read_vs_kvikio_1.0"] = (min(kv) >= 1.0) if kv else "kvikio not measured"
    return out


def _weights(doc: Any) -> dict[str, Any]:
    if not doc:
        return {}
    v = dict(doc.get("verdicts", {}))
    v["target_host_efficiency_0.85"] = (v.get("host_efficiency") or 0) >= 0.85
    v["target_host_vs_accelerate_cpu_4x"] = (v.get("host_vs_accelerate_cpu") or 0) >= 4
    v["target_disk_efficiency_0.85"] = (v.get("disk_efficiency") or 0) >= 0.85
    return v


def _kv(doc: Any) -> dict[str, Any]:
    if not doc or not doc.get("decode"):
        return {}
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
    from llmtier.bench.kv import KVBenchConfig, KVBenchResult, decode_summary  # noqa: PLC0415

    cfg_doc = {k: v for k, v in doc["config"].items() if k in KVBenchConfig.__dataclass_fields__}
    cfg = KVBenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_doc.items()})
    res = KVBenchResult(**{k: doc[k] for k in KVBenchResult.__dataclass_fields__ if k in doc})
    rows = decode_summary(res, cfg)
    tiered = [r for r in rows if r.get("fraction") is not None]
    return {"rows": rows, "tokens_identical": all(r["tokens_identical"] for r in rows),
            "target_efficiency_0.85": bool(tiered) and min(r["efficiency"] for r in tiered) >= 0.85}


def main(work: str, out: str) -> int:
    sections = []
    try:
        with open(os.path.join(work, "sections.jsonl")) as fh:
            sections = [json.loads(line) for line in fh if line.strip()]
    except OSError:
        pass
    io_doc, w_doc, kv_doc = (_load(os.path.join(work, n)) for n in ("io.json", "weights.json", "kv.json"))
    summary = {"sections": sections, "tests": _tests(work), "io": _io(io_doc), "weights": _weights(w_doc),
               "kv": _kv(kv_doc), "raw": {"io": io_doc, "weights": w_doc, "kv": kv_doc}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu-check.json"), "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    md = ["# llmtier GPU check", "", "| section | rc | seconds |", "|---|---|---|"]
    md += [f"| {s['section']} | {s['rc']} | {s['seconds']} |" for s in sections]
    md += ["", f"tests: {summary['tests']}", ""]
    if io_doc:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))
        from llmtier.bench.io_cuda import DeviceCell, format_table  # noqa: PLC0415

        cells = [DeviceCell(**{k: v for k, v in c.items() if k in DeviceCell.__dataclass_fields__}) for c in io_doc["cells"]]
        md += ["## SSD <-> GPU (bench io --device cuda)" + (" -- CPU STAND-IN, not a GPU" if io_doc.get("stand_in") else ""),
               "", format_table(cells, io_doc.get("notes", [])), ""]
    for name, part in (("io targets", summary["io"]), ("weights", summary["weights"]), ("kv", summary["kv"])):
        if part:
            md.append(f"## {name}")
            md += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in part.items() if k != "rows"]
            for r in part.get("rows", []):
                md.append(f"  - {r['system']} {r.get('fraction')}: {r['step_s']:.4f} s/step, efficiency "
                          f"{r.get('efficiency', float('nan')):.2f}, tokens identical {r['tokens_identical']}")
            md.append("")
    with open(os.path.join(out, "gpu-check.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
