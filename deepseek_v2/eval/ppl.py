"""Perplexity of a text file at a given context length, with a sliding window (`deepseek-v2 eval ppl`):
for comparing a checkpoint before and after a context extension.

The text is tokenized whole (BOS first). Windows of `context` tokens start every `stride` tokens;
each scores only the tokens that no earlier window scored, so every token is predicted at most
once, with at least context - stride tokens (all of them in the first window) before it in its
window. Positions restart at 0 in every window. stride = context: disjoint windows (the first
token of each is not predicted).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def sliding_window_nll(model, ids: list[int], context: int, stride: int | None = None) -> dict:
    """{"tokens": predicted tokens, "windows", "nll": mean negative log-likelihood, "ppl"}."""
    stride = stride or context
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in [1, context], got {stride} for context {context}")
    if len(ids) < 2:
        raise ValueError("the text needs at least two tokens")
    device = model.device
    total, count, windows, scored_to = 0.0, 0, 0, 1  # tokens [1, scored_to) have been predicted
    begin = 0
    while scored_to < len(ids):
        end = min(begin + context, len(ids))
        window = torch.tensor(ids[begin:end], device=device)[None]
        targets = window[:, 1:].clone()
        targets[:, :max(scored_to - begin - 1, 0)] = -100  # already scored by an earlier window
        logits = model(window[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                 reduction="sum").item()
        count += int((targets != -100).sum())
        windows, scored_to = windows + 1, end
        begin += stride
    nll = total / count
    return {"tokens": count, "windows": windows, "context": context, "stride": stride, "nll": nll,
            "ppl": math.exp(min(nll, 50))}


def text_perplexity(model, tokenizer, text: str, context: int, stride: int | None = None) -> dict:
    return sliding_window_nll(model, tokenizer.encode(text), context, stride)
