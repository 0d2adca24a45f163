"""Trace analysis on synthetic traces with known answers, and block-text parsing."""
from __future__ import annotations

import numpy as np
import pytest

from llmtier.errors import FormatError
from llmtier.trace import analysis as A
from llmtier.trace.block import FLAG_SYNC, OP_FLUSH, OP_READ, OP_WRITE, in_flight_at_submit, kernel_dev, parse_block_text
from llmtier.trace.recorder import Recorder, Trace

MS = 1_000_000
KiB, MiB = 1024, 1 << 20


def make_trace(tmp_path, app_rows, block_rows=None, extents=None, tags=("", "weights", "kv", "checkpoint"),
               start=0, end=None, name="t.npz"):
    """A saved and reloaded trace. app_rows: (submit, complete, op, offset, size, tag[, file]);
    block_rows: (submit, complete, op, offset, size)."""
    app = np.array([list(r) + [0] * (7 - len(r)) for r in app_rows], dtype=np.int64).reshape(-1, 7)
    cols = {"submit_ns": app[:, 0], "complete_ns": app[:, 1], "op": app[:, 2], "offset": app[:, 3],
            "size": app[:, 4], "tag": app[:, 5], "file": app[:, 6], "result": app[:, 4],
            "queue_depth": np.ones(len(app)), "backend": np.zeros(len(app))}
    rec = Recorder()
    rec.load_columns(cols, files=["/f0", "/f1"], tags=list(tags), backends=["threads"])
    extra = {}
    if block_rows is not None:
        b = np.array(block_rows, dtype=np.int64).reshape(-1, 5)
        extra = {"blk_submit_ns": b[:, 0], "blk_complete_ns": b[:, 1], "blk_op": b[:, 2].astype(np.uint8),
                 "blk_flags": np.zeros(len(b), np.uint8), "blk_dev": np.full(len(b), kernel_dev(254, 0), np.uint32),
                 "blk_offset": b[:, 3], "blk_size": b[:, 4], "blk_error": np.zeros(len(b), np.int32),
                 "blk_queue_depth": in_flight_at_submit(b[:, 0], b[:, 1])}
        extra["extents"] = np.array(extents if extents is not None else [], dtype=np.int64).reshape(-1, 4)
    if end is None:
        end = int(max([r[1] for r in app_rows] + [r[1] for r in block_rows or []] + [start + 1]))
    rec.save(tmp_path / name, meta={"start_ns": start, "end_ns": end, "missing": [], "notes": []}, extra=extra)
    return Trace(tmp_path / name)


def known_workload(tmp_path):
    """100 sequential 1 MiB reads (weights), 1000 random 4 KiB reads (kv), 50 64 KiB writes (checkpoint)."""
    rng = np.random.default_rng(1)
    rows, t = [], 0
    for i in range(100):
        rows.append((t, t + MS, OP_READ, i * MiB, MiB, 1))
        t += MS
    for j, blk in enumerate(rng.permutation(25600)[:1000]):
        rows.append((t, t + (j + 1) * 1000, OP_READ, int(blk) * 4096, 4096, 2))  # latencies 1..1000 µs
        t += (j + 1) * 1000
    for i in range(50):
        rows.append((t, t + 2 * MS, OP_WRITE, i * 65536, 65536, 3, 1))
        t += 2 * MS
    return make_trace(tmp_path, rows, end=t)


def test_size_histogram_and_rw(tmp_path):
    tr = known_workload(tmp_path)
    h = A.size_histogram(tr, "app")
    assert h["size_class"].tolist() == [4096, 65536, MiB]
    assert h["count"].tolist() == [1000, 50, 100]
    assert h["bytes"].tolist() == [1000 * 4096, 50 * 65536, 100 * MiB]
    assert A.size_histogram(tr, "app", op="write")["count"].tolist() == [50]
    rw = A.rw_summary(tr, "app")
    assert rw == {"read_ops": 1100, "write_ops": 50, "read_bytes": 100 * MiB + 4096000, "write_bytes": 50 * 65536,
                  "ratio": (100 * MiB + 4096000) / (50 * 65536), "errors": 0}
    assert A.exact_sizes(tr, "app")[0] == (4096, 1000, 4096000)


def test_size_class_rounds_up_to_power_of_two():
    assert A.size_class(np.array([0, 1, 4096, 4097, 1040384, MiB])).tolist() == [0, 1, 4096, 8192, MiB, MiB]
    assert A.fmt_size(1040384) == "1016 KiB" and A.fmt_size(4096) == "4 KiB" and A.fmt_size(1536) == "1.5 KiB"


def test_latency_percentiles_known(tmp_path):
    tr = known_workload(tmp_path)
    rows = {(r["op"], r["size_class"]): r for r in A.latency_percentiles(tr, "app")}
    kv = rows[("read", 4096)]
    assert kv["count"] == 1000
    assert (kv["p50"], kv["p90"], kv["p99"], kv["p99.9"]) == (500.0, 900.0, 990.0, 999.0)
    assert rows[("read", MiB)]["p50"] == 1000.0 and rows[("write", 65536)]["p99"] == 2000.0


def test_bandwidth_timeline_sums_to_the_bytes(tmp_path):
    tr = known_workload(tmp_path)
    bw = A.bandwidth_timeline(tr, "app", bin_ns=10 * MS)
    assert bw["read_Bps"].sum() * 0.01 == pytest.approx(100 * MiB + 4096000)
    assert bw["write_Bps"].sum() * 0.01 == pytest.approx(50 * 65536)
    # the first 10 ms: reads 0..9 complete at 1..10 ms; the one at 10 ms is in the next bin
    assert bw["read_Bps"][0] == pytest.approx(9 * MiB / 0.01)


def test_queue_depth_known(tmp_path):
    # four requests over [0, 1 s), one over [0.5 s, 1.5 s); trace 2 s long, 1 s bins
    s = 1_000_000_000
    rows = [(0, s, OP_READ, i * 4096, 4096, 1) for i in range(4)] + [(s // 2, 3 * s // 2, OP_READ, 0, 4096, 1)]
    tr = make_trace(tmp_path, rows, end=2 * s)
    qd = A.queue_depth_timeline(tr, "app", bin_ns=s)
    assert qd["mean_qd"].tolist() == pytest.approx([4.5, 0.5])
    assert A.mean_queue_depth(tr, "app") == pytest.approx(5.0 / 1.5)


def test_access_counts_gini_and_uniformity(tmp_path):
    # block 0 read three times, block 1 once
    rows = [(i, i + 1, OP_READ, 0, 4096, 1) for i in range(3)] + [(9, 10, OP_READ, 4096, 4096, 1)]
    tr = make_trace(tmp_path, rows)
    h = A.access_counts(tr, "app")
    assert h["accesses"].tolist() == [1, 3] and h["blocks"].tolist() == [1, 1]
    assert A.gini(np.array([1, 3])) == pytest.approx(0.25)
    assert A.gini(h["accesses"], h["blocks"]) == pytest.approx(0.25)
    u = A.uniformity(tr, "app")
    assert u["blocks"] == 2 and u["accesses"] == 4 and u["top10_share"] == pytest.approx(0.75)
    cdf = A.access_cdf(tr, "app")
    assert cdf["fraction"].tolist() == [0.5, 1.0]


def test_uniform_sequential_reads(tmp_path):
    tr = known_workload(tmp_path)
    # file 0: 100 MiB read once sequentially, plus 1000 4 KiB reads inside it; file 1: 50 writes of 64 KiB
    u = A.uniformity(tr, "app")
    assert u["blocks"] == 25600 + 50 * 16
    assert u["accesses"] == 25600 + 1000 + 800
    seq = A.sequential_share(tr, "app")
    # reads: the 99 MiB after the first follow on; writes: 49 of 50 follow on; random 4 KiB ones do not
    # (except where a random block happens to be the next one)
    assert seq > (99 * MiB + 49 * 65536) / (100 * MiB + 4096000 + 50 * 65536) - 0.001
    gini_seq = A.gini(np.ones(100))
    assert gini_seq == 0.0


def test_offset_heatmap_holds_all_bytes(tmp_path):
    tr = known_workload(tmp_path)
    hm = A.offset_heatmap(tr, "app", time_bins=20, offset_bins=10)
    assert hm["bytes"].shape == (10, 20)
    assert hm["bytes"].sum() == pytest.approx(100 * MiB + 4096000 + 50 * 65536)


def test_attribute_block_ties_requests_to_files_and_tags(tmp_path):
    app = [(0, 10, OP_READ, 0, MiB, 1), (20, 30, OP_READ, MiB, MiB, 2)]  # weights then kv, file 0
    # file 0: [0, 1 MiB) at device 10 MiB, [1 MiB, 2 MiB) at device 50 MiB
    extents = [(0, 0, 10 * MiB, MiB), (0, MiB, 50 * MiB, MiB)]
    blk = [(1, 9, OP_READ, 10 * MiB, 512 * KiB), (2, 9, OP_READ, 10 * MiB + 512 * KiB, 512 * KiB),
           (21, 29, OP_READ, 50 * MiB + 512 * KiB, 512 * KiB), (22, 28, OP_READ, 100 * MiB, 4096),
           (23, 29, OP_FLUSH, 0, 0)]
    tr = make_trace(tmp_path, app, blk, extents)
    att = A.attribute_block(tr)
    assert att["file"].tolist() == [0, 0, 0, -1, -1]
    assert att["file_offset"].tolist() == [0, 512 * KiB, MiB + 512 * KiB, -1, -1]
    assert [A.tag_label(tr, t) for t in att["tag"]] == ["weights", "weights", "kv", "(not in traced files)",
                                                         "(not in traced files)"]
    assert att["bytes_on_files"] == {"read": MiB + 512 * KiB, "write": 0}
    tags = {r["tag"]: r for r in A.per_tag(tr)}
    assert tags["weights"]["block_bytes"] == MiB and tags["kv"]["block_bytes"] == 512 * KiB
    assert tags["(not in traced files)"]["block_requests"] == 1


def test_block_request_straddling_extents_counts_only_file_bytes(tmp_path):
    extents = [(0, 0, 10 * MiB, MiB)]
    blk = [(1, 2, OP_READ, 10 * MiB - 4096, MiB)]  # 4 KiB before the file, rest inside
    tr = make_trace(tmp_path, [(0, 3, OP_READ, 0, MiB, 1)], blk, extents)
    assert A.attribute_block(tr)["bytes_on_files"]["read"] == MiB - 4096


def test_findings_state_the_facts(tmp_path):
    tr = known_workload(tmp_path)
    text = " ".join(A.findings(tr))
    assert "1,150 requests" in text
    assert "dominant request size is 4 KiB" in text and "1 MiB class carry" in text
    assert "read:write" in text and "By tag: weights 100 MiB" in text


def test_summarize_is_json_able(tmp_path):
    import json

    tr = known_workload(tmp_path)
    json.dumps(A.summarize(tr))


def test_bad_layer_and_missing_block(tmp_path):
    tr = known_workload(tmp_path)
    with pytest.raises(ValueError, match="no block-layer records"):
        A.size_histogram(tr, "block")
    with pytest.raises(ValueError, match="layer must be"):
        A.rw_summary(tr, "disk")


def test_trace_loader_rejects_bad_files(tmp_path):
    p = tmp_path / "x.npz"
    p.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(FormatError):
        Trace(p)
    np.savez(tmp_path / "y.npz", meta=np.frombuffer(b'{"format": "other"}', dtype=np.uint8))
    with pytest.raises(FormatError, match="not an llmtier trace"):
        Trace(tmp_path / "y.npz")
    np.savez(tmp_path / "z.npz", a=np.zeros(3))
    with pytest.raises(FormatError, match="meta"):
        Trace(tmp_path / "z.npz")


ISSUE = "  python-1 [001] ..... {t}: block_rq_issue: 254,0 {rwbs} {nbytes} () {sector} + {n} be,0,4 [python]\n"
COMPLETE = "  <idle>-0 [001] ..s1. {t}: block_rq_complete: 254,0 {rwbs} () {sector} + {n} be,0,4 [{err}]\n"


def test_parse_block_text_pairs_requeues_and_flushes():
    text = "".join([
        ISSUE.format(t="100.000010", rwbs="RS", nbytes=1040384, sector=2048, n=2032),
        ISSUE.format(t="100.000020", rwbs="RS", nbytes=8192, sector=4080, n=16),
        COMPLETE.format(t="100.000110", rwbs="RS", sector=2048, n=2032, err=0),
        ISSUE.format(t="100.000130", rwbs="RS", nbytes=8192, sector=4080, n=16),  # requeued, issued again
        COMPLETE.format(t="100.000150", rwbs="RS", sector=4080, n=16, err=0),
        ISSUE.format(t="100.000200", rwbs="FF", nbytes=0, sector=0, n=0),
        COMPLETE.format(t="100.000300", rwbs="FF", sector=18446744073709551615, n=0, err=0),
        ISSUE.format(t="100.000400", rwbs="WS", nbytes=4096, sector=8, n=8),
        COMPLETE.format(t="100.000450", rwbs="WS", sector=8, n=8, err=-5),
        ISSUE.format(t="100.000500", rwbs="R", nbytes=4096, sector=16, n=8),  # never completes
        "garbage line\n",
    ]).encode()
    cols, unpaired, reissued = parse_block_text(text)
    assert unpaired == 1 and reissued == 1
    assert cols["op"].tolist() == [OP_READ, OP_READ, OP_FLUSH, OP_WRITE, OP_READ]
    assert cols["size"].tolist() == [1040384, 8192, 0, 4096, 4096]
    assert cols["offset"].tolist() == [2048 * 512, 4080 * 512, 0, 8 * 512, 16 * 512]
    assert cols["submit_ns"][0] == 100_000_010_000 and cols["complete_ns"][0] == 100_000_110_000
    assert cols["complete_ns"][1] == 100_000_150_000  # latency from the first issue
    assert cols["complete_ns"][4] == -1 and cols["error"][3] == -5
    assert cols["flags"][0] & FLAG_SYNC
    assert cols["queue_depth"].tolist() == [1, 2, 1, 1, 1]


def test_in_flight_at_submit():
    s = np.array([0, 1, 2, 10])
    c = np.array([5, 3, 20, 11])
    assert in_flight_at_submit(s, c).tolist() == [1, 2, 3, 2]


def test_overlapping_extent_snapshots_count_once(tmp_path):
    # a file seen at 1 MiB and again at 2 MiB while it grew: both snapshots kept
    extents = [(0, 0, 10 * MiB, MiB), (0, 0, 10 * MiB, 2 * MiB)]
    tr = make_trace(tmp_path, [(0, 3, OP_READ, 0, 2 * MiB, 1)], [(1, 2, OP_READ, 10 * MiB, 2 * MiB)], extents)
    assert A.attribute_block(tr)["bytes_on_files"]["read"] == 2 * MiB


REQUEUE = "  kworker-9 [001] ..... {t}: block_rq_requeue: 254,0 {rwbs} () {sector} + {n} be,0,4 [0]\n"


def test_parse_block_text_with_requeue_events():
    text = "".join([
        ISSUE.format(t="1.000010", rwbs="RS", nbytes=4096, sector=8, n=8),
        ISSUE.format(t="1.000011", rwbs="RS", nbytes=4096, sector=8, n=8),  # a second, real read of the block
        REQUEUE.format(t="1.000012", rwbs="RS", sector=8, n=8),
        ISSUE.format(t="1.000020", rwbs="RS", nbytes=4096, sector=8, n=8),  # the requeued one, issued again
        COMPLETE.format(t="1.000030", rwbs="RS", sector=8, n=8, err=0),
        COMPLETE.format(t="1.000040", rwbs="RS", sector=8, n=8, err=0),
        ISSUE.format(t="1.000050", rwbs="FF", nbytes=0, sector=0, n=0),  # two flushes in flight: two requests
        ISSUE.format(t="1.000051", rwbs="FF", nbytes=0, sector=0, n=0),
        COMPLETE.format(t="1.000060", rwbs="FF", sector=18446744073709551615, n=0, err=0),
        COMPLETE.format(t="1.000061", rwbs="FF", sector=18446744073709551615, n=0, err=0),
        ISSUE.format(t="1.000070", rwbs="WFS", nbytes=4096, sector=16, n=8),
        COMPLETE.format(t="1.000080", rwbs="WFS", sector=16, n=8, err=0),
    ]).encode()
    cols, unpaired, reissued = parse_block_text(text)
    assert (unpaired, reissued) == (0, 1)
    assert cols["op"].tolist() == [OP_READ, OP_READ, OP_FLUSH, OP_FLUSH, OP_WRITE]
    assert (cols["complete_ns"] > 0).all()
    from llmtier.trace.block import FLAG_FUA, FLAG_PREFLUSH

    assert cols["flags"][2] & FLAG_PREFLUSH and not cols["flags"][2] & FLAG_FUA
    assert cols["flags"][4] & FLAG_FUA


def test_queue_depth_keeps_precision_on_long_uptimes(tmp_path):
    # 11 days of uptime in the timestamps; 2 requests in flight for the whole second bin
    base = 11 * 86400 * 1_000_000_000
    s = 1_000_000_000
    rows = [(base + s, base + 2 * s, OP_READ, 0, 4096, 1), (base + s, base + 2 * s, OP_READ, 4096, 4096, 1)]
    tr = make_trace(tmp_path, rows, start=base, end=base + 3 * s)
    assert A.queue_depth_timeline(tr, "app", bin_ns=s)["mean_qd"].tolist() == [0.0, 2.0, 0.0]


def test_trace_loader_rejects_hostile_columns(tmp_path):
    good = known_workload(tmp_path)
    with np.load(tmp_path / "t.npz") as z:
        arrays = {k: z[k] for k in z.files}

    def variant(name, **changes):
        a = dict(arrays)
        for k, v in changes.items():
            if v is None:
                a.pop(k)
            else:
                a[k] = v
        np.savez(tmp_path / name, **a)
        return tmp_path / name

    n = len(good)
    cases = {
        "tag.npz": {"app_tag": np.full(n, 99, dtype=np.uint32)},           # index outside the tag table
        "file.npz": {"app_file": np.full(n, 2**32 - 1, dtype=np.uint32)},  # would size arrays by it
        "missing.npz": {"app_op": None},
        "twod.npz": {"app_size": arrays["app_size"].reshape(-1, 1)},
        "len.npz": {"app_size": arrays["app_size"][:-1]},
        "float.npz": {"app_size": arrays["app_size"].astype(np.float64)},
        "blk.npz": {"blk_size": np.zeros(3, dtype=np.int64)},              # a block column without the others
        "ext.npz": {"extents": np.zeros(5, dtype=np.int64)},
    }
    for name, change in cases.items():
        with pytest.raises(FormatError):
            Trace(variant(name, **change))
