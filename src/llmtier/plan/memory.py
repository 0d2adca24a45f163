"""The memory model: what a model's weights, KV cache, activations and training state take, from its HF config.

:func:`model_memory` builds the model on the meta device (no memory, no
weights) and counts every parameter once (tied heads once), per decoder layer
and outside the layers, MoE experts apart; when the model directory holds a
checkpoint its header's bytes replace the count (quantized or mixed dtypes as
stored).  KV bytes per token come from the attention geometry transformers
caches (GQA heads, MLA's K and V head sizes, sliding and chunked windows,
layers without KV); :meth:`ModelMemory.training` is the training state.

The textbook table (10B parameters, fp16): weights 2 bytes, gradients 2 bytes
(PyTorch keeps a gradient in its parameter's dtype), Adam 3 x the weights
(master copy and two moments in the weights' dtype): 20 + 20 + 60 = 100 GB.
llmtier's :class:`~llmtier.offload.optim.OffloadedAdamW` keeps its moments in
fp32 and an fp32 master for bf16/fp16 weights, on SSD:
:meth:`TrainingMemory.offloaded_state_bytes`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import LLMTierError

DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "float16": 2, "half": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "float64": 8, "int8": 1, "uint8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1}
KV_NONE = 0  # a layer window meaning "this layer keeps no per-token KV"


class ModelConfigError(LLMTierError, ValueError):
    """A model directory or config the memory model cannot read."""


@dataclass
class LayerMemory:
    """One decoder layer: its weight bytes (experts apart) and what one token of its KV takes (batch 1)."""

    index: int
    weight_bytes: int
    expert_bytes: int = 0  # of weight_bytes: the routed experts (MoE)
    experts: int = 0  # routed experts in the layer
    kv_token_bytes: int = 0  # K and V of one token; 0: no per-token KV (recurrent, MoE-only, shared KV)
    window: int | None = None  # sliding/chunked window (tokens kept); None: full attention


@dataclass
class TrainingMemory:
    """Training state of one step in bytes (see the module doc for the conventions)."""

    params: int
    weights: int
    gradients: int
    optimizer: int  # the textbook Adam: master + two moments in the weights' dtype
    activations: int  # saved for backward, without checkpointing
    activations_checkpointed: int  # with per-layer activation checkpointing
    offloaded_state_bytes: int  # OffloadedAdamW's state file (fp32 moments, fp32 master for low-precision weights)

    @property
    def total(self) -> int:
        """Weights + gradients + optimizer (the seed's total; activations apart)."""
        return self.weights + self.gradients + self.optimizer


@dataclass
class ModelMemory:
    """What a model takes, split the way placement needs it."""

    model_type: str
    dtype: str
    itemsize: int
    params: int
    outside_bytes: int  # norms, head (and a tied embedding): held whatever the budget
    embedding_bytes: int  # an untied input embedding table (readable by rows); 0 when tied
    layers: list[LayerMemory]
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    tied: bool
    from_checkpoint: bool = False
    experts_per_token: int = 0
    notes: list[str] = field(default_factory=list)
    attn_implementation: str = "sdpa"  # the config's (transformers picks SDPA when none is set)

    @property
    def weight_bytes(self) -> int:
        return self.outside_bytes + self.embedding_bytes + sum(lay.weight_bytes for lay in self.layers)

    @property
    def layer_bytes(self) -> list[int]:
        return [lay.weight_bytes for lay in self.layers]

    @property
    def expert_bytes(self) -> int:
        return sum(lay.expert_bytes for lay in self.layers)

    @property
    def kv_token_bytes(self) -> int:
        """K and V of one token over every layer (batch 1), windows ignored."""
        return sum(lay.kv_token_bytes for lay in self.layers)

    @property
    def windows(self) -> list[int | None]:
        """Per KV-holding layer: its window, ``None`` for full attention."""
        return [lay.window for lay in self.layers if lay.kv_token_bytes]

    def kv_bytes(self, batch: int, tokens: int) -> int:
        """KV cache of ``batch`` sequences of ``tokens`` (sliding layers hold at most their window)."""
        return sum(lay.kv_token_bytes * batch * (tokens if lay.window is None else min(tokens, lay.window))
                   for lay in self.layers)

    def prefill_activation_bytes(self, batch: int, tokens: int) -> int:
        """Peak of live activations in a prefill of ``batch`` x ``tokens`` (one layer at a time): the residual
        stream, its normed copy, the MLP's (or the experts') intermediate, the attention's square term, and the
        logits of the last position in fp32 (generate keeps only those).  The square term: with ``eager`` attention
        the scores and probabilities of every head; with SDPA (transformers' default) at most a boolean mask of
        ``tokens``² per sequence -- the CPU's SDPA runs a blocked (flash) kernel and keeps no scores (measured:
        a prefill of 1 x 2048 tokens grew the RSS less than one of 4 x 512, docs/BENCHMARKS.md)."""
        bt = batch * tokens
        inter = self.intermediate * (2 if self.experts_per_token == 0 else 2 * max(1, self.experts_per_token))
        per_layer = bt * (3 * self.hidden + inter) * self.itemsize
        if self.attn_implementation == "eager":
            square = 2 * batch * self.heads * tokens * tokens * self.itemsize  # scores and probabilities
        else:
            square = batch * tokens * tokens  # a boolean mask where one is built (padding, sliding windows)
        return per_layer + square + batch * self.vocab * 4

    def training(self, batch: int, seq: int) -> TrainingMemory:
        """The training state for one step of ``batch`` x ``seq`` tokens."""
        w = self.weight_bytes
        n_layers = max(1, len(self.layers))
        # saved for backward per layer, per token: ~ 32 hidden-sized tensors + 8 of the MLP width -- twice
        # Korthikanti et al.'s 34 sbh without the score matrix, for transformers' fp32 upcasts (RMSNorm, rotary,
        # softmax) on the CPU; and at the head bf16 logits, their fp32 copy, log-softmax and its gradient: 16 bytes a
        # vocabulary entry.  Calibrated on bench plan's dense b2/b4 x 128 rows (idle run, 2026-12-01 03:08: the
        # measured peak grew 175 KB a token, the textbook terms 88 KB), checked on its MoE row.
        per_token_layer = (32 * self.hidden + 8 * self.intermediate) * self.itemsize
        acts = batch * seq * (n_layers * per_token_layer) + batch * seq * self.vocab * 16
        ckpt = batch * seq * (n_layers * self.hidden * self.itemsize + per_token_layer) + batch * seq * self.vocab * 16
        low = self.itemsize < 4
        offloaded = self.params * 4 * (3 if low else 2)
        return TrainingMemory(self.params, w, w, 3 * w, acts, ckpt, offloaded)

    def table(self) -> list[tuple[str, int]]:
        """The memory model as (row, bytes), weights per part."""
        rows = [("weights", self.weight_bytes), ("  in decoder layers", sum(self.layer_bytes)),
                ("  outside the layers (norms, head, tied embeddings)", self.outside_bytes)]
        if self.embedding_bytes:
            rows.append(("  input embedding table (untied)", self.embedding_bytes))
        if self.expert_bytes:
            rows.append(("  of the layers: routed experts", self.expert_bytes))
        rows.append(("KV cache per token (batch 1, all layers)", self.kv_token_bytes))
        return rows


def _text(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def load_config(model: str | os.PathLike[str] | dict[str, Any] | Any) -> Any:
    """A transformers config from a model directory, a ``config.json`` path, a dict or a config."""
    from transformers import AutoConfig, PretrainedConfig  # noqa: PLC0415

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        doc = dict(model)
    else:
        p = os.fspath(model)
        path = os.path.join(p, "config.json") if os.path.isdir(p) else p
        if not os.path.exists(path) and os.path.isdir(p):  # an llmtier store keeps the config in its metadata
            stored = _store_config(p)
            if stored is not None:
                return load_config(stored)
        if not os.path.exists(path):
            raise ModelConfigError(f"{p}: no config.json (a Hugging Face model directory or config file is needed)")
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise ModelConfigError(f"{path}: not a readable JSON config ({e})") from e
    kind = doc.pop("model_type", None)
    if not kind:
        raise ModelConfigError("the config has no model_type")
    try:
        return AutoConfig.for_model(kind, **doc)
    except (ValueError, KeyError) as e:
        raise ModelConfigError(f"transformers does not know model_type {kind!r}: {e}") from e


def _store_config(path: str) -> dict[str, Any] | None:
    """The ``hf_config`` an llmtier store (``llmtier convert``) keeps in its metadata; None when it is not one."""
    from ..store.reader import open_store  # noqa: PLC0415

    try:
        with open_store(path, verify=False) as src:
            doc = src.metadata.get("hf_config")
    except (LLMTierError, OSError, ValueError):
        return None
    return dict(doc) if isinstance(doc, dict) and doc.get("model_type") else None


def _dtype_name(config: Any, dtype: Any) -> str:
    d = dtype if dtype is not None else (getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    name = str(d or "float32").replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ModelConfigError(f"unknown dtype {d!r}; one of {sorted(DTYPE_BYTES)}")
    return name


def _kv_geometry(text: Any) -> tuple[int, int, int, int]:
    """(K heads, K head size, V heads, V head size) of an attention layer as transformers caches it."""
    heads = getattr(text, "num_attention_heads", None) or 1
    if getattr(text, "kv_lora_rank", None) and getattr(text, "qk_rope_head_dim", None) is not None:
        # MLA (DeepSeek-V2/V3): transformers caches the compressed latent as K and the shared rope key as V
        return 1, text.kv_lora_rank, 1, text.qk_rope_head_dim
    kv = getattr(text, "num_key_value_heads", None) or heads
    if getattr(text, "multi_query", False):
        kv = 1
    dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return kv, dim, kv, dim


def _windows(text: Any, n: int) -> list[int | None]:
    """Per layer: None (full attention), the window, or :data:`KV_NONE` (no per-token KV)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs  # noqa: PLC0415

        types, kwargs = get_layer_types_and_kwargs(text)
        if isinstance(kwargs, dict):  # transformers < 5.2x: one set of kwargs shared by every layer
            kwargs = [kwargs] * len(types)
    except (ImportError, AttributeError, ValueError, TypeError):
        types, kwargs = ["full_attention"] * n, [{}] * n
    out: list[int | None] = []
    for t, kw in zip(types, kwargs):
        if t == "full_attention":
            out.append(None)
        elif t in ("sliding_attention", "chunked_attention") and isinstance(kw.get("sliding_window"), int):
            out.append(kw["sliding_window"])
        else:
            out.append(KV_NONE)
    return (out + [None] * n)[:n]


def _decoder_layers(model: Any, n: int | None) -> tuple[str, Any]:
    import torch  # noqa: PLC0415

    best: tuple[int, str, Any] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) and (n is None or len(mod) == n):
            c = sum(p.numel() for p in mod.parameters())
            if best is None or c > best[0]:
                best = (c, name, mod)
    if best is None:
        raise ModelConfigError(f"{type(model).__name__}: no ModuleList of {n} decoder layers")
    return best[1], best[2]


def _checkpoint_bytes(path: str) -> dict[str, int] | None:
    """Tensor name -> bytes from a model directory's safetensors headers (or an llmtier store); None when absent."""
    from ..store.reader import open_store  # noqa: PLC0415

    try:
        with open_store(path, verify=False) as src:
            return {t.name: t.nbytes for t in src.infos()}
    except (LLMTierError, OSError, ValueError):
        return None


def model_memory(model: str | os.PathLike[str] | dict[str, Any] | Any, *, dtype: Any = None) -> ModelMemory:
    """The memory model of ``model`` (a model directory, config.json, dict or transformers config).

    Weights are counted from the architecture at ``dtype`` (default: the config's); a model directory with a
    checkpoint gives each tensor's stored bytes instead (quantized dtypes as they are)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    config = load_config(model)
    text = _text(config)
    name = _dtype_name(config, dtype)
    itemsize = DTYPE_BYTES[name]
    n_layers = getattr(text, "num_hidden_layers", None)
    try:
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # any failure to build is the config's
        raise ModelConfigError(f"cannot build {getattr(config, 'model_type', '?')} from its config: {e}") from e
    prefix, layer_list = _decoder_layers(net, n_layers)
    layer_of = {id(p): i for i, layer in enumerate(layer_list) for p in layer.parameters()}
    emb = net.get_input_embeddings()
    emb_w = getattr(emb, "weight", None)
    head = net.get_output_embeddings()
    tied = head is not None and emb_w is not None and getattr(head, "weight", None) is emb_w
    ckpt = _checkpoint_bytes(os.fspath(model)) if isinstance(model, (str, os.PathLike)) and os.path.isdir(model) else None
    per = [[0, 0, 0] for _ in layer_list]  # bytes, expert bytes, experts
    outside = emb_bytes = params = 0
    seen: set[int] = set()
    for pname, p in net.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        nbytes = ckpt.get(pname, p.numel() * itemsize) if ckpt else p.numel() * itemsize
        i = layer_of.get(id(p))
        if i is None:
            if p is emb_w and not tied:
                emb_bytes += nbytes
            else:
                outside += nbytes
            continue
        per[i][0] += nbytes
        if ".experts." in f".{pname}." or pname.endswith(".experts"):
            per[i][1] += nbytes
    for i, layer in enumerate(layer_list):
        for mname, mod in layer.named_modules():
            if mname.endswith("experts"):
                per[i][2] = max(per[i][2], int(getattr(mod, "num_experts", 0) or len(getattr(mod, "_modules", {}))))
    kh, kd, vh, vd = _kv_geometry(text)
    tok = (kh * kd + vh * vd) * itemsize
    wins = _windows(text, len(layer_list))
    layers = [LayerMemory(i, b, eb, ne, 0 if w == KV_NONE else tok, None if w == KV_NONE else w)
              for i, ((b, eb, ne), w) in enumerate(zip(per, wins))]
    experts_per_tok = int(getattr(text, "num_experts_per_tok", 0) or getattr(text, "moe_topk", 0) or 0) \
        if any(lay.expert_bytes for lay in layers) else 0
    inter = getattr(text, "moe_intermediate_size", None) if experts_per_tok else None
    inter = inter or getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * text.hidden_size
    notes = [f"decoder layers: {prefix} ({len(layers)})"]
    if ckpt:
        notes.append("weight bytes as stored in the checkpoint")
    return ModelMemory(str(getattr(config, "model_type", "?")), name, itemsize, params, outside, emb_bytes, layers,
                       text.hidden_size, int(inter), text.vocab_size, getattr(text, "num_attention_heads", 1) or 1,
                       tied, ckpt is not None, experts_per_tok, notes,
                       str(getattr(config, "_attn_implementation", None) or "sdpa"))


__all__ = ["DTYPE_BYTES", "LayerMemory", "ModelConfigError", "ModelMemory", "TrainingMemory", "load_config",
           "model_memory"]
