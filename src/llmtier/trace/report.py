"""``llmtier report RUN.trace -o DIR``: one self-contained HTML page and a Markdown summary.

The page embeds every plot as a PNG data URI (no network, no side files);
the Markdown states the findings in words (:func:`analysis.findings`) with
the key tables.  ``summary.json`` holds the same figures for scripts.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any

import numpy as np

from . import analysis as A

PLOT_CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot');
  var ok = 0;
  imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0) { ok += 1; } });
  document.body.setAttribute('data-plots', ok + '/' + imgs.length);
});
"""

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
img.plot { max-width: 100%; display: block; margin: 0.5em 0; }
.missing { color: #a40; } .meta { color: #666; font-size: 0.9em; }
"""


class ReportError(RuntimeError):
    """The report cannot be made (e.g. matplotlib is not installed)."""


def _pyplot() -> Any:
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency ([bench])

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as exc:
        raise ReportError("the report's plots need matplotlib: pip install 'llmtier[bench]'") from exc
    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _layers(trace: Any) -> list[str]:
    return [lay for lay in A.LAYERS if lay == "app" or trace.block]


LABEL = {"app": "application", "block": "block layer (device)"}


def plot_sizes(trace: Any) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    layers = _layers(trace)
    classes = sorted({int(k) for lay in layers for k in A.size_histogram(trace, lay)["size_class"]})
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(layers))
    for j, lay in enumerate(layers):
        h = A.size_histogram(trace, lay)
        idx = {int(k): i for i, k in enumerate(h["size_class"])}
        cnt = [h["count"][idx[c]] if c in idx else 0 for c in classes]
        byt = [h["bytes"][idx[c]] / 2**20 if c in idx else 0 for c in classes]
        axes[0].bar(x + j * width, cnt, width, label=LABEL[lay])
        axes[1].bar(x + j * width, byt, width, label=LABEL[lay])
    for ax, title in ((axes[0], "requests per size class"), (axes[1], "MiB per size class")):
        ax.set_xticks(x + width * (len(layers) - 1) / 2, [A.fmt_size(c) for c in classes], rotation=45, fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    return _png(fig)


def plot_bandwidth(trace: Any) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.2))
    for lay, style in zip(_layers(trace), ("-", "--"), strict=False):
        bw = A.bandwidth_timeline(trace, lay)
        ax.plot(bw["t_s"], bw["read_Bps"] / 1e6, style, label=f"{LABEL[lay]} read")
        ax.plot(bw["t_s"], bw["write_Bps"] / 1e6, style, label=f"{LABEL[lay]} write")
    ds = getattr(trace, "diskstats", None)
    if ds is not None and len(ds) >= 2:
        fields = trace.meta.get("diskstats_fields", [])
        if "read_sectors" in fields:
            t = (ds[1:, 0] - A.time_span(trace)[0]) / 1e9
            dt = np.diff(ds[:, 0]) / 1e9
            for f in ("read_sectors", "write_sectors"):
                col = 1 + fields.index(f)
                ax.plot(t, np.diff(ds[:, col]) * 512 / dt / 1e6, ":", label=f"/proc/diskstats {f.split('_')[0]}")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MB/s")
    ax.set_title("bandwidth over time")
    ax.legend(fontsize=8, ncol=3)
    return _png(fig)


def plot_heatmap(trace: Any) -> str:
    plt = _pyplot()
    lay = "block" if trace.block else "app"
    hm = A.offset_heatmap(trace, lay)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    oe = hm["offset_edges"] / 2**20
    im = ax.imshow(np.log10(1 + hm["bytes"]), aspect="auto", origin="lower", cmap="viridis",
                   extent=(hm["t_edges_s"][0], hm["t_edges_s"][-1], oe[0], oe[-1]))
    fig.colorbar(im, ax=ax, label="log10(1 + bytes)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("device offset (MiB)" if lay == "block" else "file offset, files end to end (MiB)")
    ax.set_title(f"where the {LABEL[lay]} I/O went over time")
    return _png(fig)


def plot_access_cdf(trace: Any) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    for lay in _layers(trace):
        cdf = A.access_cdf(trace, lay)
        u = A.uniformity(trace, lay)
        if len(cdf["accesses"]):
            ax.step(cdf["accesses"], cdf["fraction"], where="post", label=f"{LABEL[lay]} (Gini {u['gini']:.2f})")
    ax.set_xscale("log")
    ax.set_xlabel("accesses per 4 KiB block")
    ax.set_ylabel("fraction of blocks touched")
    ax.set_title("access-count CDF")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_latency(trace: Any) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    rows = [(lay, marker, row) for lay, marker in zip(_layers(trace), ("o", "s"), strict=False)
            for row in A.latency_percentiles(trace, lay)]
    rows = sorted(rows, key=lambda r: -r[2]["count"])[:10]  # the busiest classes; the table has them all
    for lay, marker, row in rows:
        qs = [row[f"p{q:g}"] for q in A.QUANTILES]
        ax.plot([f"p{q:g}" for q in A.QUANTILES], qs, marker=marker,
                label=f"{LABEL[lay][:5]} {row['op']} {A.fmt_size(row['size_class'])}")
    ax.set_yscale("log")
    ax.set_ylabel("µs")
    ax.set_title("latency percentiles, the 10 busiest size classes")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def plot_queue_depth(trace: Any) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3))
    for lay in _layers(trace):
        qd = A.queue_depth_timeline(trace, lay)
        ax.plot(qd["t_s"], qd["mean_qd"], label=LABEL[lay])
    ax.set_xlabel("seconds")
    ax.set_ylabel("requests in flight")
    ax.set_title("achieved queue depth (time-averaged per bin)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_tags(trace: Any, tags: list[dict[str, Any]]) -> str:
    plt = _pyplot()
    tags = tags[:15]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.6 + 0.35 * max(3, len(tags))))
    names = [t["tag"][:40] for t in tags][::-1]
    y = np.arange(len(names))
    axes[0].barh(y - 0.2, [t["read_bytes"] / 2**20 for t in tags][::-1], 0.4, label="read")
    axes[0].barh(y + 0.2, [t["write_bytes"] / 2**20 for t in tags][::-1], 0.4, label="written")
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].set_xlabel("MiB")
    axes[0].set_title("bytes per tag")
    axes[0].legend(fontsize=8)
    axes[1].barh(y, [t["busy_s"] for t in tags][::-1])
    axes[1].set_yticks(y, names, fontsize=8)
    axes[1].set_xlabel("seconds with I/O of this tag in flight")
    axes[1].set_title("time per tag")
    return _png(fig)


def _table(rows: list[list[Any]], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _md_table(rows: list[list[Any]], head: list[str]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _latency_rows(s: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for lay, d in s["layers"].items():
        for r in d["latency"]:
            rows.append([LABEL[lay], r["op"], A.fmt_size(r["size_class"]), f"{r['count']:,}",
                         *(f"{r[f'p{q:g}']:.0f}" for q in A.QUANTILES)])
    return rows


def _tag_rows(s: dict[str, Any]) -> list[list[Any]]:
    return [[t["tag"], f"{t['ops']:,}", A.fmt_size(t["read_bytes"]), A.fmt_size(t["write_bytes"]),
             f"{t['busy_s']:.3f}", A.fmt_size(t["block_bytes"]) if "block_bytes" in t else "-"]
            for t in s["tags"]]


def _volume_rows(s: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for lay, d in s["layers"].items():
        rw = d["rw"]
        rows.append([LABEL[lay], f"{d['requests']:,}", f"{rw['read_ops']:,}", A.fmt_size(rw["read_bytes"]),
                     f"{rw['write_ops']:,}", A.fmt_size(rw["write_bytes"]), f"{d['mean_queue_depth']:.1f}",
                     f"{d['uniformity']['gini']:.2f}"])
    return rows


VOLUME_HEAD = ["layer", "requests", "reads", "read", "writes", "written", "mean QD", "Gini"]
LATENCY_HEAD = ["layer", "op", "size class", "requests", *(f"p{q:g} µs" for q in A.QUANTILES)]
TAG_HEAD = ["tag", "ops", "read", "written", "busy s", "device bytes"]


def write_report(trace: Any, out_dir: str | os.PathLike[str], title: str | None = None) -> dict[str, Any]:
    """Write ``index.html``, ``summary.md`` and ``summary.json`` into ``out_dir``; their paths
    (keys ``html``, ``markdown``, ``json``) and the ``findings`` as sentences."""
    os.makedirs(out_dir, exist_ok=True)
    s = A.summarize(trace)
    facts = A.findings(trace, s)
    title = title or f"llmtier I/O report: {trace.meta.get('source', '')}".rstrip(": ")
    plots: list[tuple[str, str]] = [("Request sizes, application vs block layer", plot_sizes(trace)),
                                    ("Bandwidth over time", plot_bandwidth(trace))]
    if s["layers"]["app"]["requests"] or trace.block:
        plots += [("Offset over time", plot_heatmap(trace)), ("Access-count CDF", plot_access_cdf(trace)),
                  ("Latency percentiles", plot_latency(trace)), ("Queue depth over time", plot_queue_depth(trace))]
    if s["tags"]:
        plots.append(("Bytes and time per tag", plot_tags(trace, s["tags"])))
    meta = trace.meta
    info = (f"recorded {s['duration_s']:.2f} s; device {meta.get('device') or '?'}; "
            f"block devices {', '.join(meta.get('block_devices', [])) or 'none'}; backends "
            f"{', '.join(trace.backends) or 'none'}; {len(trace.files)} files")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style><script>{PLOT_CHECK_JS}</script></head><body>",
             f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(info)}</p>",
             "<h2>Findings</h2><ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>"]
    for m in s["missing"]:
        parts.append(f"<p class='missing'>Not recorded: {html.escape(m)}</p>")
    for m in s["notes"]:
        parts.append(f"<p class='meta'>Note: {html.escape(m)}</p>")
    parts.append("<h2>Volume</h2>" + _table(_volume_rows(s), VOLUME_HEAD))
    if _latency_rows(s):
        parts.append("<h2>Latency</h2>" + _table(_latency_rows(s), LATENCY_HEAD))
    if s["tags"]:
        parts.append("<h2>Tags</h2>" + _table(_tag_rows(s), TAG_HEAD))
    for name, png in plots:
        parts.append(f"<h2>{html.escape(name)}</h2><img class='plot' alt='{html.escape(name)}' "
                     f"src='data:image/png;base64,{png}'>")
    parts.append("</body></html>")
    paths = {"html": os.path.join(out_dir, "index.html"), "markdown": os.path.join(out_dir, "summary.md"),
             "json": os.path.join(out_dir, "summary.json")}
    _atomic_write(paths["html"], "\n".join(parts))
    md = [f"# {title}", "", info, "", "## Findings", ""] + [f"- {f}" for f in facts]
    if s["notes"]:
        md += ["", "Notes:", ""] + [f"- {n}" for n in s["notes"]]
    md += ["", "## Volume", "", _md_table(_volume_rows(s), VOLUME_HEAD)]
    if _latency_rows(s):
        md += ["", "## Latency", "", _md_table(_latency_rows(s), LATENCY_HEAD)]
    if s["tags"]:
        md += ["", "## Tags", "", _md_table(_tag_rows(s), TAG_HEAD)]
    _atomic_write(paths["markdown"], "\n".join(md) + "\n")
    _atomic_write(paths["json"], json.dumps(s, indent=1, default=_jsonable) + "\n")
    return {**paths, "findings": facts}


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
