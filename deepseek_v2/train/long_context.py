"""Context extension (configs/demo-extend-32k.json): continue a checkpoint at a longer sequence length
with a larger YaRN factor, on long rows of two kinds.

- Text rows: whole documents of the token file packed into the row from a random document start
  (its documents are already BOS + text + EOS), after `chat_fraction` of the row is filled with chat
  conversations (loss on the assistant's replies, as in fine-tuning), so that the model keeps its
  chat format while it learns the new positions.
- Retrieval rows (`retrieval_fraction` of the rows): conversations in the chat format whose user
  message is a stretch of the corpus (whole documents joined by blank lines) with a needle
  (eval/needles.py: a pass key or a fact) at a uniformly random depth, then the question; the loss
  is on the reply only. The row's first conversation has a log-uniform length between 1K tokens and
  the whole row, or (`retrieval_long_share` of these rows) a uniform one between half and all of it:
  a question whose own message began tens of thousands of tokens back is what the needle test at
  the full length asks, and log-uniform lengths alone rarely reach it; shorter conversations
  (log-uniform again) fill what is left; the rest is EOS padding without loss.

What a row holds follows from (seed, row index) alone, so a resumed or multi-process run reads the
same rows. The held-out loss of the recipe is the plain one of train.py on the held-out token file
cut into rows of the new length: the long-context eval loss.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import torch

from ..eval.needles import KINDS, insert_needle, make_needle, retrieval_prompt
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .data import IGNORE, chat_example, load_tokens, read_chat_jsonl

MIN_CONVERSATION = 512  # tokens: the shortest retrieval conversation
OVERHEAD = 64  # tokens a retrieval conversation takes besides its haystack (template, needle, question, reply)


class LongContextRows:
    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, seq_len: int, cfg: TrainConfig):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, cfg.seed
        self.retrieval_fraction, self.chat_fraction = cfg.retrieval_fraction, cfg.chat_fraction
        self.retrieval_long_share = cfg.retrieval_long_share
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.doc_starts = np.flatnonzero(np.asarray(self.tokens) == bos)  # every document opens with BOS
        if len(self.doc_starts) == 0 or len(self.tokens) < seq_len + 1:
            raise ValueError(f"{path}: needs BOS-delimited documents and at least {seq_len + 1} tokens")
        self.special = {bos, eos}
        self.chats = read_chat_jsonl(cfg.chat_data) if cfg.chat_data and cfg.chat_fraction > 0 else []
        self.chat_cache: dict[int, tuple[list[int], list[int]]] = {}
        # any number of rows can be made; one per 1K tokens of text keeps epochs meaningful
        self.num_sequences = max(1, len(self.tokens) // 1024)

    # ---- pieces ----------------------------------------------------------------------------------
    def documents(self, rng: np.random.Generator, n_tokens: int) -> np.ndarray:
        """About n_tokens of whole consecutive documents from a random document start (wrapping at the end)."""
        start = int(self.doc_starts[rng.integers(len(self.doc_starts))])
        span = np.asarray(self.tokens[start:start + n_tokens])
        if len(span) < n_tokens:
            span = np.concatenate([span, np.asarray(self.tokens[:n_tokens - len(span)])])
        return span

    def chat(self, i: int) -> tuple[list[int], list[int]]:
        if i not in self.chat_cache:
            self.chat_cache[i] = chat_example(self.tokenizer, self.chats[i])
        return self.chat_cache[i]

    def retrieval_example(self, rng: np.random.Generator, length: int) -> tuple[list[int], list[int]]:
        """One conversation of at most `length` tokens: the haystack with a needle, the question, the reply."""
        needle = make_needle(KINDS[rng.integers(len(KINDS))], random.Random(int(rng.integers(2**63))))
        span = self.documents(rng, max(length - OVERHEAD, 16))
        cuts = np.flatnonzero(np.isin(span, list(self.special)))
        docs = [d for d in np.split(span, cuts) if len(d)]
        depth = float(rng.random())
        while True:
            docs = [d[~np.isin(d, list(self.special))] for d in docs]
            text = "\n\n".join(self.tokenizer.decode(d.tolist()).strip() for d in docs if len(d))
            messages = [{"role": "user", "content": retrieval_prompt(insert_needle(text, needle.text, depth), needle)},
                        {"role": "assistant", "content": needle.answer}]
            ids, mask = chat_example(self.tokenizer, messages)
            if len(ids) <= length:
                return ids, mask
            # the joins and the re-encoding made it longer: cut the haystack's end by the excess
            keep = sum(len(d) for d in docs) - (len(ids) - length) - 8
            if keep < 1:  # no room for a haystack at all
                return ids[:length], mask[:length]
            flat = np.concatenate(docs)[:max(keep, 1)]
            docs = [flat]

    # ---- rows ------------------------------------------------------------------------------------
    def row(self, index: int) -> tuple[list[int], list[int]]:
        width = self.seq_len + 1
        rng = np.random.default_rng([self.seed, int(index)])
        ids: list[int] = []
        mask: list[int] = []
        if rng.random() < self.retrieval_fraction:
            if rng.random() < self.retrieval_long_share:  # a first conversation of half the row or more
                length = int(rng.uniform(width // 2, width))
            else:
                low = min(1024, width)
                length = int(math.exp(rng.uniform(math.log(low), math.log(width))))
            while width - len(ids) >= min(MIN_CONVERSATION, length):
                example = self.retrieval_example(rng, length)
                ids, mask = ids + example[0], mask + example[1]
                room = width - len(ids)
                if room < MIN_CONVERSATION:
                    break
                length = int(math.exp(rng.uniform(math.log(MIN_CONVERSATION), math.log(room))))
        else:
            while self.chats and len(ids) < self.chat_fraction * width:
                example = self.chat(int(rng.integers(len(self.chats))))
                ids, mask = ids + example[0], mask + example[1]
            text = self.documents(rng, width - len(ids)).tolist()
            ids, mask = ids + text, mask + [1] * len(text)
        ids, mask = ids[:width], mask[:width]
        pad = width - len(ids)
        return ids + [self.tokenizer.eos_token_id] * pad, mask + [0] * pad

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.row(i) for i in indices]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.int64)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        return ids[:, :-1], ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE)


def extend(cfg: TrainConfig) -> dict:
    """Run the context-extension recipe: train.py's loop on LongContextRows, held-out loss on the
    held-out token file at the new length."""
    from .train import train
    if not cfg.init_from:
        raise ValueError("context extension starts from a checkpoint: set init_from in the config")
    return train(cfg, load_data=lambda path, tokenizer, seq_len: LongContextRows(path, tokenizer, seq_len, cfg),
                 load_val=load_tokens)
