"""Block-layer capture on the real disk, without permission, and the report rendered in a browser."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import llmtier.trace as trace
from llmtier.engine import alloc, open_engine
from llmtier.trace import analysis as A
from llmtier.trace.block import BlockTracer, BlockTraceUnavailable, file_extents
from llmtier.trace.diskstats import device_of
from llmtier.trace.report import write_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block_capture_possible(path) -> str:
    """'' when this process can capture block requests for ``path``; else why not."""
    dev, why = device_of(path)
    if not dev:
        return why
    try:
        BlockTracer(dev).start().stop()
    except BlockTraceUnavailable as exc:
        return str(exc)
    return ""


def known_workload(eng, data, trace_path, device_path):
    """100 sequential 1 MiB reads, 1000 random 4 KiB reads, 50 64 KiB writes, recorded."""
    buf = alloc(1 << 20)
    small = alloc(4096)
    rng = np.random.default_rng(0)
    with eng.open(data, "w") as f:
        f.pwrite(alloc(100 << 20), 0).result()
        f.sync()
    with trace.record(trace_path, device_path=device_path):
        with eng.open(data, "r") as f:
            for i in range(100):
                f.pread(buf, i << 20, tag="weights").result()
            for off in rng.integers(0, (100 << 20) // 4096, 1000) * 4096:
                f.pread(small, int(off), tag="kv").result()
        with eng.open(data, "r+") as f:
            for i in range(50):
                f.pwrite(buf[:65536], i * 65536, tag="checkpoint").result()
    return trace.load(trace_path)


@pytest.mark.parametrize("backend", ["uring", "threads"])
def test_block_bytes_agree_with_application_bytes(tmp_path, backend):
    from llmtier.engine import available_engines

    if available_engines().get(backend):
        pytest.skip(f"{backend}: {available_engines()[backend]}")
    why = _block_capture_possible(tmp_path)
    if why:
        pytest.skip(f"block capture not possible here: {why}")
    with open_engine(backend) as eng:
        t = known_workload(eng, tmp_path / "data.bin", tmp_path / "run.npz", tmp_path)
    s = A.summarize(t)
    app = s["layers"]["app"]["rw"]
    # application level: exact
    assert (app["read_ops"], app["write_ops"]) == (1100, 50)
    assert app["read_bytes"] == (100 << 20) + 1000 * 4096 and app["write_bytes"] == 50 * 65536
    # block level: the bytes that fell in the traced file agree within 1% (direct I/O: exactly, in practice)
    on = s["layers"]["block"]["on_traced_files"]
    assert on["read"] == pytest.approx(app["read_bytes"], rel=0.01)
    assert on["write"] == pytest.approx(app["write_bytes"], rel=0.01)
    assert s["layers"]["block"]["rw"]["read_bytes"] >= on["read"]  # others may add I/O, never less
    # every block request in the file is named by the tag of the request that caused it
    per_tag = {r["tag"]: r for r in s["tags"]}
    assert per_tag["weights"]["block_bytes"] == pytest.approx(100 << 20, rel=0.01)
    assert per_tag["kv"]["block_bytes"] == pytest.approx(1000 * 4096, rel=0.01)
    assert per_tag["checkpoint"]["block_bytes"] == pytest.approx(50 * 65536, rel=0.01)
    blk = t.block
    done = blk["complete_ns"] >= 0
    assert done.mean() > 0.99 and (blk["complete_ns"][done] >= blk["submit_ns"][done]).all()
    assert t.meta["block_devices"] and len(t.extents) >= 1
    # the report on a real trace
    paths = write_report(t, tmp_path / "report")
    text = open(paths["markdown"], encoding="utf-8").read()
    assert "fell inside the traced files" in text and "weights" in text


def test_file_extents_cover_the_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(3 << 20))
    os.sync()
    ex = file_extents(p)
    if len(ex) == 0:
        pytest.skip("this file system does not answer FIEMAP")
    assert ex[:, 2].sum() >= 3 << 20 and ex[0, 0] == 0


def test_no_leftover_ftrace_instances(tmp_path):
    why = _block_capture_possible(tmp_path)
    if why:
        pytest.skip(why)
    dev, _ = device_of(tmp_path)
    bt = BlockTracer(dev).start()
    inst = bt.inst
    assert os.path.isdir(inst)
    bt.stop()
    assert not os.path.exists(inst)


def _as_unprivileged() -> list[str] | None:
    """A command prefix that drops to an unprivileged user, [] when already one, None when impossible."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return None
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]


def _interpreter_for(prefix: list[str], env: dict[str, str]) -> str | None:
    """A Python that the unprivileged user can run and that imports llmtier's dependencies
    (this one may live under /root, unreadable to others)."""
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (sys.executable, os.path.realpath(sys.executable), shutil.which(ver), f"/usr/bin/{ver}"):
        if not cand:
            continue
        probe = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, '-c', 'import numpy, llmtier.engine']))"
        try:  # it must also be able to start itself again, as the traced command does
            r = subprocess.run([*prefix, cand, "-c", probe], capture_output=True, env=env, timeout=60, cwd="/")
        except OSError:
            continue
        if r.returncode == 0:
            return cand
    return None


def test_trace_without_permission_still_records_and_says_why():
    import site

    prefix = _as_unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: cannot drop privileges")
    d = tempfile.mkdtemp(prefix="llmtier-unpriv-", dir="/tmp")
    try:
        os.chmod(d, 0o777)
        env = dict(os.environ, HOME=d, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "src"), *site.getsitepackages()]))
        python = _interpreter_for(prefix, env)
        if python is None:
            pytest.skip("no Python interpreter with llmtier's dependencies is usable by an unprivileged user here")
        prog = os.path.join(d, "prog.py")
        with open(prog, "w") as f:
            f.write("from llmtier.engine import open_engine, alloc\n"
                    f"with open_engine('threads') as e, e.open({os.path.join(d, 'x.bin')!r}, 'w') as f:\n"
                    "    f.pwrite(alloc(1 << 20), 0, tag='checkpoint').result()\n")
        out = os.path.join(d, "run.npz")
        r = subprocess.run([*prefix, python, "-m", "llmtier.cli", "trace", "-o", out, "--", python, prog],
                           capture_output=True, text=True, timeout=120, env=env, cwd=d)
        assert r.returncode == 0, r.stderr
        assert "not recorded: block layer:" in r.stderr, r.stderr
        t = trace.load(out)
        assert t.app["size"].sum() == 1 << 20  # the application level was recorded
        assert not t.has_block
        assert any(m.startswith("block layer:") and "root" in m for m in t.missing), t.missing
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


def test_report_renders_in_headless_chromium(tmp_path):
    from test_trace_analysis import known_workload as synthetic

    browser = _chromium()
    if browser is None:
        why = os.environ.get("LLMTIER_CHROMIUM_UNAVAILABLE")
        if os.environ.get("CI") == "true" and not why:
            pytest.fail("CI must have chromium (.ci/run installs it) to check the report renders")
        if why:
            pytest.skip(f"no chromium: .ci/run could not install it ({why})")
        pytest.skip("no chromium here: apt-get install chromium")
    t = synthetic(tmp_path)
    paths = write_report(t, tmp_path / "rep", title="synthetic <known> workload")
    html = open(paths["html"], encoding="utf-8").read()
    n_plots = html.count("class='plot'")
    assert n_plots >= 6 and "http://" not in html and "https://" not in html  # self-contained
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                        f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"file://{paths['html']}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'data-plots="{n_plots}/{n_plots}"' in r.stdout, r.stdout[:500]
    assert "synthetic &lt;known&gt; workload" in r.stdout


def test_deleted_file_is_still_attributed(tmp_path):
    why = _block_capture_possible(tmp_path)
    if why:
        pytest.skip(f"block capture not possible here: {why}")
    data = tmp_path / "gone.bin"
    buf = alloc(1 << 20)
    with open_engine("threads") as eng:
        with eng.open(data, "w") as f:
            f.pwrite(alloc(8 << 20), 0).result()
            f.sync()
        with trace.record(tmp_path / "run.npz", device_path=tmp_path):
            with eng.open(data, "r") as f:
                for i in range(8):
                    f.pread(buf, i << 20, tag="weights").result()
            os.unlink(data)  # gone before the recording ends
    t = trace.load(tmp_path / "run.npz")
    assert len(t.extents) and not any("deleted" in n for n in t.notes)
    on = A.attribute_block(t)["bytes_on_files"]
    assert on["read"] == pytest.approx(8 << 20, rel=0.01)
