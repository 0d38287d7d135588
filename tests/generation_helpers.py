"""The reference the batched generator is checked against: transformers' own generate, one prompt at a
time, unpadded, greedy."""

from __future__ import annotations

import threading

import torch


def greedy_alone(model, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    """The generated tokens (in a thread of its own: on a busy CPU several times faster than the test's)."""
    out: list[list[int]] = []

    def work():
        with torch.no_grad():
            full = model.generate(
                input_ids=torch.tensor([ids], device=model.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                pad_token_id=tokenizer.pad_token_id,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        out.append(full[0, len(ids) :].tolist())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return out[0]


def greedy_text_alone(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    return tokenizer.decode(greedy_alone(model, tokenizer, ids, max_new_tokens), skip_special_tokens=True)
