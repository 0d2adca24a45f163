"""Tiny configurations of every causal-LM family the test matrix covers.

``family_config("mixtral")`` is the family's own config class with small
shapes (4 layers, hidden 64, 4 experts ...): only the fields the config knows
are set, so each family keeps its particulars (MoE routing, MLA, sliding
windows, learned positions).  :data:`FAMILIES` is the matrix of
``tests/test_families.py``; :data:`LIMITS` says, per family and runtime, why
one is not supported, and is what the test marks ``xfail`` and what the
support table in docs/OFFLOAD.md shows (``python -m llmtier.bench.families``
prints it).
"""
from __future__ import annotations

import sys
from typing import Any

TINY: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 512, "max_position_embeddings": 512, "n_embd": 64, "n_head": 4, "n_positions": 512, "n_inner": 128,
    "d_model": 64, "ffn_dim": 128, "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2,
    "n_routed_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16, "n_group": 1, "topk_group": 1, "sliding_window": 8, "rotary_dim": 8,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "tie_word_embeddings": False,
    "state_size": 8, "expand": 2, "conv_kernel": 4, "time_step_rank": 8,
}
LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# model_type -> overrides on top of TINY (what the family needs to build small)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "ministral": {}, "qwen2": {"tie_word_embeddings": True},
    "qwen3": {}, "qwen2_moe": {}, "qwen3_moe": {}, "qwen3_next": {},
    "phi": {}, "phi3": {}, "phimoe": {}, "gemma": {}, "gemma2": {}, "gemma3_text": {},
    "olmo": {}, "olmo2": {}, "olmoe": {}, "stablelm": {}, "starcoder2": {}, "cohere": {}, "cohere2": {},
    "granite": {}, "granitemoe": {}, "smollm3": {}, "glm": {}, "glm4": {}, "glm4_moe": {},
    "gpt2": {}, "gpt_bigcode": {}, "gpt_neo": {"attention_types": [[["global", "local"], 2]], "window_size": 8},
    "gpt_neox": {}, "gptj": {}, "codegen": {}, "bloom": {}, "opt": {"word_embed_proj_dim": 64}, "falcon": {},
    "jetmoe": {}, "gpt_oss": {}, "mamba": {}, "mixtral": {}, "deepseek_v2": {}, "deepseek_v3": {"head_dim": 8},
    "exaone": {}, "exaone4": {}, "llama4_text": {"interleave_moe_layer_step": 1}, "mpt": {},
    "persimmon": {}, "nemotron": {}, "helium": {}, "arcee": {}, "biogpt": {}, "ernie4_5": {},
    "hunyuan_v1_dense": {}, "seed_oss": {}, "xglm": {},
}

# (family, runtime) -> why it is not supported; runtime "weights" or "kv"
LIMITS: dict[tuple[str, str], str] = {
    ("mamba", "kv"): "its layers keep a recurrent (SSM) state, not per-token KV: TieredCache refuses it (use DynamicCache)",
    ("qwen3_next", "kv"): "its linear_attention layers keep a recurrent state, not per-token KV: TieredCache "
                          "refuses the model (use DynamicCache)",
}


def installed(model_type: str) -> bool:
    """Whether the installed transformers knows ``model_type`` (older supported versions lack some families)."""
    from transformers import CONFIG_MAPPING  # noqa: PLC0415

    return model_type in CONFIG_MAPPING


def family_config(model_type: str, *, layers: int = 4, **overrides: Any) -> Any:
    """The tiny config of ``model_type`` (see the module doc)."""
    from transformers import AutoConfig  # noqa: PLC0415

    base = AutoConfig.for_model(model_type)
    attrs = set(vars(base)) | set(getattr(base, "attribute_map", {}))
    want = {**TINY, **FAMILIES.get(model_type, {}), **overrides}
    kw = {k: v for k, v in want.items() if k in attrs and v is not None}
    for k in LAYERS_KEYS:
        if k in attrs:
            kw[k] = layers
    return AutoConfig.for_model(model_type, **kw)


def make_family_model(directory: str, model_type: str, *, layers: int = 4, seed: int = 0, **overrides: Any) -> str:
    """Write a random-weight tiny ``model_type`` model (bf16) to ``directory`` with ``save_pretrained``."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    config = family_config(model_type, layers=layers, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    return directory


def support_table() -> str:
    """Markdown: one row per family, weights and KV tier, and why not where not."""
    rows = ["| family | weight streaming | KV tier (all layers spilled) |", "|---|---|---|"]
    for f in sorted(FAMILIES):
        w, k = LIMITS.get((f, "weights")), LIMITS.get((f, "kv"))
        rows.append(f"| {f} | {'no: ' + w if w else 'exact'} | {'no: ' + k if k else 'exact'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(support_table() + "\n")


__all__ = ["FAMILIES", "LIMITS", "TINY", "family_config", "installed", "make_family_model", "support_table"]
