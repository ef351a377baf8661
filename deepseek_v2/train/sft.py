"""Supervised fine-tuning: the pretraining loop (train.py) fed chat conversations instead of text.

Conversations are JSON lines of {"messages": [{"role", "content"}, ...]}, rendered with the chat
template of the tokenizer, packed whole into sequences, with the loss on the assistant's tokens only
(each reply and the EOS that ends it; data.chat_example). Training starts from a checkpoint
(`init_from`) and writes one in the same official format.

    deepseek-v2 sft configs/demo-sft.json [--set lr=1e-4 ...]
"""

from __future__ import annotations

from .config import TrainConfig
from .data import load_chat
from .train import train


def sft(cfg: TrainConfig) -> dict:
    if not cfg.init_from:
        raise ValueError("fine-tuning starts from a checkpoint: set init_from in the config")
    return train(cfg, load_data=load_chat)
