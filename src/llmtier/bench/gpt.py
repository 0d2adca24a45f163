"""A small GPT (decoder-only transformer) for the training benchmarks, in plain torch.

Pre-norm blocks of causal self-attention and a GELU MLP, learned position
embeddings, the token embedding tied to the head -- the GPT-2 shape.  Built
with random weights from a :class:`GPTConfig`; nothing is downloaded.

Weights may be bf16 (``model.to(torch.bfloat16)``) while the arithmetic runs
in ``compute_dtype`` (fp32 by default): each weight is cast on use, so the
gradients land on the bf16 parameters in bf16.  CPUs without bf16 matrix
units run bf16 matmuls many times slower than fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`; ``params()`` is its parameter count."""

    vocab: int = 8192
    context: int = 256
    layers: int = 4
    heads: int = 4
    dim: int = 256

    def params(self) -> int:
        per_layer = 12 * self.dim * self.dim + 13 * self.dim  # qkv, proj, mlp (4x) with biases, 2 norms
        return self.vocab * self.dim + self.context * self.dim + self.layers * per_layer + 2 * self.dim

    @classmethod
    def sized(cls, params: int, context: int = 256, vocab: int = 32768) -> GPTConfig:
        """A config of about ``params`` parameters (dim a multiple of 64, layers = dim / 64)."""
        best = cls(vocab=vocab, context=context, layers=1, heads=1, dim=64)
        for dim in range(64, 4097, 64):
            cfg = cls(vocab=vocab, context=context, layers=max(1, dim // 64), heads=max(1, dim // 64), dim=dim)
            if abs(cfg.params() - params) < abs(best.params() - params):
                best = cfg
        return best


def _linear(x: torch.Tensor, m: nn.Linear) -> torch.Tensor:
    return F.linear(x, m.weight.to(x.dtype), None if m.bias is None else m.bias.to(x.dtype))


def _norm(x: torch.Tensor, m: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, m.normalized_shape, m.weight.to(x.dtype), m.bias.to(x.dtype), m.eps)


class Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.up = nn.Linear(cfg.dim, 4 * cfg.dim)
        self.down = nn.Linear(4 * cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = _linear(_norm(x, self.ln1), self.qkv).split(d, dim=2)  # (B, T, D) each
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + _linear(y, self.proj)
        return x + _linear(F.gelu(_linear(_norm(x, self.ln2), self.up)), self.down)


class GPT(nn.Module):
    """Token ids ``(B, T)`` -> logits ``(B, T, vocab)``; with ``targets``, also the mean cross-entropy."""

    def __init__(self, cfg: GPTConfig, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.tok = nn.Embedding(cfg.vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.context, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = idx.shape[1]
        x = (self.tok(idx) + self.pos(torch.arange(t, device=idx.device))).to(self.compute_dtype)  # (B, T, D)
        for blk in self.blocks:
            x = blk(x)
        logits = _linear(_norm(x, self.ln), self.head)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1).long())
        return logits, loss


__all__ = ["GPT", "GPTConfig"]
