"""Pretraining in one loop, read top to bottom: hyperparameters, setup, a tiny learning-rate
function, then the loop (evaluate and checkpoint every N steps, accumulate, clip, step, log).
Fine-tuning (sft.py) is this same loop fed chat conversations.

    python -m deepseek_v2.train.train configs/demo-pretrain.json [--set lr=1e-3 ...]
    torchrun --nproc-per-node 8 -m deepseek_v2.train.train configs/demo-pretrain.json

- Model: a ModelArgs shape from the config (official config.json names), or a checkpoint (init_from).
- Data: packed token sequences (data.py), the same global batch for any number of processes.
- AdamW; linear warm-up, then the paper's step decay: x0.316 at 60% and again at 90% of the steps.
- Gradient accumulation and clipping; bf16 autocast on CUDA (fp32 weights and optimizer state).
- DeepSeekMoE balance losses (balance.py): expert (alpha1 = model.aux_loss_alpha), device (alpha2)
  and communication (alpha3) over the model's n_group device groups. Device-limited routing is the
  official group_limited_greedy routing: model.topk_method, n_group = devices, topk_group = M.
- Every eval_every steps: held-out loss and perplexity. Checkpoints: the official Hugging Face format
  in out_dir/model (bf16 by default, with the tokenizer) and out_dir/train_state.pt (fp32 weights,
  optimizer, step, data position, RNG) from which `resume` continues bit-exactly.
- Under torchrun (WORLD_SIZE > 1): FSDP2 fully_shard per decoder layer, gloo on CPU, nccl on CUDA.
- max_minutes: after 20 steps the schedule is shortened once to fit the time left, and the run stops
  (evaluating and saving) when time is up.
- Progress line: loss, balance loss, lr, grad norm, tokens/s, MFU (6 x activated parameters x
  tokens/s over peak_flops per process; attention FLOPs not counted) and the expert load spread.
  out_dir/metrics.jsonl holds every log and eval record (scripts/plot_training.py draws them);
  out_dir/expert_load.png shows the per-expert load per layer at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..config import DEFAULT_MODEL, ModelArgs
from ..model import DeepseekV2ForCausalLM
from ..moe import MoE
from ..tokenizer import Tokenizer
from .balance import BalanceLosses, balance_losses, expert_counts, load_fractions, load_spread, plot_expert_load
from .data import IGNORE, DataOrder, load_tokens

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
STATE_FILE = "train_state.pt"
TRAINING_ONLY_KEYS = {"aux_loss_alpha", "seq_aux"}  # may change when starting from a checkpoint


# ---- hyperparameters -------------------------------------------------------------------------------
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
    max_minutes: float | None = None  # time budget of the loop (setup not counted), see the docstring
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


# ---- setup helpers ---------------------------------------------------------------------------------
def distributed_env() -> tuple[int, int, int]:
    """rank, world size, local rank: what torchrun sets (the one place the environment is read)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def model_args(shape: dict) -> ModelArgs:
    known = {f.name for f in dataclasses.fields(ModelArgs)} | {"model_type", "architectures"}
    unknown = set(shape) - known
    if unknown:
        raise ValueError(f"unknown model key(s) in the train config: {sorted(unknown)}")
    return ModelArgs.from_hf_config(shape)


def build_model(cfg: TrainConfig) -> DeepseekV2ForCausalLM:
    if cfg.init_from is None:
        return DeepseekV2ForCausalLM(model_args(cfg.model)).init_weights(seed=cfg.seed)
    model = DeepseekV2ForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
    for key, value in cfg.model.items():
        if key not in TRAINING_ONLY_KEYS:
            raise ValueError(f"model.{key}: the shape comes from init_from; "
                             f"only {sorted(TRAINING_ONLY_KEYS)} may change")
        setattr(model.args, key, value)
    return model


def export_hf(state_dict: dict, args: ModelArgs, path: Path, dtype: str, tokenizer_dir: str) -> None:
    """Write the official Hugging Face format (config.json, safetensors) plus the tokenizer files."""
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(args)
    model.load_state_dict(state_dict, assign=True)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, path / name)


# ---- the loop --------------------------------------------------------------------------------------
def train(cfg: TrainConfig, load_data: Callable = load_tokens) -> dict:
    """Run training; returns the last metrics. load_data(path, tokenizer, seq_len) gives a dataset
    with num_sequences and get(indices) -> (inputs, targets) (data.py)."""
    # -- setup: processes and device
    rank, world, local_rank = distributed_env()
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    master = rank == 0

    def log(msg: str) -> None:
        if master:
            print(msg, flush=True)

    def all_sum(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(t)
        return t

    def agree(value: float) -> float:  # rank 0's decision, on every rank
        if world == 1:
            return value
        t = torch.tensor([float(value)], device=device)
        dist.broadcast(t, 0)
        return t.item()

    # -- setup: data, model, optimizer
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    tokenizer_dir = cfg.tokenizer or DEFAULT_MODEL
    if cfg.tokenizer is None and cfg.init_from and (Path(cfg.init_from) / TOKENIZER_FILES[0]).is_file():
        tokenizer_dir = cfg.init_from
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    train_set = load_data(cfg.train_data, tokenizer, cfg.seq_len)
    val_set = load_data(cfg.val_data, tokenizer, cfg.seq_len) if cfg.val_data else None
    model = build_model(cfg)
    args = model.args
    if len(tokenizer) > args.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model only {args.vocab_size} embeddings")
    model.to(device).train()
    moe_layers = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
    for _, moe in moe_layers:
        moe.record_routing = True
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and expert stacks; not norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=cfg.betas, fused=use_cuda and world == 1)
    order = DataOrder(train_set.num_sequences, cfg.seed)
    step, max_steps, elapsed_before = 0, cfg.max_steps, 0.0
    if cfg.resume and (out / STATE_FILE).is_file():
        state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, state["model"], options=full)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
        order.load_state_dict(state["data"])
        step, max_steps, elapsed_before = state["step"], state["max_steps"], state["elapsed_s"]
        torch.set_rng_state(state["rng"]["cpu"])
        if use_cuda and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        log(f"resumed from {out / STATE_FILE} at step {step}")
    if master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    metrics_file = open(out / "metrics.jsonl", "a" if step else "w") if master else None

    def record(entry: dict) -> None:
        if master:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    mb, accum = cfg.micro_batch_size, cfg.grad_accum_steps
    seqs_per_step = mb * accum * world
    tokens_per_step = seqs_per_step * cfg.seq_len
    params = args.num_parameters()
    n_active, E = params["activated"], args.n_routed_experts or 0
    log(f"model: {params['total'] / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M activated per token; "
        f"{len(moe_layers)} MoE layers; {world} process(es) on {device.type}")
    log(f"data: {train_set.num_sequences:,} training sequences of {cfg.seq_len}; "
        f"{tokens_per_step:,} tokens per step ({seqs_per_step} sequences)")

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return cfg.lr * cfg.lr_decay ** ((step >= 0.6 * max_steps) + (step >= 0.9 * max_steps))

    n_eval = min(cfg.eval_sequences, val_set.num_sequences) if val_set is not None else 0
    eval_rounds = math.ceil(n_eval / (mb * world))  # every process runs as many forward passes

    def evaluate() -> float:
        # Grad mode stays on (nothing is backpropagated): the model then runs its plain PyTorch
        # training path, so the held-out loss has the numerics of the loss being trained, not those
        # of the fused GPU inference kernels, which expect a bf16 model.
        model.eval()
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        for i in range(eval_rounds):
            rows = range((i * world + rank) * mb, (i * world + rank + 1) * mb)
            inputs, targets = val_set.get([j if j < n_eval else 0 for j in rows])
            padding = torch.tensor([j >= n_eval for j in rows])[:, None]  # padding rows count nothing
            targets = targets.masked_fill(padding, IGNORE).to(device)
            with autocast:
                logits = model(inputs.to(device))
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                     reduction="sum").detach()
            count += (targets != IGNORE).sum()
        model.train()
        return (all_sum(total) / all_sum(count)).item()

    def save_checkpoint() -> None:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=full)  # collective under FSDP
        optim_state = get_optimizer_state_dict(model, optimizer, options=full)
        if master:
            export_hf(model_state, args, out / "model", cfg.save_dtype, tokenizer_dir)
            rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if use_cuda else {})}
            state = {"model": model_state, "optimizer": optim_state, "step": step, "max_steps": max_steps,
                     "data": order.state_dict(), "rng": rng, "elapsed_s": elapsed(), "config": dataclasses.asdict(cfg)}
            torch.save(state, out / (STATE_FILE + ".tmp"))
            os.replace(out / (STATE_FILE + ".tmp"), out / STATE_FILE)
            log(f"saved {out / 'model'} and {out / STATE_FILE} at step {step}")
        if world > 1:
            dist.barrier()

    # -- the loop
    t_start = time.time()

    def elapsed() -> float:
        return elapsed_before + time.time() - t_start

    start_step, paused_s, plan = step, 0.0, None  # paused_s: time in evaluation and checkpoints
    interval = {"ce": torch.zeros((), device=device), "targets": 0, "steps": 0,
                "balance": torch.zeros(3, device=device), "load": torch.zeros(len(moe_layers), E, device=device)}
    t_log, tokens_seen, last_metrics, last_load = time.time(), step * tokens_per_step, {}, None
    while True:
        out_of_time = cfg.max_minutes is not None and agree(elapsed() > cfg.max_minutes * 60)
        last = step >= max_steps or out_of_time
        if val_set is not None and (step % cfg.eval_every == 0 or last):
            t0 = time.time()
            val_loss = evaluate()
            paused_s += time.time() - t0
            t_log += time.time() - t0  # keep evaluation out of tokens/s
            record({"step": step, "tokens": tokens_seen, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            log(f"step {step}/{max_steps} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f} "
                f"| {time.time() - t0:.1f}s")
            last_metrics.update(val_loss=val_loss)
        if step > start_step and (last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            t0 = time.time()
            save_checkpoint()
            paused_s += time.time() - t0
            t_log += time.time() - t0
        if last:
            break

        # one optimizer step: the global batch, split into micro-batches over accumulation and processes
        batch = order.take(seqs_per_step)
        micro = [train_set.get(batch[(i * world + rank) * mb:(i * world + rank + 1) * mb]) for i in range(accum)]
        n_targets = sum(int((t != IGNORE).sum()) for _, t in micro)  # counted on the host: no sync
        if world > 1:
            n_targets = int(all_sum(torch.tensor(n_targets, device=device)).item())
        for i, (inputs, targets) in enumerate(micro):
            if world > 1:
                model.set_requires_gradient_sync(i == accum - 1)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast:
                logits = model(inputs)
            ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
            balance = BalanceLosses(*torch.zeros(3, device=device))
            for j, (_, moe) in enumerate(moe_layers):
                balance = balance + balance_losses(moe.last_routing, inputs.shape[0], args,
                                                   cfg.device_balance_alpha, cfg.comm_balance_alpha)
                interval["load"][j] += expert_counts(moe.last_routing, E)
                moe.last_routing = None
            # FSDP averages gradients over processes: scale so the step sees the global mean
            loss = ce * (world / n_targets) + balance.total / accum
            loss.backward()
            interval["ce"] += ce.detach()
            interval["balance"] += torch.stack([balance.expert, balance.device, balance.comm]).detach() / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        interval["targets"] += n_targets
        interval["steps"] += 1

        if cfg.max_minutes is not None and step == start_step + 5:
            plan = (time.time(), paused_s)
        if cfg.max_minutes is not None and step == start_step + 20:  # fit the schedule to the time left, once
            per_step = (time.time() - plan[0] - (paused_s - plan[1])) / 15
            eval_s = per_step * eval_rounds / (3 * accum)  # forward passes only
            left = cfg.max_minutes * 60 - elapsed() - ((max_steps - step) // cfg.eval_every + 1) * eval_s
            fit = int(agree(max(step + 1, step + int(0.97 * left / per_step))))
            if fit < max_steps:
                log(f"time budget {cfg.max_minutes} min: {per_step:.3f} s/step, schedule shortened to {fit} steps")
                max_steps = fit

        if step % cfg.log_every == 0 or step == max_steps:
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            loss_value = (all_sum(interval["ce"]) / interval["targets"]).item()
            bal = (all_sum(interval["balance"]) / (world * interval["steps"])).tolist()
            load = all_sum(interval["load"])
            dt = time.time() - t_log
            tok_s = interval["steps"] * tokens_per_step / dt
            mfu = 6 * n_active * tok_s / (cfg.peak_flops * world)
            spread = load_spread(load) if moe_layers else 1.0
            last_load = load_fractions(load).tolist() if moe_layers else None
            last_metrics = {"step": step, "tokens": tokens_seen, "loss": loss_value, "balance_expert": bal[0],
                            "balance_device": bal[1], "balance_comm": bal[2], "lr": lr,
                            "grad_norm": float(grad_norm), "tok_per_s": tok_s, "mfu": mfu, "load_spread": spread,
                            "load": last_load, "elapsed_s": elapsed()}
            record(last_metrics)
            log(f"step {step}/{max_steps} | loss {loss_value:.4f} | balance {sum(bal):.4f} | lr {lr:.2e} "
                f"| grad {float(grad_norm):.2f} | {tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}% "
                f"| load max/mean {spread:.2f} | {elapsed() / 60:.1f} min")
            interval = {k: (v.zero_() if torch.is_tensor(v) else 0) for k, v in interval.items()}
            t_log = time.time()

    # -- the end: expert load picture, close down
    if master and last_load is not None:
        try:
            groups = args.n_group or 1
            plot_expert_load(last_load, str(out / "expert_load.png"), f"expert load, step {step}",
                             layer_ids=[i for i, _ in moe_layers], group_size=E // groups if groups > 1 else None)
        except ImportError:
            log("matplotlib is not installed: no expert_load.png (pip install deepseek-v2[train])")
    if metrics_file is not None:
        metrics_file.close()
    if world > 1:
        dist.destroy_process_group()
    return last_metrics


if __name__ == "__main__":
    from .cli import train_main
    train_main()
