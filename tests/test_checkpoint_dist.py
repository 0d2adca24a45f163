"""Checkpoints across ranks on torch.distributed (gloo, 2 and 4 local processes).

Each test starts WORLD subprocesses of tests/checkpoint_dist_worker.py that
meet through a rendezvous file in tmp_path (no ports: safe under -n auto).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("checkpoint_dist_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def run_ranks(scenario: str, world: int, directory: Path, tmp_path: Path, timeout: float = 240) -> None:
    rdzv = tmp_path / f"rdzv-{scenario}-{world}"
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(r), str(world), str(rdzv), str(directory)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and out.strip().endswith("ok"), f"{scenario} rank {r}/{world} failed:\n{out[-3000:]}"


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_and_dcp(tmp_path: Path, world: int) -> None:
    """llmtier's own sharded save/load, then DCP save (sync and async_save) and load, in WORLD gloo ranks;
    with 4 ranks, the DCP checkpoint is then loaded by 2 ranks (DCP resharding).  Bitwise checks in the workers."""
    run_ranks("llmtier,dcp_save,dcp_load", world, tmp_path, tmp_path)
    d = tmp_path / "llmtier"
    step = d / "step-000000002"
    assert sorted(p.name for p in step.iterdir()) == sorted([f"rank-{r:05d}.lts" for r in range(world)] + ["manifest.json"])
    assert (d / "latest").read_text().strip() == "step-000000002"
    assert not (d / "step-000000003").exists(), "a save that failed on one rank left its directory"
    from llmtier.checkpoint import CheckpointError, load

    with pytest.raises(CheckpointError, match=f"saved by {world} ranks"):
        load(d, step=2)
    for sub in ("sync", "async"):
        names = sorted(p.name for p in (tmp_path / "dcp" / sub).iterdir())
        assert names == [".metadata.json"] + [f"rank-{r:05d}.lts" for r in range(world)], names
    if world == 4:
        run_ranks("dcp_load", 2, tmp_path, tmp_path)  # 4 -> 2
