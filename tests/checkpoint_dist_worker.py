"""One rank of a torch.distributed (gloo) checkpoint test; run by tests/test_checkpoint_dist.py.

usage: checkpoint_dist_worker.py SCENARIO[,SCENARIO...] RANK WORLD RENDEZVOUS_FILE DIR

Scenarios run in order in one process group, each under DIR/<first word of its name>.
Rendezvous through a file under the test's tmp_path (no ports, safe under
pytest -n auto).  Every check raises on failure; success prints ``ok``.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def full(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The same tensor on every rank and in every process: seeded by its name."""
    g = torch.Generator().manual_seed(sum(map(ord, name)) * 7919)
    t = torch.randn(shape, generator=g)
    return t.to(dtype)


def rank_state(rank: int) -> dict:
    g = torch.Generator().manual_seed(1000 + rank)
    return {"model": {"w": torch.randn(64, 33, generator=g).to(torch.bfloat16), "b": torch.randn(33, generator=g)},
            "optim": {"state": {0: {"exp_avg": torch.randn(64, 33, generator=g), "step": torch.tensor(5.0)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0]}]},
            "rank": rank, "data_pos": 1234 + rank}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.view(torch.uint8) if a.dtype == torch.bfloat16 else a, b.view(torch.uint8) if b.dtype == torch.bfloat16 else b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def llmtier_sharded(rank: int, world: int, d: str) -> None:
    from llmtier.checkpoint import Checkpointer

    with Checkpointer(d, keep_last=2) as ck:
        ck.save(rank_state(rank), step=1)
        s2 = rank_state(rank)
        s2["data_pos"] += 10
        h = ck.save_async(s2, step=2)
        s2["model"]["w"].zero_()  # the snapshot was taken: changing it now must not change the checkpoint
        h.wait()
        got = ck.load()
        want = rank_state(rank)
        want["data_pos"] += 10
        if not same(got, want) or ck.loaded.step != 2:
            raise SystemExit(f"rank {rank}: loaded state differs")
        got1 = ck.load(step=1)
        if not same(got1, rank_state(rank)):
            raise SystemExit(f"rank {rank}: step 1 differs")
        # a rank that fails stops the commit on every rank
        bad = rank_state(rank)
        if rank == world - 1:
            bad["oops"] = object()
        try:
            ck.save(bad, step=3)
        except Exception as exc:  # noqa: BLE001
            msg = str(exc)
        else:
            raise SystemExit(f"rank {rank}: a failing rank did not stop the commit")
        if "not committed" not in msg and "cannot be saved" not in msg:
            raise SystemExit(f"rank {rank}: unexpected message {msg}")
        if ck.load().__getitem__("data_pos") != 1234 + rank + 10:
            raise SystemExit(f"rank {rank}: step 3 must not exist")


def dcp_state(world: int, *, zero: bool = False) -> dict:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for name, shape, dtype in (("emb", (96, 40), torch.bfloat16), ("mlp", (64, 24), torch.float32),
                               ("odd", (30, 7), torch.float32)):
        t = full(name, shape, dtype)
        if zero:
            t = torch.zeros_like(t)
        out[name] = distribute_tensor(t, mesh, [Shard(0)])
    rep = full("replicated", (17,), torch.float32)
    out["replicated"] = torch.zeros_like(rep) if zero else rep
    out["extra"] = {"step": 0 if zero else 77, "name": "" if zero else "run-a"}
    return out


def check_dcp(state: dict, world: int) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for name, shape, dtype in (("emb", (96, 40), torch.bfloat16), ("mlp", (64, 24), torch.float32),
                               ("odd", (30, 7), torch.float32)):
        want = distribute_tensor(full(name, shape, dtype), mesh, [Shard(0)]).to_local()
        got = state[name].to_local()
        if not same(got, want):
            raise SystemExit(f"rank {dist.get_rank()}: DTensor {name} differs after load")
    if not same(state["replicated"], full("replicated", (17,), torch.float32)):
        raise SystemExit("replicated tensor differs")
    if state["extra"] != {"step": 77, "name": "run-a"}:
        raise SystemExit(f"extra differs: {state['extra']}")


def dcp_save(rank: int, world: int, d: str) -> None:
    import torch.distributed.checkpoint as dcp

    from llmtier.checkpoint import DCPWriter

    dcp.save(dcp_state(world), storage_writer=DCPWriter(os.path.join(d, "sync")))
    fut = dcp.async_save(dcp_state(world), storage_writer=DCPWriter(os.path.join(d, "async")))
    fut.result()


def dcp_load(rank: int, world: int, d: str) -> None:
    import torch.distributed.checkpoint as dcp

    from llmtier.checkpoint import DCPReader

    for sub in ("sync", "async"):
        state = dcp_state(world, zero=True)
        dcp.load(state, storage_reader=DCPReader(os.path.join(d, sub)))
        check_dcp(state, world)


def main() -> None:
    scenario, rank, world, rdzv, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world)
    try:
        for sc in scenario.split(","):
            sub = os.path.join(d, sc.split("_")[0])
            {"llmtier": llmtier_sharded, "dcp_save": dcp_save, "dcp_load": dcp_load}[sc](rank, world, sub)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    print("ok")


if __name__ == "__main__":
    main()
