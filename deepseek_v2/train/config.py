"""Training hyperparameters: `TrainConfig`, read from a JSON or TOML file plus `--set` overrides.
The model's shape is a nested dict in the official config.json names (ModelArgs does the rest)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainConfig:
    # model: ModelArgs fields (official config.json names), or a checkpoint directory to start from
    model: dict = field(default_factory=dict)
    init_from: str | None = None
    tokenizer: str | None = None  # default: init_from's tokenizer, else the package's
    # data (pretraining: .bin token files; SFT: chat .jsonl files)
    train_data: str = "data/demo/train.bin"
    val_data: str | None = "data/demo/val.bin"
    seq_len: int = 1024
    # context extension (train/long_context.py): retrieval rows and chat conversations mixed into the text
    retrieval_fraction: float = 0.0  # share of the rows that are needle retrieval conversations
    # share of those whose first conversation fills half to all of the row (the others: log-uniform from 1K)
    retrieval_long_share: float = 0.0
    chat_data: str | None = None  # chat .jsonl whose conversations fill chat_fraction of each text row
    chat_fraction: float = 0.0
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward pass
    micro_batch_size: int = 8  # sequences per forward pass per process
    grad_accum_steps: int = 1  # global batch = micro_batch_size * grad_accum_steps * processes
    # optimisation
    max_steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 100
    lr_decay: float = 0.316  # multiplied in at 60% and again at 90% of max_steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    device_balance_alpha: float = 0.0  # alpha2
    comm_balance_alpha: float = 0.0  # alpha3
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_sequences: int = 64  # held-out sequences per evaluation (at most the whole set)
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    out_dir: str = "runs/train"
    resume: bool = False  # continue from out_dir/train_state.pt when there is one
    max_minutes: float | None = None  # time budget of the loop (setup not counted): train.TimeBudget
    # hardware
    device: str = "auto"  # auto: CUDA when available
    peak_flops: float = 989e12  # per process, for MFU (H100/H200 SXM dense bf16)
    save_dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for key in ("seq_len", "micro_batch_size", "grad_accum_steps", "max_steps", "eval_every",
                    "eval_sequences", "log_every"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train config '{key}' must be positive, got {getattr(self, key)}")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: dict | None = None) -> "TrainConfig":
        """A JSON or TOML file, then overrides {"key": value}, dotted for the model ("model.hidden_size")."""
        raw: dict = {}
        if path is not None:
            if str(path).endswith(".toml"):
                import tomllib
                with open(path, "rb") as f:
                    raw = tomllib.load(f)
            else:
                raw = json.loads(Path(path).read_text())
        for key, value in (overrides or {}).items():
            *parents, leaf = key.split(".")
            target = raw
            for p in parents:
                target = target.setdefault(p, {})
            target[leaf] = value
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown train config key(s): {sorted(unknown)}")
        return cls(**raw)
