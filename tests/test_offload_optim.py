"""OffloadedAdamW: bitwise equal to torch.optim.AdamW(foreach=False), state on SSD, budgets, state dicts."""
from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from llmtier.bench.gpt import GPT, GPTConfig  # noqa: E402
from llmtier.offload.optim import BYTES_PER_ELEM, OffloadedAdamW, OptimizerBudgetError, OptimizerError  # noqa: E402

CFG = GPTConfig(vocab=256, context=16, layers=2, heads=2, dim=32)  # ~35K params: params span chunks of 16K
STEPS = 20


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, CFG.vocab, (4, CFG.context + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def _groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]


class Reference:
    """torch.optim.AdamW(foreach=False); for bf16/fp16 models, on fp32 master copies with p = master.to(dtype)."""

    def __init__(self, model: torch.nn.Module, **kw) -> None:
        self.model = model
        self.params = list(model.parameters())
        self.low = self.params[0].dtype != torch.float32
        self.masters = [p.detach().float().clone().requires_grad_() for p in self.params] if self.low else self.params
        groups = _groups(model)
        pos = {id(p): i for i, p in enumerate(self.params)}
        mgroups = [{**g, "params": [self.masters[pos[id(p)]] for p in g["params"]]} for g in groups]
        self.opt = torch.optim.AdamW(mgroups, foreach=False, **kw)

    def step(self) -> None:
        if self.low:
            for p, m in zip(self.params, self.masters):
                m.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        if self.low:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)


def _train(model, opt, batches, sched=None, clip=1.0, freeze_every=0) -> list[float]:
    losses = []
    for i, (x, y) in enumerate(batches):
        _, loss = model(x, y)
        loss.backward()
        if freeze_every and i % freeze_every == 1:
            for blk in model.blocks[:1]:
                for p in blk.parameters():
                    p.grad = None
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_equal_to_torch_adamw(tmp_path, dtype):
    torch.manual_seed(0)
    a = GPT(CFG).to(dtype)
    b = copy.deepcopy(a)
    kw = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    ref = Reference(a, **kw)
    budget = BYTES_PER_ELEM * 16 * 1024  # the least: chunks of 16K elements, so params split across chunks
    with OffloadedAdamW(_groups(b), memory=budget, path=tmp_path / "opt", **kw) as opt:
        assert len(opt.chunks) >= 3
        assert any(c.master for c in opt.chunks) == (dtype != torch.float32)
        s_ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref.opt, STEPS)
        s_ours = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
        batches = _batches(STEPS)
        la = _train(a, ref, batches, s_ref, freeze_every=5)
        lb = _train(b, opt, batches, s_ours, freeze_every=5)
        assert la == lb
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
        sd = opt.state_dict()
        rsd = ref.opt.state_dict()
        masters = [m for g in ref.opt.param_groups for m in g["params"]]
        for i, st in rsd["state"].items():
            assert torch.equal(st["step"], sd["state"][i]["step"])
            assert torch.equal(st["exp_avg"], sd["state"][i]["exp_avg"])
            assert torch.equal(st["exp_avg_sq"], sd["state"][i]["exp_avg_sq"])
            if dtype != torch.float32:
                assert torch.equal(masters[i].detach(), sd["state"][i]["master"])
        r, w = opt.step_bytes()
        assert r == w == opt.state_bytes
        assert opt.stats.bytes_read == opt.stats.bytes_written > 0


def test_resume_from_state_dict_continues_bitwise(tmp_path):
    torch.manual_seed(1)
    a = GPT(CFG).to(torch.bfloat16)
    batches = _batches(12, seed=3)
    kw = {"lr": 1e-3, "weight_decay": 0.05}
    with OffloadedAdamW(a.parameters(), memory="2MiB", path=tmp_path / "a", **kw) as opt:
        _train(a, opt, batches[:6])
        saved_model = copy.deepcopy(a.state_dict())
        saved = opt.state_dict()
        torch.save(saved, tmp_path / "opt.pt")
        tail_a = _train(a, opt, batches[6:])
    b = GPT(CFG).to(torch.bfloat16)
    b.load_state_dict(saved_model)
    with OffloadedAdamW(b.parameters(), memory="1MiB", path=tmp_path / "b", lr=0.5) as opt2:
        opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        assert opt2.param_groups[0]["lr"] == 1e-3
        tail_b = _train(b, opt2, batches[6:])
    assert tail_a == tail_b
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_torch_adamw_state_dict_both_ways(tmp_path):
    torch.manual_seed(2)
    a = GPT(CFG)
    b = copy.deepcopy(a)
    batches = _batches(8, seed=5)
    ref = torch.optim.AdamW(a.parameters(), lr=2e-3, foreach=False)
    _train(a, ref, batches[:4])
    b.load_state_dict(a.state_dict())
    with OffloadedAdamW(b.parameters(), memory="1MiB", path=tmp_path / "o", lr=2e-3) as opt:
        opt.load_state_dict(ref.state_dict())  # torch -> ours
        assert _train(a, ref, batches[4:6]) == _train(b, opt, batches[4:6])
        c = copy.deepcopy(b)
        ref2 = torch.optim.AdamW(c.parameters(), lr=2e-3, foreach=False)
        ref2.load_state_dict(opt.state_dict())  # ours -> torch
        assert _train(b, opt, batches[6:]) == _train(c, ref2, batches[6:])


def test_maximize_and_no_weight_decay(tmp_path):
    torch.manual_seed(3)
    a = GPT(CFG)
    b = copy.deepcopy(a)
    ref = torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=0.0, maximize=True, foreach=False)
    with OffloadedAdamW(b.parameters(), memory="1MiB", path=tmp_path / "o", lr=1e-3, weight_decay=0.0,
                        maximize=True) as opt:
        batches = _batches(4)
        assert _train(a, ref, batches, clip=0) == _train(b, opt, batches, clip=0)


def test_budget_error_names_the_least(tmp_path):
    model = GPT(CFG)
    with pytest.raises(OptimizerBudgetError) as info:
        OffloadedAdamW(model.parameters(), memory=1000, path=tmp_path / "o")
    least = info.value.least
    assert least == BYTES_PER_ELEM * 16 * 1024
    with OffloadedAdamW(model.parameters(), memory=least, path=tmp_path / "o") as opt:
        assert opt.dram_bytes <= least


def test_unsupported_options_are_typed(tmp_path):
    model = GPT(CFG)
    with pytest.raises(OptimizerError):
        OffloadedAdamW(model.parameters(), memory="1MiB", path=tmp_path / "o", amsgrad=True)
    with pytest.raises(OptimizerError):
        OffloadedAdamW([torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))], memory="1MiB", path=tmp_path / "o")
    with OffloadedAdamW(model.parameters(), memory="1MiB", path=tmp_path / "o") as opt, pytest.raises(OptimizerError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4))]})


def test_read_state_streams_each_tensor_from_ssd(tmp_path):
    torch.manual_seed(4)
    model = GPT(CFG).to(torch.bfloat16)
    with OffloadedAdamW(model.parameters(), memory=BYTES_PER_ELEM * 16 * 1024, path=tmp_path / "o") as opt:
        _train(model, opt, _batches(2))
        sd = opt.state_dict()
        for i, entry in sd["state"].items():
            for key in ("exp_avg", "exp_avg_sq", "master"):
                got = torch.cat(list(opt.read_state(i, key)))
                assert torch.equal(got, entry[key].reshape(-1))
        with pytest.raises(OptimizerError):
            next(opt.read_state(0, "max_exp_avg_sq"))


def test_llmtier_checkpoint_straight_from_ssd_and_resume_bitwise(tmp_path):
    from llmtier import checkpoint
    from llmtier.data import TokenDataset

    rng = torch.Generator().manual_seed(0)
    torch.randint(0, CFG.vocab, (60_000,), generator=rng).numpy().astype("uint16").tofile(tmp_path / "tok.bin")

    def setup(model, where):
        opt = OffloadedAdamW(_groups(model), memory=BYTES_PER_ELEM * 16 * 1024, path=tmp_path / where, lr=2e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
        data = TokenDataset(tmp_path / "tok.bin", seq_len=CFG.context, batch_size=4, seed=11)
        return opt, sched, data

    def run(model, opt, sched, it, n):
        return _train(model, opt, [next(it) for _ in range(n)], sched)

    torch.manual_seed(5)
    a = GPT(CFG).to(torch.bfloat16)
    opt, sched, data = setup(a, "a")
    with opt:
        it = iter(data)
        run(a, opt, sched, it, 4)
        lazy = opt.lazy_state_dict()
        assert isinstance(lazy["state"][0]["exp_avg"], checkpoint.LazyTensor)
        checkpoint.save({"model": a.state_dict(), "optim": lazy, "sched": sched.state_dict(), "data": data.state_dict()},
                        tmp_path / "ckpt", step=4)
        tail_a = run(a, opt, sched, it, 5)
    b = GPT(CFG).to(torch.bfloat16)
    opt2, sched2, data2 = setup(b, "b")
    with opt2:
        st = checkpoint.load(tmp_path / "ckpt")
        b.load_state_dict(st["model"])
        opt2.load_state_dict(st["optim"])
        sched2.load_state_dict(st["sched"])
        data2.load_state_dict(st["data"])
        assert data2.position == 4
        tail_b = run(b, opt2, sched2, iter(data2), 5)
    assert tail_a == tail_b
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_resident_memory_stays_within_the_budget(tmp_path):
    def rss() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    big = GPTConfig(vocab=4096, context=16, layers=4, heads=4, dim=256)  # ~4.2M params, 50 MB of state
    model = GPT(big).to(torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # torch's optimizer imports, paid by any optimizer
    base = rss()
    budget = 12 * sum(p.numel() for p in model.parameters()) // 4  # 25% of the state
    with OffloadedAdamW(model.parameters(), memory=budget, path=tmp_path / "o") as opt:
        assert opt.dram_bytes <= budget
        for _ in range(2):
            opt.step()
        grown = rss() - base
    assert grown <= budget + (16 << 20), (grown, budget)


def test_a_failed_step_gives_its_buffers_back(tmp_path):
    model = GPT(CFG)
    params = list(model.parameters())
    with OffloadedAdamW(params, memory=BYTES_PER_ELEM * 16 * 1024, path=tmp_path / "o") as opt:
        for p in params:
            p.grad = torch.zeros_like(p)
        update = opt._update

        def failing(c, slot, steps):
            if c.index == 1:
                raise RuntimeError("update failed")
            update(c, slot, steps)

        opt._update = failing
        with pytest.raises(RuntimeError, match="update failed"):
            opt.step()
        opt._update = update
        for _ in range(2):  # the pipeline still has all its slots
            opt.step()
        assert opt._pool._made == 3  # no slot was lost (a lost one would make a step wait forever)
