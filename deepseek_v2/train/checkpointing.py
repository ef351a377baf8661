"""Training checkpoints: out_dir/model in the official Hugging Face format (what the engine and
transformers load, with the tokenizer files) and out_dir/train_state.pt (fp32 weights, optimizer,
step, data position, RNG) from which a resumed run continues bit-exactly."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..config import ModelArgs
from ..model import DeepseekV2ForCausalLM
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .data import DataOrder
from .processes import Processes

STATE_FILE = "train_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what Tokenizer.save_pretrained writes


def load_train_state(path: Path, model, optimizer, order: DataOrder, procs: Processes) -> tuple[int, int, float]:
    """Restore what save_checkpoint wrote (weights, optimizer, data position, RNG); returns the step,
    the planned max_steps and the seconds the run had taken."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=full)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
    order.load_state_dict(state["data"])
    torch.set_rng_state(state["rng"]["cpu"])
    if procs.use_cuda and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    procs.log(f"resumed from {path} at step {state['step']}")
    return state["step"], state["max_steps"], state["elapsed_s"]


def save_checkpoint(cfg: TrainConfig, procs: Processes, model, optimizer, order: DataOrder, tokenizer_dir: str,
                    *, step: int, max_steps: int, run_start: float) -> None:
    """Write both; every process calls it (gathering the full state is a collective under FSDP), rank 0
    writes. run_start: the time.time() of step 0, earlier sessions of a resumed run included."""
    out = Path(cfg.out_dir)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=full)
    optim_state = get_optimizer_state_dict(model, optimizer, options=full)
    if procs.master:
        export_hf(model_state, model.args, out / "model", cfg.save_dtype, tokenizer_dir)
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if procs.use_cuda else {})}
        state = {"model": model_state, "optimizer": optim_state, "step": step, "max_steps": max_steps,
                 "data": order.state_dict(), "rng": rng, "elapsed_s": time.time() - run_start,
                 "config": dataclasses.asdict(cfg)}
        torch.save(state, out / (STATE_FILE + ".tmp"))
        os.replace(out / (STATE_FILE + ".tmp"), out / STATE_FILE)  # a crash never leaves half a state
        procs.log(f"saved {out / 'model'} and {out / STATE_FILE} at step {step}")
    if procs.world > 1:
        dist.barrier()


def export_hf(state_dict: dict, args: ModelArgs, path: Path, dtype: str, tokenizer_dir: str) -> None:
    """Write the official Hugging Face format (config.json, safetensors) plus the tokenizer files."""
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(args)
    model.load_state_dict(state_dict, assign=True)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    Tokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
