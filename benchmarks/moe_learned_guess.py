"""Could a learned guess beat the plain router one or more layers ahead?

Offline, on the in-memory model: the experts' inputs of every MoE layer and
the experts each layer routed to are recorded on calibration prompts (prefill
and decode tokens) and on held-out prompts (decode tokens).  For each layer L
and depth d, a linear map from layer L's expert input to layer L+d's router
logits is fitted by ridge regression pulled toward L+d's own router weight
(``lam`` large = the plain router), and both guesses' top-k recall is
measured on the held-out tokens.  ``predict=True``/``"auto"`` use the plain
router of L+1 on layer L's input (``llmtier.offload.moe``).

Usage (an HF directory written by ``llmtier bench moe``)::

    python benchmarks/moe_learned_guess.py MODEL_DIR --train-prompts 96
"""
from __future__ import annotations

import argparse
import collections
import time

import torch
import transformers

from llmtier.bench.moe_models import moe_blocks


def collect(model, blocks, seeds, steps: int, prefill_too: bool):
    """(layer -> expert inputs [tokens, H], layer -> routed [tokens, k]) over greedy generations from ``seeds``."""
    cur_in, cur_top = {}, {}

    def on_block(i):
        def hook(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            cur_in[i] = h.reshape(-1, h.shape[-1]).float()
        return hook

    def on_experts(i):
        def hook(_m, args, kwargs):
            top = args[1] if len(args) > 1 else kwargs["top_k_index"]
            cur_top[i] = top.reshape(-1, top.shape[-1]).clone()
        return hook

    hooks = [h for i, b in enumerate(blocks)
             for h in (b.register_forward_pre_hook(on_block(i), with_kwargs=True),
                       b.experts.register_forward_pre_hook(on_experts(i), with_kwargs=True))]
    xs, ts = collections.defaultdict(list), collections.defaultdict(list)

    def keep() -> None:
        for i in range(len(blocks)):
            xs[i].append(cur_in[i])
            ts[i].append(cur_top[i])
    try:
        for seed in seeds:
            ids = torch.randint(1, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                out = model(ids, use_cache=True)
                if prefill_too:
                    keep()
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                for _ in range(steps):
                    out = model(tok, past_key_values=cache, use_cache=True)
                    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    keep()
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in xs.items()}, {i: torch.cat(v) for i, v in ts.items()}


def recall(scores: torch.Tensor, truth: torch.Tensor) -> float:
    k = truth.shape[1]
    top = scores.topk(k, dim=-1).indices
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, truth)) / (truth.shape[0] * k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--train-prompts", type=int, default=96)
    ap.add_argument("--test-prompts", type=int, default=5)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--depths", default="1,2,3")
    ap.add_argument("--lams", default="1,10,100")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).eval()
    blocks = moe_blocks(model)
    routers = [b.gate.weight.float() for b in blocks]
    t0 = time.perf_counter()
    x_train, _ = collect(model, blocks, range(1000, 1000 + a.train_prompts), a.steps, True)
    x_test, t_test = collect(model, blocks, range(a.test_prompts), a.steps, False)
    print(f"{x_train[0].shape[0]} calibration tokens, {x_test[0].shape[0]} held-out decode tokens "
          f"({time.perf_counter() - t0:.0f} s)")
    lams = [float(v) for v in a.lams.split(",")]
    for d in (int(v) for v in a.depths.split(",")):
        plain, learned = [], {lam: [] for lam in lams}
        for i in range(len(blocks) - d):
            w = routers[i + d]
            x, z = x_train[i], x_train[i + d] @ w.T  # the true logits of layer i+d on the same tokens
            plain.append(recall(x_test[i] @ w.T, t_test[i + d]))
            gram = x.T @ x
            for lam in lams:
                m = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0]), x.T @ z + lam * w.T)
                learned[lam].append(recall(x_test[i] @ m, t_test[i + d]))
        print(f"depth {d}: plain router {sum(plain) / len(plain):.3f}  " +
              "  ".join(f"ridge lam={lam:g} {sum(v) / len(v):.3f}" for lam, v in learned.items()))


if __name__ == "__main__":
    main()
