"""Figures from a trace: what I/O happened, how big, where, how fast, for which tensor.

Every function takes a :class:`~llmtier.trace.recorder.Trace` (or anything
with the same ``app`` / ``block`` / ``extents`` / ``tags`` attributes) and a
``layer``: ``"app"`` (the engine's operations) or ``"block"`` (the requests
the disk was issued).  Results are plain numpy arrays and dicts, so the
report, a notebook and the tests all use the same numbers.

Conventions: sizes in bytes; times in nanoseconds on the trace's monotonic
clock unless a name says ``_s``; "size class" is the smallest power of two
at or above a request's size (a 1016 KiB request is in the 1 MiB class).
Block rows of flushes (size 0) count as requests but move no bytes.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .block import OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE

LAYERS = ("app", "block")
QUANTILES = (50.0, 90.0, 99.0, 99.9)


def columns(trace: Any, layer: str) -> dict[str, np.ndarray]:
    """The columns of ``layer``; ValueError if the trace has no such layer."""
    if layer == "app":
        return trace.app
    if layer == "block":
        if not trace.block:
            raise ValueError("this trace has no block-layer records (see its meta['missing'])")
        return trace.block
    raise ValueError(f"layer must be 'app' or 'block', not {layer!r}")


def _data_rows(c: dict[str, np.ndarray]) -> np.ndarray:
    """Rows that move data: reads and writes (not flushes or discards)."""
    return (c["op"] == OP_READ) | (c["op"] == OP_WRITE)


def size_class(sizes: np.ndarray) -> np.ndarray:
    """The power of two at or above each size (0 stays 0)."""
    s = np.asarray(sizes, dtype=np.int64)
    out = np.zeros_like(s)
    pos = s > 0
    out[pos] = 1 << np.ceil(np.log2(s[pos])).astype(np.int64)
    return out


def fmt_size(n: float) -> str:
    """``4096`` → ``"4 KiB"``; ``1040384`` → ``"1016 KiB"``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# -- volume ----------------------------------------------------------------------------------------

def size_histogram(trace: Any, layer: str, op: str | None = None) -> dict[str, np.ndarray]:
    """Requests and bytes per size class: ``{"size_class", "count", "bytes"}`` sorted by class.
    ``op``: ``"read"``, ``"write"`` or None for both (data rows only)."""
    c = columns(trace, layer)
    keep = _data_rows(c)
    if op is not None:
        keep &= c["op"] == (OP_READ if op == "read" else OP_WRITE)
    cls = size_class(c["size"][keep])
    classes, inv = np.unique(cls, return_inverse=True)
    return {"size_class": classes, "count": np.bincount(inv, minlength=len(classes)).astype(np.int64),
            "bytes": np.bincount(inv, weights=c["size"][keep], minlength=len(classes)).astype(np.int64)}


def exact_sizes(trace: Any, layer: str, top: int = 5) -> list[tuple[int, int, int]]:
    """The ``top`` most frequent exact request sizes: ``(size, count, bytes)``, by count."""
    c = columns(trace, layer)
    s = c["size"][_data_rows(c)]
    if len(s) == 0:
        return []
    sizes, counts = np.unique(s, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    return [(int(sizes[i]), int(counts[i]), int(sizes[i] * counts[i])) for i in order]


def rw_summary(trace: Any, layer: str) -> dict[str, Any]:
    """Read and write operations and bytes, and the read:write byte ratio (None with no writes)."""
    c = columns(trace, layer)
    r, w = c["op"] == OP_READ, c["op"] == OP_WRITE
    rb, wb = int(c["size"][r].sum()), int(c["size"][w].sum())
    out = {"read_ops": int(r.sum()), "write_ops": int(w.sum()), "read_bytes": rb, "write_bytes": wb,
           "ratio": (rb / wb) if wb else None}  # None: no writes (JSON null, not Infinity)
    if layer == "block":
        out["flushes"] = int((c["op"] == OP_FLUSH).sum())
        out["discard_bytes"] = int(c["size"][c["op"] == OP_DISCARD].sum())
        out["errors"] = int((c["error"] != 0).sum())
    else:
        out["errors"] = int((c["result"] < 0).sum())
    return out


# -- time ------------------------------------------------------------------------------------------

def time_span(trace: Any) -> tuple[int, int]:
    """``(start_ns, end_ns)`` of the recording (from meta; else from the rows)."""
    if "start_ns" in trace.meta and "end_ns" in trace.meta:
        return int(trace.meta["start_ns"]), int(trace.meta["end_ns"])
    times = [trace.app["submit_ns"], trace.app["complete_ns"]]
    if trace.block:
        times += [trace.block["submit_ns"], trace.block["complete_ns"][trace.block["complete_ns"] >= 0]]
    allt = np.concatenate(times) if times else np.empty(0)
    return (int(allt.min()), int(allt.max())) if len(allt) else (0, 1)


def auto_bin_ns(trace: Any, bins: int = 200, minimum_ns: int = 1_000_000) -> int:
    """A bin width giving about ``bins`` bins over the recording, at least ``minimum_ns``."""
    t0, t1 = time_span(trace)
    return max(minimum_ns, (t1 - t0 + bins - 1) // bins)


def _edges(trace: Any, bin_ns: int) -> np.ndarray:
    t0, t1 = time_span(trace)
    n = max(1, -(-(t1 - t0) // bin_ns))
    return t0 + bin_ns * np.arange(n + 1, dtype=np.int64)


def bandwidth_timeline(trace: Any, layer: str, bin_ns: int | None = None) -> dict[str, np.ndarray]:
    """Bytes per second read and written in each time bin, a request counted
    in the bin where it completed.  ``{"t_s", "read_Bps", "write_Bps", "bin_s"}``
    with ``t_s`` the bin starts relative to the recording's start."""
    c = columns(trace, layer)
    bin_ns = bin_ns or auto_bin_ns(trace)
    edges = _edges(trace, bin_ns)
    done = c["complete_ns"] >= 0
    out: dict[str, np.ndarray] = {"t_s": (edges[:-1] - edges[0]) / 1e9, "bin_s": np.array(bin_ns / 1e9)}
    for name, code in (("read_Bps", OP_READ), ("write_Bps", OP_WRITE)):
        sel = done & (c["op"] == code)
        idx = np.clip(np.searchsorted(edges, c["complete_ns"][sel], side="right") - 1, 0, len(edges) - 2)
        out[name] = np.bincount(idx, weights=c["size"][sel], minlength=len(edges) - 1) / (bin_ns / 1e9)
    return out


def _in_flight_per_bin(submit: np.ndarray, complete: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """For each bin [edges[k], edges[k+1]): the integral of the number of requests in flight
    (ns·requests). A sweep over the piecewise-constant in-flight count: no large
    cumulative sums, so long traces keep their precision."""
    lo, hi = edges[0], edges[-1]
    s, c = np.clip(submit, lo, hi), np.clip(complete, lo, hi)
    t = np.concatenate([s, c, edges])
    d = np.concatenate([np.ones(len(s), dtype=np.int64), -np.ones(len(c), dtype=np.int64),
                        np.zeros(len(edges), dtype=np.int64)])
    order = np.argsort(t, kind="stable")
    t, d = t[order], d[order]
    count = np.cumsum(d)[:-1]  # in flight on [t[i], t[i+1])
    length = np.diff(t)
    k = np.clip(np.searchsorted(edges, t[:-1], side="right") - 1, 0, len(edges) - 2)
    return np.bincount(k, weights=(count * length).astype(np.float64), minlength=len(edges) - 1)


def queue_depth_timeline(trace: Any, layer: str, bin_ns: int | None = None) -> dict[str, np.ndarray]:
    """Time-averaged number of requests in flight in each bin (requests with
    no completion seen count until the end).  ``{"t_s", "mean_qd", "bin_s"}``."""
    c = columns(trace, layer)
    bin_ns = bin_ns or auto_bin_ns(trace)
    edges = _edges(trace, bin_ns)
    comp = np.where(c["complete_ns"] >= 0, c["complete_ns"], edges[-1])
    per_bin = _in_flight_per_bin(c["submit_ns"], comp, edges)
    return {"t_s": (edges[:-1] - edges[0]) / 1e9, "mean_qd": per_bin / bin_ns, "bin_s": np.array(bin_ns / 1e9)}


def mean_queue_depth(trace: Any, layer: str) -> float:
    """Average requests in flight while at least one was (the depth the device was offered)."""
    c = columns(trace, layer)
    ok = c["complete_ns"] >= 0
    s, e = c["submit_ns"][ok], c["complete_ns"][ok]
    if len(s) == 0:
        return 0.0
    busy = _union_ns(s, e)
    return float((e - s).sum() / busy) if busy else 0.0


def _union_ns(start: np.ndarray, end: np.ndarray) -> int:
    """Length of the union of intervals [start, end)."""
    if len(start) == 0:
        return 0
    order = np.argsort(start, kind="stable")
    _, lengths = _merge_intervals(start[order], end[order])
    return int(lengths.sum())


def nearest_rank(values: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    """The smallest value at or below which at least q% of ``values`` lie, for each q
    (nearest-rank percentile; exact, no interpolation)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    ranks = [min(n, max(1, int(np.ceil(round(q * n / 100.0, 9))))) for q in quantiles]
    return np.array([v[r - 1] for r in ranks])


def latency_percentiles(trace: Any, layer: str, quantiles: tuple[float, ...] = QUANTILES,
                        op: str | None = None) -> list[dict[str, Any]]:
    """Per size class and op: count and latency percentiles in microseconds
    (``p50``…: the smallest latency that at least that share of requests met)."""
    c = columns(trace, layer)
    keep = _data_rows(c) & (c["complete_ns"] >= 0)
    if op is not None:
        keep &= c["op"] == (OP_READ if op == "read" else OP_WRITE)
    lat = (c["complete_ns"] - c["submit_ns"])[keep] / 1e3
    cls = size_class(c["size"][keep])
    ops = c["op"][keep]
    rows = []
    for o in np.unique(ops):
        for k in np.unique(cls[ops == o]):
            sel = (ops == o) & (cls == k)
            p = nearest_rank(lat[sel], quantiles)
            row: dict[str, Any] = {"op": "read" if o == OP_READ else "write", "size_class": int(k),
                                   "count": int(sel.sum()), "mean_us": float(lat[sel].mean())}
            row.update({f"p{q:g}": float(v) for q, v in zip(quantiles, p, strict=True)})
            rows.append(row)
    return rows


# -- space -----------------------------------------------------------------------------------------

def _file_bases(app: dict[str, np.ndarray], block: int) -> np.ndarray:
    """Start of each file in one concatenated address space, in ``block`` units."""
    if len(app["file"]) == 0:
        return np.zeros(1, dtype=np.int64)
    nfiles = int(app["file"].max()) + 1
    ends = np.zeros(nfiles, dtype=np.int64)
    np.maximum.at(ends, app["file"].astype(np.int64), -(-(app["offset"] + app["size"]) // block))
    return np.concatenate([[0], np.cumsum(ends)])


def address_ranges(trace: Any, layer: str, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Data requests as ``[first, last+1)`` ranges of ``block``-sized units: device
    addresses for the block layer; for the application layer, the traced files
    laid end to end in the order they were first used."""
    c = columns(trace, layer)
    keep = _data_rows(c)
    off, size = c["offset"][keep], c["size"][keep]
    first = off // block
    last = -(-(off + size) // block)
    if layer == "app":
        base = _file_bases(c, block)
        f = c["file"][keep].astype(np.int64)
        first, last = first + base[f], last + base[f]
    return first, last


def access_counts(trace: Any, layer: str, block: int = 4096) -> dict[str, np.ndarray]:
    """How many times each ``block``-sized unit touched was accessed, as a
    histogram: ``{"accesses": distinct counts ascending, "blocks": units with that count}``."""
    first, last = address_ranges(trace, layer, block)
    keep = last > first
    first, last = first[keep], last[keep]
    if len(first) == 0:
        return {"accesses": np.empty(0, dtype=np.int64), "blocks": np.empty(0, dtype=np.int64)}
    pts = np.concatenate([first, last])
    delta = np.concatenate([np.ones(len(first), dtype=np.int64), -np.ones(len(last), dtype=np.int64)])
    order = np.argsort(pts, kind="stable")
    pts, delta = pts[order], delta[order]
    cover = np.cumsum(delta)[:-1]
    length = np.diff(pts)
    sel = (length > 0) & (cover > 0)
    acc, inv = np.unique(cover[sel], return_inverse=True)
    return {"accesses": acc.astype(np.int64), "blocks": np.bincount(inv, weights=length[sel]).astype(np.int64)}


def access_cdf(trace: Any, layer: str, block: int = 4096) -> dict[str, np.ndarray]:
    """``{"accesses", "fraction"}``: fraction of touched units accessed at most that many times."""
    h = access_counts(trace, layer, block)
    total = h["blocks"].sum()
    return {"accesses": h["accesses"], "fraction": np.cumsum(h["blocks"]) / total if total else h["blocks"] * 0.0}


def gini(values: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Gini coefficient of non-negative ``values`` (each repeated ``weights`` times):
    0 when all are equal, towards 1 when a few hold everything."""
    v = np.asarray(values, dtype=np.float64)
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(v) == 0 or w.sum() == 0 or (v * w).sum() == 0:
        return 0.0
    order = np.argsort(v, kind="stable")
    v, w = v[order], w[order]
    pop = np.concatenate([[0.0], np.cumsum(w) / w.sum()])
    share = np.concatenate([[0.0], np.cumsum(v * w) / (v * w).sum()])
    return float(1.0 - np.sum(np.diff(pop) * (share[1:] + share[:-1])))


def uniformity(trace: Any, layer: str, block: int = 4096) -> dict[str, float]:
    """``{"gini", "blocks", "accesses", "top10_share", "reuse"}``: Gini of per-unit
    access counts over the units touched, the share of accesses that went to the
    most-accessed 10% of units, and accesses per unit touched."""
    h = access_counts(trace, layer, block)
    acc, blocks = h["accesses"], h["blocks"]
    nb, na = int(blocks.sum()), int((acc * blocks).sum())
    if nb == 0:
        return {"gini": 0.0, "blocks": 0, "accesses": 0, "top10_share": 0.0, "reuse": 0.0}
    # hottest 10% of units: walk the histogram from the top
    want = max(1, round(nb * 0.1))
    got, hot = 0, 0
    for a, b in zip(acc[::-1], blocks[::-1], strict=True):
        take = min(int(b), want - got)
        got += take
        hot += take * int(a)
        if got >= want:
            break
    return {"gini": gini(acc, blocks), "blocks": nb, "accesses": na, "top10_share": hot / na, "reuse": na / nb}


def sequential_share(trace: Any, layer: str) -> float:
    """Share of data requests (by bytes) that start where the previous request of
    the same file (app) or device (block) and the same op ended."""
    c = columns(trace, layer)
    keep = _data_rows(c)
    if not keep.any():
        return 0.0
    key = (c["file"] if layer == "app" else c["dev"])[keep].astype(np.int64) * 2 + c["op"][keep]
    order = np.lexsort((c["submit_ns"][keep], key))
    k, off, size = key[order], c["offset"][keep][order], c["size"][keep][order]
    follows = np.zeros(len(k), dtype=bool)
    follows[1:] = (k[1:] == k[:-1]) & (off[1:] == off[:-1] + size[:-1])
    return float(size[follows].sum() / size.sum()) if size.sum() else 0.0


def offset_heatmap(trace: Any, layer: str, time_bins: int = 120, offset_bins: int = 100) -> dict[str, np.ndarray]:
    """Bytes by (address, time): ``{"bytes"[offset_bins, time_bins], "t_edges_s", "offset_edges"}``
    — addresses as in :func:`address_ranges` (bytes), times relative to the start."""
    c = columns(trace, layer)
    keep = _data_rows(c)
    first, _ = address_ranges(trace, layer, 1)
    t = c["submit_ns"][keep]
    t0, t1 = time_span(trace)
    lo, hi = (int(first.min()), int(first.max()) + 1) if len(first) else (0, 1)
    h, oe, te = np.histogram2d(first, t, bins=[offset_bins, time_bins], range=[[lo, hi], [t0, max(t1, t0 + 1)]],
                               weights=c["size"][keep])
    return {"bytes": h, "offset_edges": oe, "t_edges_s": (te - t0) / 1e9}


# -- tying block requests to files and tags --------------------------------------------------------

def attribute_block(trace: Any) -> dict[str, Any]:
    """Tie block requests to the traced files (through the files' extents) and
    to the tags of the application requests that covered those file bytes.

    Returns ``{"file": index per block row (-1: not a traced file), "file_offset",
    "tag": tag index (-1 unknown), "bytes_on_files": read/write bytes of the
    block rows that fall inside traced files' extents, by op}``."""
    blk = columns(trace, "block")
    n = len(blk["size"])
    f_out = np.full(n, -1, dtype=np.int64)
    fo_out = np.full(n, -1, dtype=np.int64)
    tag_out = np.full(n, -1, dtype=np.int64)
    ex = np.asarray(trace.extents, dtype=np.int64).reshape(-1, 4)
    by_op = {"read": 0, "write": 0}
    if len(ex) == 0 or n == 0:
        return {"file": f_out, "file_offset": fo_out, "tag": tag_out, "bytes_on_files": by_op}
    ex = ex[np.argsort(ex[:, 2], kind="stable")]
    dev_start, length = ex[:, 2], ex[:, 3]
    # the union of the extents on the device (snapshots of a growing file overlap)
    u_start, u_len = _merge_intervals(dev_start, dev_start + length)
    cum = np.concatenate([[0], np.cumsum(u_len)])

    def covered(x: np.ndarray) -> np.ndarray:
        """Bytes of the union below device offset x; bytes of [a, b) inside it = C(b) - C(a)."""
        k = np.searchsorted(u_start, x, side="right") - 1
        kk = np.clip(k, 0, len(u_start) - 1)
        inside = np.clip(x - u_start[kk], 0, u_len[kk])
        return np.where(k >= 0, cum[kk] + inside, 0)

    off, size = blk["offset"], blk["size"]
    on = covered(off + size) - covered(off)
    for name, code in (("read", OP_READ), ("write", OP_WRITE)):
        by_op[name] = int(on[blk["op"] == code].sum())
    k = np.searchsorted(dev_start, off, side="right") - 1
    kk = np.clip(k, 0, len(dev_start) - 1)
    hit = (k >= 0) & (off < dev_start[kk] + length[kk]) & _data_rows(blk)
    f_out[hit] = ex[kk[hit], 0]
    fo_out[hit] = ex[kk[hit], 1] + off[hit] - dev_start[kk[hit]]
    app = trace.app
    for f in np.unique(f_out[hit]):
        sel = np.flatnonzero(f_out == f)
        for code in (OP_READ, OP_WRITE):
            sub = sel[blk["op"][sel] == code]
            tag_out[sub] = _tags_at(app, int(f), fo_out[sub], blk["submit_ns"][sub], op=code)
    return {"file": f_out, "file_offset": fo_out, "tag": tag_out, "bytes_on_files": by_op}


def _merge_intervals(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, disjoint ``(starts, lengths)`` covering the union of [start, end) (start sorted)."""
    if len(start) == 0:
        return start, start
    run_end = np.maximum.accumulate(end)
    new = np.empty(len(start), dtype=bool)
    new[0] = True
    new[1:] = start[1:] > run_end[:-1]
    grp = np.cumsum(new) - 1
    g_end = np.zeros(int(grp[-1]) + 1, dtype=np.int64)
    np.maximum.at(g_end, grp, end)
    return start[new], g_end - start[new]


def _tags_at(app: dict[str, np.ndarray], file: int, offsets: np.ndarray, times: np.ndarray, op: int,
             depth: int = 64, slack_ns: int = 2_000) -> np.ndarray:
    """Tag index of the application request behind each block request of ``file``.

    First choice: an application request covering the offset that was in
    flight when the block request was issued (direct I/O: one of the last
    ``depth`` submitted; ``slack_ns`` absorbs ftrace's microsecond
    timestamps).  Otherwise (buffered I/O, written back or read ahead
    later): the request of the same op that last covered that offset.  -1 when none did."""
    mine = np.flatnonzero((app["file"] == file) & (app["op"] == op))
    out = np.full(len(offsets), -1, dtype=np.int64)
    if len(mine) == 0:
        return out
    mine = mine[np.argsort(app["submit_ns"][mine], kind="stable")]
    sub, comp = app["submit_ns"][mine], app["complete_ns"][mine]
    off, end, tag = app["offset"][mine], (app["offset"] + app["size"])[mine], app["tag"][mine].astype(np.int64)
    k = np.searchsorted(sub, times + slack_ns, side="right") - 1
    todo = np.ones(len(offsets), dtype=bool)
    for d in range(depth):
        cand = k - d
        valid = todo & (cand >= 0)
        if not valid.any():
            break
        c = np.clip(cand, 0, None)
        hit = valid & (off[c] <= offsets) & (offsets < end[c]) & (times <= comp[c] + slack_ns)
        out[hit] = tag[c[hit]]
        todo &= ~hit
    if todo.any():
        out[todo] = _last_cover(off, end, tag, offsets[todo])
    return out


def _last_cover(off: np.ndarray, end: np.ndarray, tag: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Tag of the interval (in time order) that last covered each offset; -1 none."""
    key = np.stack([off, end, tag], axis=1)
    _, last = np.unique(key[::-1], axis=0, return_index=True)
    keep = np.sort(len(key) - 1 - last)  # one paint per distinct interval, in order of last use
    off, end, tag = off[keep], end[keep], tag[keep]
    bp = np.unique(np.concatenate([off, end]))
    seg = np.full(max(len(bp) - 1, 1), -1, dtype=np.int64)
    for a, b, t in zip(np.searchsorted(bp, off).tolist(), np.searchsorted(bp, end).tolist(), tag.tolist(),
                       strict=True):
        seg[a:b] = t
    j = np.searchsorted(bp, offsets, side="right") - 1
    ok = (j >= 0) & (j < len(bp) - 1)
    return np.where(ok, seg[np.clip(j, 0, len(seg) - 1)], -1)


# -- per tag ---------------------------------------------------------------------------------------

def tag_label(trace: Any, t: int) -> str:
    if t < 0:
        return "(not in traced files)"
    name = trace.tags[t] if t < len(trace.tags) else f"#{t}"
    return name or "(untagged)"


def per_tag(trace: Any, att: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per application tag: operations, bytes read and written, busy time (when
    at least one of its operations was in flight), and, with a block trace,
    the device bytes attributed to it (``att``: :func:`attribute_block`'s
    result when already computed).  Sorted by bytes, largest first."""
    app = trace.app
    rows: dict[int, dict[str, Any]] = {}
    for t in np.unique(app["tag"]):
        sel = app["tag"] == t
        r, w = sel & (app["op"] == OP_READ), sel & (app["op"] == OP_WRITE)
        rows[int(t)] = {"tag": tag_label(trace, int(t)), "ops": int(sel.sum()),
                        "read_bytes": int(app["size"][r].sum()), "write_bytes": int(app["size"][w].sum()),
                        "busy_s": _union_ns(app["submit_ns"][sel], app["complete_ns"][sel]) / 1e9,
                        "latency_sum_s": float((app["complete_ns"] - app["submit_ns"])[sel].sum() / 1e9)}
    if trace.block:
        att = att or attribute_block(trace)
        blk = trace.block
        data = _data_rows(blk)
        for t in np.unique(att["tag"][data]):
            sel = data & (att["tag"] == t)
            row = rows.setdefault(int(t), {"tag": tag_label(trace, int(t)), "ops": 0, "read_bytes": 0,
                                           "write_bytes": 0, "busy_s": 0.0, "latency_sum_s": 0.0})
            row["block_requests"] = int(sel.sum())
            row["block_bytes"] = int(blk["size"][sel].sum())
    return sorted(rows.values(), key=lambda r: -(r["read_bytes"] + r["write_bytes"] + r.get("block_bytes", 0)))


# -- everything, and in words ----------------------------------------------------------------------

def summarize(trace: Any) -> dict[str, Any]:
    """The figures the report shows, as one JSON-able dict."""
    t0, t1 = time_span(trace)
    att = attribute_block(trace) if trace.block else None
    out: dict[str, Any] = {"duration_s": (t1 - t0) / 1e9, "layers": {}, "tags": per_tag(trace, att),
                           "missing": list(trace.meta.get("missing", [])), "notes": list(trace.meta.get("notes", []))}
    for layer in LAYERS:
        if layer == "block" and not trace.block:
            continue
        c = columns(trace, layer)
        hist = size_histogram(trace, layer)
        lay: dict[str, Any] = {
            "requests": len(c["size"]), "rw": rw_summary(trace, layer),
            "size_histogram": {k: v.tolist() for k, v in hist.items()},
            "top_sizes": exact_sizes(trace, layer), "latency": latency_percentiles(trace, layer),
            "uniformity": uniformity(trace, layer), "sequential_share": sequential_share(trace, layer),
            "mean_queue_depth": mean_queue_depth(trace, layer),
            "max_size": int(c["size"][_data_rows(c)].max()) if _data_rows(c).any() else 0,
            "busy_s": _union_ns(c["submit_ns"][c["complete_ns"] >= 0], c["complete_ns"][c["complete_ns"] >= 0]) / 1e9,
        }
        out["layers"][layer] = lay
    if att is not None:
        out["layers"]["block"]["on_traced_files"] = att["bytes_on_files"]
    from .experts import expert_skew  # noqa: PLC0415 - per-expert tags of MoE expert streaming

    skew = expert_skew(trace)
    if skew is not None:
        out["experts"] = skew
    return out


def findings(trace: Any, s: dict[str, Any] | None = None) -> list[str]:
    """The trace's main facts, as sentences."""
    s = s or summarize(trace)
    out: list[str] = []
    app = s["layers"]["app"]
    blk = s["layers"].get("block")
    dur = s["duration_s"]
    for name, lay in (("The application", app), ("The device", blk)):
        if lay is None or lay["requests"] == 0:
            continue
        rw = lay["rw"]
        ratio = "no writes" if rw["write_bytes"] == 0 else (
            "no reads" if rw["read_bytes"] == 0 else f"read:write = {rw['ratio']:.2f}:1 by bytes")
        out.append(f"{name} {'issued' if name.endswith('application') else 'was issued'} {lay['requests']:,} "
                   f"requests in {dur:.2f} s: {fmt_size(rw['read_bytes'])} read in {rw['read_ops']:,}, "
                   f"{fmt_size(rw['write_bytes'])} written in {rw['write_ops']:,} ({ratio}).")
        if lay["top_sizes"]:
            h = lay["size_histogram"]
            i_bytes = int(np.argmax(h["bytes"])) if h["bytes"] else 0
            sz, cnt, _ = lay["top_sizes"][0]
            share = sum(b for c, b in zip(h["size_class"], h["bytes"], strict=True) if c == h["size_class"][i_bytes])
            total = sum(h["bytes"]) or 1
            out.append(f"{'Its' if name.endswith('application') else 'Device'} dominant request size is "
                       f"{fmt_size(sz)} ({cnt:,} of {lay['requests']:,} requests); requests of the "
                       f"{fmt_size(h['size_class'][i_bytes])} class carry {100 * share / total:.0f}% of the bytes.")
    if blk is not None and app["requests"]:
        on = blk.get("on_traced_files", {})
        ab = app["rw"]["read_bytes"] + app["rw"]["write_bytes"]
        fb = on.get("read", 0) + on.get("write", 0)
        other = blk["rw"]["read_bytes"] + blk["rw"]["write_bytes"] - fb
        if ab and len(trace.extents) == 0:
            out.append("The device's requests could not be tied to the traced files: where the files lie on disk "
                       "is unknown (see the notes).")
        elif ab:
            out.append(f"Of the device's bytes, {fmt_size(fb)} fell inside the traced files "
                       f"({100 * fb / ab:.1f}% of what the application moved); {fmt_size(max(other, 0))} were "
                       "other I/O on the same disk (other processes, metadata, journal).")
        if blk["max_size"] > app["max_size"]:
            out.append(f"The block layer merged adjacent requests: the largest the device saw was "
                       f"{fmt_size(blk['max_size'])} against {fmt_size(app['max_size'])} from the application "
                       f"({blk['requests'] / app['requests']:.2f} device requests per application request).")
        elif blk["max_size"] < app["max_size"]:
            out.append(f"The kernel split large requests: the largest the device saw was {fmt_size(blk['max_size'])} "
                       f"against {fmt_size(app['max_size'])} from the application (the queue's max_sectors_kb / "
                       f"max_segments limits); {blk['requests'] / app['requests']:.2f} device requests per "
                       "application request.")
    for name, lay in (("application", app), ("device", blk)):
        if lay is None or lay["uniformity"]["blocks"] == 0:
            continue
        u = lay["uniformity"]
        kind = "uniform" if u["gini"] < 0.2 else ("skewed" if u["gini"] > 0.5 else "moderately skewed")
        out.append(f"Access at the {name} level is {kind}: {u['blocks']:,} distinct 4 KiB blocks touched "
                   f"{u['reuse']:.2f} times each on average, Gini {u['gini']:.2f}, the hottest 10% of blocks "
                   f"took {100 * u['top10_share']:.0f}% of accesses; {100 * lay['sequential_share']:.0f}% of the "
                   "bytes followed on from the previous request (sequential).")
    for name, lay in (("application", app), ("device", blk)):
        if lay is None or not lay["latency"]:
            continue
        worst = max(lay["latency"], key=lambda r: r["count"] * r["mean_us"])
        out.append(f"At the {name} level the most time went to {worst['op']}s of {fmt_size(worst['size_class'])} "
                   f"or less ({worst['count']:,} requests): p50 {worst['p50']:.0f} µs, p99 {worst['p99']:.0f} µs, "
                   f"p99.9 {worst['p99.9']:.0f} µs; mean queue depth while busy {lay['mean_queue_depth']:.1f}, "
                   f"busy {100 * lay['busy_s'] / dur if dur else 0:.0f}% of the time.")
    tags = [t for t in s["tags"] if t["read_bytes"] + t["write_bytes"]]
    if tags:
        total = sum(t["read_bytes"] + t["write_bytes"] for t in tags)
        top = tags[:3]
        out.append("By tag: " + "; ".join(
            f"{t['tag']} {fmt_size(t['read_bytes'] + t['write_bytes'])} "
            f"({100 * (t['read_bytes'] + t['write_bytes']) / total:.0f}%, busy {t['busy_s']:.2f} s)" for t in top)
            + ("; ..." if len(tags) > 3 else "") + ".")
    from .experts import expert_findings  # noqa: PLC0415

    out += expert_findings(s.get("experts"), fmt_size)
    for m in s["missing"]:
        out.append(f"Not recorded — {m}.")
    return out
