"""Running a PyTorch model (packed or dense): held-out loss and greedy generation with timing."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..runner import next_token_loss
from .packed_modules import PackingError


def heldout_loss(model: nn.Module, tokens: torch.Tensor, batch: int = 4) -> float:
    """Mean next-token loss over ``tokens`` (n_seq, len), a few sequences at a time.

    Same value as ``next_token_loss(model(tokens).logits, tokens)`` (every sequence has the same
    length, so the mean of batch means weighted by size is the overall mean) with less peak memory.
    """
    total, n = 0.0, tokens.shape[0]
    with torch.no_grad():
        for start in range(0, n, batch):
            chunk = tokens[start:start + batch]
            total += next_token_loss(model(input_ids=chunk, use_cache=False).logits, chunk) * chunk.shape[0]
    return total / n


def generate_ids(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id=None,
                 pad_token_id=None, exact: bool = False, should_stop=None) -> torch.Tensor:
    """Greedy continuation; ``exact`` forces exactly ``max_new_tokens`` (for speed measurements);
    ``should_stop()`` is checked after every token (a server's deadline, a client that left)."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    class StopWhen(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            return torch.full((ids.shape[0],), bool(should_stop()), dtype=torch.bool, device=ids.device)

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              min_new_tokens=max_new_tokens if exact else None,
                              eos_token_id=None if exact else eos_token_id,
                              pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id)
    extra = {"stopping_criteria": StoppingCriteriaList([StopWhen()])} if should_stop is not None else {}
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             generation_config=config, **extra)
    return out[:, input_ids.shape[1]:]


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)
    if not ids:
        raise PackingError("the prompt encodes to no tokens: pass some text")
    return torch.tensor([ids], dtype=torch.long)


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = False,
                  should_stop=None) -> dict:
    """Greedy text generation with timing: {text, prompt_tokens, new_tokens, seconds, tokens_per_s}."""
    ids = encode_prompt(tokenizer, prompt, chat)
    started = time.perf_counter()
    new = generate_ids(model, ids, max_new_tokens, eos_token_id=getattr(tokenizer, "eos_token_id", None),
                       pad_token_id=getattr(tokenizer, "pad_token_id", None), should_stop=should_stop)[0]
    seconds = time.perf_counter() - started
    return {"text": tokenizer.decode(new.tolist(), skip_special_tokens=True), "prompt_tokens": ids.shape[1],
            "new_tokens": int(new.numel()), "seconds": seconds,
            "tokens_per_s": new.numel() / seconds if seconds > 0 else None}
