"""The synthetic MoE models of ``llmtier bench moe`` and the llmtier store each is streamed from.

Models are Mixtral- and Qwen3-MoE-shaped, random bf16 weights scaled to a
few GiB.  Random routers route nearly uniformly (``uniform``); the
``skew`` routing is a documented synthetic change of the same model: hidden
dimension 0 carries a constant (the embeddings' column 0 is 1.0 and no layer
writes to it: attention's ``o_proj`` and the experts' ``down_proj`` have
their row 0 zeroed), and each router's column 0 turns it into a bias of
``-alpha * ln(rank)`` on the logit of the expert of that popularity rank
(ranks permuted per layer): Zipf-like popularity, alpha 1.5 by default.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .moe import MoEBenchConfig

# model_type -> config overrides (2-4 GiB of bf16)
SHAPES: dict[str, dict[str, Any]] = {
    "mixtral": {"hidden_size": 1024, "intermediate_size": 3584, "num_local_experts": 8, "num_experts": 8, "num_experts_per_tok": 2,
                "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000, "layers": 14},
    "qwen3_moe": {"hidden_size": 1024, "moe_intermediate_size": 384, "num_experts": 128, "num_local_experts": 128, "num_experts_per_tok": 8,
                  "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32000,
                  "layers": 9},
}
QUICK: dict[str, dict[str, Any]] = {
    "mixtral": {"hidden_size": 128, "intermediate_size": 256, "num_local_experts": 8, "num_experts": 8, "num_experts_per_tok": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "layers": 6},
    "qwen3_moe": {"hidden_size": 128, "moe_intermediate_size": 64, "num_experts": 32, "num_local_experts": 32, "num_experts_per_tok": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "layers": 6},
}


def moe_blocks(model: Any) -> list[Any]:
    """The MoE blocks (a router ``gate`` and ``experts``) of ``model``'s decoder layers, in layer order."""
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")]


def _moe_parts(model: Any) -> list[tuple[Any, Any, Any]]:
    """(attention o_proj, experts, router) per MoE layer."""
    return [(layer.self_attn.o_proj, layer.mlp.experts, layer.mlp.gate) for layer in model.model.layers
            if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")]


def apply_skew(model: Any, alpha: float, seed: int = 0) -> None:
    """Make expert popularity Zipf-like (see the module doc); changes ``model`` in place."""
    import torch  # noqa: PLC0415

    parts = _moe_parts(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for o_proj, experts, gate in parts:
            o_proj.weight[0, :] = 0
            experts.down_proj[:, 0, :] = 0
            gate.weight[:, 0] = 0
        seen: list[float] = []
        hooks = [gate.register_forward_pre_hook(lambda m, a: seen.append(float(a[0].reshape(-1, a[0].shape[-1])[:, 0]
                                                                                     .float().mean())))
                 for _, _, gate in parts]
        ids = torch.randint(1, model.config.vocab_size, (2, 32), generator=g)
        model(ids)
        for h in hooks:
            h.remove()
        for (_, _, gate), h0 in zip(parts, seen):
            n = gate.weight.shape[0]
            rank = torch.randperm(n, generator=g).float() + 1
            bias = -alpha * torch.log(rank)
            gate.weight[:, 0] = (bias / h0).to(gate.weight.dtype)


def ensure_model(directory: str, model_type: str, routing: str, cfg: MoEBenchConfig, progress: bool = True) -> str:
    """Write (once) the random MoE model of ``model_type`` with ``routing`` under ``directory``; its path."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    from .families import family_config  # noqa: PLC0415

    shape = dict((QUICK if cfg.quick else SHAPES)[model_type])
    layers = shape.pop("layers")
    key = hashlib.sha256(json.dumps([model_type, routing, shape, layers, cfg.alpha], sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(directory, f"{model_type}-{routing}-{key}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    if progress:
        print(f"writing {model_type} ({routing}) to {path} ...", file=sys.stderr)
    config = family_config(model_type, layers=layers, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if routing == "skew":
        apply_skew(model, cfg.alpha)
    tmp = path + ".tmp"
    model.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def ensure_store(path: str) -> str:
    """The llmtier store of the model at ``path`` (4 KiB-aligned extents: each expert is read straight into
    place; safetensors' unaligned offsets would go through whole-size bounce buffers), written once."""
    from ..store.convert import convert  # noqa: PLC0415

    dst = path + ".store"
    if not os.path.exists(os.path.join(dst, "index.json")):
        convert(path, dst, max_shard_bytes=8 << 30, progress=False)
    return dst


def _weights_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


__all__ = ["QUICK", "SHAPES", "apply_skew", "ensure_model", "ensure_store", "moe_blocks"]
