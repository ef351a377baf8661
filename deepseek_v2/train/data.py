"""Training data: packed token sequences for pretraining and chat conversations for fine-tuning.

Pretraining text is tokenized once (`tokenize_text_files`) into uint16 token files, train.bin and a
held-out val.bin, each document as BOS + text + EOS. Training reads them memory-mapped
(`TokenSequences`), cut into sequences of seq_len + 1 tokens that overlap by one token (the inputs
and the targets shifted by one). Chat data is JSON lines of {"messages": [...]}, rendered with the
chat template and packed the same way (`ChatSequences`), with the loss on the assistant's tokens
only. `DataOrder` decides which sequences a step reads; its state is two integers, so a resumed run
reads exactly what the uninterrupted run would have.

Both datasets answer `get(indices) -> (inputs, targets)`: int64 [n, seq_len] tensors, targets -100
where no loss is taken.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..tokenizer import Tokenizer

DOC_SEPARATOR = "\f"  # a line holding only a form feed separates the documents of a text file
IGNORE = -100  # target id that takes no loss (F.cross_entropy's ignore_index)


# ---- pretraining text -> token files ---------------------------------------------------------------
def read_documents(path: str | os.PathLike) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    docs = text.split(f"\n{DOC_SEPARATOR}\n") if DOC_SEPARATOR in text else [text]
    return [d.strip(f"\n{DOC_SEPARATOR}") for d in docs if d.strip(f"\n {DOC_SEPARATOR}")]


def is_held_out(doc: str, fraction: float) -> bool:
    """A fixed pseudo-random choice per document (by content hash): same split on every machine."""
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def tokenize_text_files(files: list[str | os.PathLike], tokenizer: Tokenizer, out_dir: str | os.PathLike,
                        val_fraction: float = 0.01) -> dict:
    """Tokenize documents into out_dir/train.bin and out_dir/val.bin (uint16, each document
    BOS + text + EOS) and write out_dir/meta.json with the counts. Returns the meta dict."""
    if len(tokenizer) > 65536:
        raise ValueError(f"uint16 token files need a vocabulary under 65536, got {len(tokenizer)}")
    eos = tokenizer.eos_token_id
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    for file in files:
        for doc in read_documents(file):
            split = "val" if is_held_out(doc, val_fraction) else "train"
            parts[split].append(np.array(tokenizer.encode(doc) + [eos], dtype=np.uint16))
            docs[split] += 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"tokenizer_vocab": len(tokenizer), "files": [str(f) for f in files], "val_fraction": val_fraction}
    for split, arrays in parts.items():
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.uint16)
        tokens.tofile(out / f"{split}.bin")
        meta[split] = {"documents": docs[split], "tokens": int(tokens.size)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class TokenSequences:
    """A uint16 token file, memory-mapped, as sequences of seq_len + 1 tokens (sequence i starts at
    token i * seq_len; consecutive sequences share one token)."""

    def __init__(self, path: str | os.PathLike, seq_len: int):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.seq_len = seq_len
        self.num_sequences = (len(self.tokens) - 1) // seq_len
        if self.num_sequences < 1:
            raise ValueError(f"{path}: {len(self.tokens)} tokens, fewer than one sequence of {seq_len + 1}")

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.seq_len
        rows = torch.from_numpy(np.stack([self.tokens[i * S: i * S + S + 1] for i in indices]).astype(np.int64))
        return rows[:, :-1], rows[:, 1:]


def load_tokens(path: str | os.PathLike, tokenizer: Tokenizer, seq_len: int) -> TokenSequences:
    return TokenSequences(path, seq_len)


# ---- chat conversations ----------------------------------------------------------------------------
def chat_example(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered with the chat template, and a mask that is 1 on what the
    assistant writes (each reply and the EOS after it), 0 elsewhere.

    Each assistant turn splits the rendering into its prompt, render(messages[:i],
    add_generation_prompt=True), and its reply, the rest of render(messages[:i + 1]). The pieces are
    tokenized one by one, exactly as a chat prompt is tokenized at inference and the reply is then
    generated after it."""
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("a conversation cannot open with an assistant message")
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render a conversation as a sequence of growing prefixes")
        for text, trained in ((prompt[len(done):], 0), (full[len(prompt):], 1)):
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            mask += [trained] * len(piece)
        done = full
    if not any(mask):
        raise ValueError("a conversation without an assistant reply has nothing to train on")
    return ids, mask


def read_chat_jsonl(path: str | os.PathLike) -> list[list[dict]]:
    conversations = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or "messages" not in record:
                    raise ValueError(f"{path}:{n}: expected an object with 'messages'")
                conversations.append(record["messages"])
    return conversations


class ChatSequences:
    """Conversations packed whole, in file order, into rows of seq_len + 1 tokens (a longer one is
    cut); the rest of a row is EOS padding with mask 0."""

    def __init__(self, examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
        width = seq_len + 1
        rows_ids, rows_mask, ids, mask = [], [], [], []
        for ex_ids, ex_mask in examples:
            ex_ids, ex_mask = ex_ids[:width], ex_mask[:width]
            if len(ids) + len(ex_ids) > width:
                rows_ids.append(ids + [pad_id] * (width - len(ids)))
                rows_mask.append(mask + [0] * (width - len(mask)))
                ids, mask = [], []
            ids, mask = ids + ex_ids, mask + ex_mask
        if ids:
            rows_ids.append(ids + [pad_id] * (width - len(ids)))
            rows_mask.append(mask + [0] * (width - len(mask)))
        if not rows_ids:
            raise ValueError("no conversations")
        self.ids = torch.tensor(rows_ids, dtype=torch.int64)  # [R, seq_len + 1]
        self.mask = torch.tensor(rows_mask, dtype=torch.bool)
        self.seq_len = seq_len
        self.num_sequences = len(rows_ids)

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        ids, mask = self.ids[index], self.mask[index]
        return ids[:, :-1], ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE)


def load_chat(path: str | os.PathLike, tokenizer: Tokenizer, seq_len: int) -> ChatSequences:
    examples = [chat_example(tokenizer, messages) for messages in read_chat_jsonl(path)]
    return ChatSequences(examples, seq_len, tokenizer.eos_token_id)


# ---- which sequences each step reads ---------------------------------------------------------------
class DataOrder:
    """A fresh seeded permutation of the sequences every epoch, consumed in order."""

    def __init__(self, num_sequences: int, seed: int):
        self.n, self.seed = num_sequences, seed
        self.epoch, self.pos = 0, 0
        self._perm, self._perm_epoch = None, -1

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._perm_epoch = self.epoch
        return self._perm

    def take(self, count: int) -> np.ndarray:
        out = []
        while count > 0:
            chunk = self._permutation()[self.pos:self.pos + count]
            out.append(chunk)
            count -= len(chunk)
            self.pos += len(chunk)
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return np.concatenate(out)

    def peek(self, count: int) -> np.ndarray:
        """What the next take(count) will return, without taking it (this order's state is unchanged)."""
        ahead = DataOrder(self.n, self.seed)
        ahead.epoch, ahead.pos, ahead._perm, ahead._perm_epoch = self.epoch, self.pos, self._perm, self._perm_epoch
        return ahead.take(count)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class Prefetcher:
    """Makes the next step's micro-batches in a worker thread while the current step trains, so that
    building rows stays off the step's path (long-context rows decode, join and re-encode text: on an
    H200 that made a 32K-token step of the demo model 0.33-0.44 s where the model's work is less).
    The batches are the same either way: a row depends only on its index, and rows made ahead are used
    only if the step asks for exactly those indices."""

    def __init__(self, get: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]):
        self.get = get
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.pending: tuple[tuple, Future] | None = None

    @staticmethod
    def _key(groups: list[np.ndarray]) -> tuple:
        return tuple(tuple(g.tolist()) for g in groups)

    def _make(self, groups: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.get(g) for g in groups]

    def batches(self, groups: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """get(g) for each group of indices: made ahead if ahead() was given these groups, else now."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == self._key(groups):
            return pending[1].result()
        if pending is not None:
            pending[1].result()  # never two makers at once: a dataset need not be thread-safe
        return self._make(groups)

    def ahead(self, groups: list[np.ndarray]) -> None:
        """Start making the batches a coming batches() call will ask for."""
        if self.pending is not None:
            self.pending[1].result()
        self.pending = (self._key(groups), self.pool.submit(self._make, groups))

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
