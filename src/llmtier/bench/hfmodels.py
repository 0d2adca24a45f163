"""Small Hugging Face models with random weights and a locally trained
tokenizer, for tests, the demo and the benchmarks (nothing is downloaded).

``make_model(dir, "llama")`` writes a model directory exactly as
``save_pretrained`` does (config.json + model.safetensors) plus a byte-level
BPE tokenizer trained on a built-in text, so ``AutoTokenizer`` and
``AutoModelForCausalLM`` load it like any hub model.
"""
from __future__ import annotations

import json
import os
from typing import Any

# Small shapes per architecture; each keeps the family's particulars (GQA,
# tied embeddings, OPT's learned positions and biases).
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": False},
    "mistral": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
                "num_key_value_heads": 1, "sliding_window": 4096, "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": True},
    "opt": {"model_type": "opt", "hidden_size": 64, "ffn_dim": 160, "num_attention_heads": 4,
            "word_embed_proj_dim": 64, "max_position_embeddings": 512, "tie_word_embeddings": True},
}

TEXT = """Large language models hold their weights, their key and value caches and their optimizer state in
memory. When a model is larger than the memory it is given, the weights must come from a solid state disk,
layer by layer, for every token. The disk reads large blocks quickly, so the runtime reads each layer in one
request, ahead of the compute, into buffers it keeps. A storage engineer wants to know the request sizes,
the read and write ratio, whether the access is uniform, and where the time went. The quick brown fox jumps
over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump!
0 1 2 3 4 5 6 7 8 9 10 100 1000 tokens per second, gigabytes per second, milliseconds per token."""


def write_tokenizer(directory: str, vocab_size: int) -> int:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens on
    :data:`TEXT` and save it beside the model; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415 - [hf]

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 1000), special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "bos_token": "<|endoftext|>", "model_max_length": 4096}, f)
    return tok.get_vocab_size()


def make_config(arch: str, *, layers: int = 4, vocab: int = 512, **overrides: Any) -> Any:
    """The transformers config of a small ``arch`` model (see :data:`ARCHS`)."""
    from transformers import AutoConfig  # noqa: PLC0415

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    doc = {**ARCHS[arch], "num_hidden_layers": layers, "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0,
           "pad_token_id": 0, **overrides}
    model_type = doc.pop("model_type")
    return AutoConfig.for_model(model_type, **doc)


def make_model(directory: str, arch: str = "llama", *, layers: int = 4, vocab: int = 512, seed: int = 0,
               dtype: str = "bfloat16", tokenizer: bool = True, **overrides: Any) -> str:
    """Write a random-weight ``arch`` model (and a tokenizer) to ``directory``."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    config = make_config(arch, layers=layers, vocab=vocab, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(directory)
    if tokenizer:
        write_tokenizer(directory, vocab)
    return directory


__all__ = ["ARCHS", "TEXT", "make_config", "make_model", "write_tokenizer"]
