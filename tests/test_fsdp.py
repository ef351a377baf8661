# Run: python -m pytest -q tests/test_fsdp.py   (FSDP2 over two gloo processes under torchrun, CPU, ~20 s)
"""The sharded path: `deepseek-v2 train` under torchrun with two CPU processes (FSDP2 fully_shard,
gloo) gives the same losses and weights as one process for the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_v2.tokenizer import Tokenizer
from deepseek_v2.train.data import tokenize_text_files
from deepseek_v2.train.config import TrainConfig
from deepseek_v2.train.train import train

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=4096, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=2,
            q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
            first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            max_position_embeddings=512, rope_scaling=None, bos_token_id=0, eos_token_id=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_match_one_process(tmp_path):
    from pydoc_data.topics import topics
    docs = [topics[k] for k in sorted(topics)][:30]
    (tmp_path / "text.txt").write_text("\n\f\n".join(docs))
    tokenize_text_files([tmp_path / "text.txt"], Tokenizer.from_pretrained(str(ROOT / "deepseek_v2" / "default_model")),
                        tmp_path, val_fraction=0.1)
    common = dict(model=TINY, train_data=str(tmp_path / "train.bin"), val_data=str(tmp_path / "val.bin"), seq_len=64,
                  micro_batch_size=2, max_steps=4, lr=3e-3, warmup_steps=1, eval_every=2, eval_sequences=6,
                  log_every=1, device="cpu", device_balance_alpha=0.05, comm_balance_alpha=0.02)
    # one process, 2 micro-batches of 2 sequences per step
    train(TrainConfig(**common, grad_accum_steps=2, out_dir=str(tmp_path / "one")))
    # two processes, 1 micro-batch of 2 sequences each: the same 4 sequences per step
    (tmp_path / "two.json").write_text(json.dumps(dict(common, grad_accum_steps=1, out_dir=str(tmp_path / "two"))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "deepseek_v2.cli", "train", str(tmp_path / "two.json")]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es) on cpu" in run.stdout

    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "balance_expert", "balance_device", "balance_comm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
        if "grad_norm" in a:  # torch's norm of sharded (DTensor) gradients rounds differently, ~1e-5
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert len([r for r in one if "loss" in r]) == 4
    w1 = torch.load(tmp_path / "one" / "train_state.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "two" / "train_state.pt", weights_only=True)["model"]
    assert w1.keys() == w2.keys()
    # Adam divides a gradient by its own running RMS, so where a gradient is near zero the few-ulp
    # difference of a sharded reduction can move a weight by up to lr per step. Such elements are rare
    # (a handful of 300K here, depending on the CPU's reduction order); everything else agrees to 1e-6.
    lr, steps = common["lr"], common["max_steps"]
    for name in w1:
        diff = (w1[name] - w2[name]).abs()
        assert diff.max() <= lr * steps, name
        assert (diff > 1e-6 + 1e-4 * w1[name].abs()).float().mean() <= 1e-3, name
    # the sharded run's checkpoint is a complete official-format model
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()
