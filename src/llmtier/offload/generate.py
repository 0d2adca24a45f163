"""``generate()`` with a clock: when each new token's logits were ready.

The first token's time is the prefill; the rest are decode steps.  Works for
any transformers causal LM (streamed or not, and the peers of the benchmarks).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timed:
    """What one timed generation produced."""

    tokens: list[list[int]]  # new tokens per row
    start: float
    stamps: list[float] = field(default_factory=list)  # perf_counter when each new token's logits were ready

    @property
    def prefill_s(self) -> float:
        return self.stamps[0] - self.start if self.stamps else 0.0

    @property
    def decode_s(self) -> float:
        return self.stamps[-1] - self.stamps[0] if len(self.stamps) > 1 else 0.0

    @property
    def decode_steps(self) -> int:
        return max(0, len(self.stamps) - 1)

    @property
    def decode_tok_s(self) -> float:
        """Decode steps per second (each step makes one token per row)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def record(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "decode_steps": self.decode_steps, "decode_tok_s": self.decode_tok_s,
                "total_s": (self.stamps[-1] - self.start) if self.stamps else 0.0}


def generate_timed(model: Any, input_ids: Any, new_tokens: int, *, attention_mask: Any = None,
                   sample: dict[str, Any] | None = None,
                   on_token: Callable[[int, float], None] | None = None, cache: Any = None,
                   exact: bool = True, options: dict[str, Any] | None = None, streamer: Any = None,
                   past_key_values: Any = None) -> Timed:
    """Generate up to ``new_tokens`` tokens per row; ``on_token(k, seconds_since_start)`` is called as token ``k`` is ready.

    ``exact=True`` (the benchmarks' mode) makes exactly ``new_tokens`` tokens,
    greedy or sampled with the ``sample`` keyword arguments (e.g.
    ``{"temperature": 0.8, "top_k": 50}``), so runs compare like for like.
    ``exact=False`` is ``model.generate()`` as transformers runs it: the
    model's ``generation_config`` (sampling, EOS ids ...) with ``options``
    (any ``generate()`` keyword: ``temperature``, ``top_p``,
    ``repetition_penalty``, ``stop_strings`` with ``tokenizer`` ...) on top,
    stopping at EOS or a stop string.  ``cache``: the KV cache to use (a
    ``TieredCache``, or one a prefix store filled: its tokens are not
    recomputed); it is passed under the name the installed transformers
    prefers.  ``streamer``: a transformers streamer (``put``/``end``) that
    sees each token as it comes.  ``past_key_values`` is the old name of
    ``cache`` (deprecated).
    """
    import torch  # noqa: PLC0415
    from transformers import LogitsProcessor, LogitsProcessorList  # noqa: PLC0415

    from .hfcompat import cache_kwargs  # noqa: PLC0415

    if past_key_values is not None:
        if cache is not None:
            raise ValueError("give cache= (past_key_values= is its old name), not both")
        cache = past_key_values
    timed = Timed([], 0.0)

    class Clock(LogitsProcessor):
        def __call__(self, ids: Any, scores: Any) -> Any:
            now = time.perf_counter()
            timed.stamps.append(now)
            if on_token is not None:
                on_token(len(timed.stamps), now - timed.start)
            return scores

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    kw: dict[str, Any] = {}
    if exact:
        kw = {"do_sample": False} if sample is None else {"do_sample": True, **sample}
        kw["min_new_tokens"] = new_tokens
    elif sample is not None:
        kw = {"do_sample": True, **sample}
    kw.update(options or {})
    if cache is not None:
        kw.update(cache_kwargs(cache))
    if streamer is not None:
        kw["streamer"] = streamer
    gc = getattr(model, "generation_config", None)
    if getattr(gc, "pad_token_id", None) is None and "pad_token_id" not in kw:  # only keeps generate() quiet
        eos = getattr(gc, "eos_token_id", None)
        kw["pad_token_id"] = (eos[0] if isinstance(eos, (list, tuple)) and eos else eos) if eos is not None else 0
    with torch.no_grad():
        timed.start = time.perf_counter()
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                             logits_processor=LogitsProcessorList([Clock()]), **kw)
    timed.tokens = out[:, input_ids.shape[1]:].tolist()
    return timed


__all__ = ["Timed", "generate_timed"]
