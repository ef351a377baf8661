"""Pretraining in one loop, read top to bottom: hyperparameters (config.py), setup, a tiny learning-rate
function, then the loop (evaluate and checkpoint every N steps, accumulate, clip, step, log).
Fine-tuning (sft.py) is this same loop fed chat conversations.

    deepseek-v2 train configs/demo-pretrain.json [--set lr=1e-3 ...]
    torchrun --nproc-per-node 8 -m deepseek_v2.cli train configs/demo-pretrain.json

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
- max_minutes: after 20 steps the schedule is shortened once to fit the time left (TimeBudget), and
  the run stops (evaluating and saving) when time is up.
- Progress line: loss, balance loss, lr, grad norm, tokens/s, MFU (6 x activated parameters x
  tokens/s over peak_flops per process; attention FLOPs not counted) and the expert load spread.
  out_dir/metrics.jsonl holds every log and eval record (scripts/plot_training.py draws them);
  out_dir/expert_load.png shows the per-expert load per layer at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..checkpoint import checkpoint_args
from ..config import DEFAULT_MODEL, ModelArgs
from ..model import DeepseekV2ForCausalLM
from ..moe import MoE
from ..tokenizer import Tokenizer
from .balance import BalanceLosses, balance_losses, expert_counts, load_fractions, load_spread, plot_expert_load
from .checkpointing import STATE_FILE, TOKENIZER_FILES, load_train_state, save_checkpoint
from .config import TrainConfig
from .data import IGNORE, DataOrder, Prefetcher, load_tokens
from .processes import Processes, shard_model, start_processes, stop_processes

TRAINING_ONLY_KEYS = {"aux_loss_alpha", "seq_aux"}  # may change when starting from a checkpoint
POSITION_KEYS = {"rope_scaling", "max_position_embeddings"}  # so may these: context extension


# ---- setup: data, model, optimizer -----------------------------------------------------------------
def tokenizer_dir(cfg: TrainConfig) -> str:
    """The configured tokenizer, else init_from's when it has one, else the package's."""
    if cfg.tokenizer is None and cfg.init_from and (Path(cfg.init_from) / TOKENIZER_FILES[0]).is_file():
        return cfg.init_from
    return cfg.tokenizer or DEFAULT_MODEL


def model_args(shape: dict) -> ModelArgs:
    known = {f.name for f in dataclasses.fields(ModelArgs)} | {"model_type", "architectures"}
    unknown = set(shape) - known
    if unknown:
        raise ValueError(f"unknown model key(s) in the train config: {sorted(unknown)}")
    return ModelArgs.from_hf_config(shape)


def build_model(cfg: TrainConfig) -> DeepseekV2ForCausalLM:
    if cfg.init_from is None:
        return DeepseekV2ForCausalLM(model_args(cfg.model)).init_weights(seed=cfg.seed)
    fixed = set(cfg.model) - TRAINING_ONLY_KEYS - POSITION_KEYS
    if fixed:
        raise ValueError(f"model.{sorted(fixed)[0]}: the shape comes from init_from; "
                         f"only {sorted(TRAINING_ONLY_KEYS | POSITION_KEYS)} may change")
    args = ModelArgs.from_hf_config({**checkpoint_args(cfg.init_from).to_hf_config(), **cfg.model})
    return DeepseekV2ForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32, args=args)


def place_model(model: DeepseekV2ForCausalLM, procs: Processes,
                activation_checkpointing: bool = False) -> list[tuple[int, MoE]]:
    """Move the model to the device in training mode, have its MoE layers record their routing (for
    the balance losses and load statistics), and shard it when there are several processes.
    Returns the MoE layers with their layer indices."""
    model.to(procs.device).train()
    moe_layers = [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
    for _, moe in moe_layers:
        moe.record_routing = True
    if activation_checkpointing:
        for layer in model.model.layers:  # keep each layer's input only; recompute the rest in backward
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
    shard_model(model, procs)
    return moe_layers


def build_optimizer(model: DeepseekV2ForCausalLM, cfg: TrainConfig, procs: Processes) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and expert stacks; not norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=cfg.betas, fused=procs.use_cuda and procs.world == 1)


# ---- schedule --------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig, max_steps: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * cfg.lr_decay ** ((step >= 0.6 * max_steps) + (step >= 0.9 * max_steps))


@dataclass
class TimeBudget:
    """Shortens the schedule once so that the run fits max_minutes, from the speed of its first steps.

    - The first 5 steps after the start (or a resume) are not timed: they pay for allocation, kernel
      selection and warm caches, and would make every later step look slower.
    - The speed is the mean over the next 15 steps (start+5 to start+20), less the time spent in
      evaluation and checkpoints meanwhile (paused_s): long enough to average out noise, early
      enough that the learning-rate decay (at 60% and 90%) has not started.
    - An evaluation is eval_rounds forward passes of one micro-batch; a forward pass costs about a
      third of a training micro-step (the backward pass about two forwards), and a step runs
      grad_accum_steps micro-steps: eval_s = per_step * eval_rounds / (3 * grad_accum_steps).
      (max_steps - step) // eval_every + 1 evaluations are still to come, the final one included.
    - 0.97 of the steps that fit in what is left: a 3% margin for the error of the estimate and for
      the checkpoints, which are not counted.
    - At least one more step; the schedule only ever gets shorter. Rank 0's figure is used on every
      rank (agree), so that all processes run the same schedule.
    """
    seconds: float
    start_step: int
    eval_every: int
    eval_rounds: int
    grad_accum_steps: int
    mark: tuple[float, float] | None = None  # (elapsed_s, paused_s) at start+5
    per_step_s: float | None = None

    def replan(self, step: int, max_steps: int, elapsed_s: float, paused_s: float,
               agree: Callable[[float], float] = float) -> int:
        """Call after every step with the run's elapsed and paused seconds; returns max_steps, shortened at start+20."""
        if step == self.start_step + 5:
            self.mark = (elapsed_s, paused_s)
        if step != self.start_step + 20:
            return max_steps
        self.per_step_s = (elapsed_s - self.mark[0] - (paused_s - self.mark[1])) / 15
        eval_s = self.per_step_s * self.eval_rounds / (3 * self.grad_accum_steps)
        left = self.seconds - elapsed_s - ((max_steps - step) // self.eval_every + 1) * eval_s
        fit = int(agree(max(step + 1, step + int(0.97 * left / self.per_step_s))))
        return min(fit, max_steps)


# ---- evaluation ------------------------------------------------------------------------------------
def evaluate(model, val_set, procs: Processes, n_eval: int, rounds: int, micro_batch_size: int) -> float:
    """Mean loss over the first n_eval held-out sequences. The processes take turns at micro-batches;
    every process runs `rounds` forward passes (collectives under FSDP), padded with rows that count nothing."""
    mb, world, rank, device = micro_batch_size, procs.world, procs.rank, procs.device
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    with torch.no_grad():
        for i in range(rounds):
            rows = range((i * world + rank) * mb, (i * world + rank + 1) * mb)
            inputs, targets = val_set.get([j if j < n_eval else 0 for j in rows])
            padding = torch.tensor([j >= n_eval for j in rows])[:, None]
            targets = targets.masked_fill(padding, IGNORE).to(device)
            with procs.autocast():
                logits = model(inputs.to(device))
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
            count += (targets != IGNORE).sum()
    model.train()
    return (procs.all_sum(total) / procs.all_sum(count)).item()


def append_record(metrics_file, entry: dict) -> None:
    if metrics_file is not None:  # rank 0 only
        metrics_file.write(json.dumps(entry) + "\n")
        metrics_file.flush()


# ---- the loop --------------------------------------------------------------------------------------
def train(cfg: TrainConfig, load_data: Callable = load_tokens, load_val: Callable | None = None) -> dict:
    """Run training; returns the last metrics. load_data(path, tokenizer, seq_len) gives a dataset
    with num_sequences and get(indices) -> (inputs, targets) (data.py); load_val the held-out one
    (default: load_data)."""
    procs = start_processes(cfg.device)
    rank, world, device = procs.rank, procs.world, procs.device
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    tokenizer_path = tokenizer_dir(cfg)
    tokenizer = Tokenizer.from_pretrained(tokenizer_path)
    train_set = load_data(cfg.train_data, tokenizer, cfg.seq_len)
    val_set = (load_val or load_data)(cfg.val_data, tokenizer, cfg.seq_len) if cfg.val_data else None
    model = build_model(cfg)
    args = model.args
    if len(tokenizer) > args.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model only {args.vocab_size} embeddings")
    moe_layers = place_model(model, procs, cfg.activation_checkpointing)
    optimizer = build_optimizer(model, cfg, procs)
    order = DataOrder(train_set.num_sequences, cfg.seed)
    step, max_steps, elapsed_before = 0, cfg.max_steps, 0.0
    if cfg.resume and (out / STATE_FILE).is_file():
        step, max_steps, elapsed_before = load_train_state(out / STATE_FILE, model, optimizer, order, procs)
    if procs.master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    metrics_file = open(out / "metrics.jsonl", "a" if step else "w") if procs.master else None

    mb, accum = cfg.micro_batch_size, cfg.grad_accum_steps
    seqs_per_step = mb * accum * world
    tokens_per_step = seqs_per_step * cfg.seq_len
    params = args.num_parameters()
    n_active, E = params["activated"], args.n_routed_experts or 0
    procs.log(f"model: {params['total'] / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M activated per token; "
              f"{len(moe_layers)} MoE layers; {world} process(es) on {device.type}")
    procs.log(f"data: {train_set.num_sequences:,} training sequences of {cfg.seq_len}; "
              f"{tokens_per_step:,} tokens per step ({seqs_per_step} sequences)")
    n_eval = min(cfg.eval_sequences, val_set.num_sequences) if val_set is not None else 0
    eval_rounds = math.ceil(n_eval / (mb * world))  # every process runs as many forward passes
    budget = None if cfg.max_minutes is None else TimeBudget(cfg.max_minutes * 60, step, cfg.eval_every,
                                                             eval_rounds, accum)

    def this_rank(batch: np.ndarray) -> list[np.ndarray]:
        return [batch[(i * world + rank) * mb:(i * world + rank + 1) * mb] for i in range(accum)]

    prefetch = Prefetcher(train_set.get)
    run_start = time.time() - elapsed_before  # counts the time of the run before a resume
    start_step, paused_s = step, 0.0  # paused_s: time in evaluation and checkpoints
    interval = {"ce": torch.zeros((), device=device), "targets": 0, "steps": 0,
                "balance": torch.zeros(3, device=device), "load": torch.zeros(len(moe_layers), E, device=device)}
    t_log, tokens_seen, last_metrics, last_load = time.time(), step * tokens_per_step, {}, None
    while True:
        out_of_time = budget is not None and procs.agree(time.time() - run_start > budget.seconds)
        last = step >= max_steps or out_of_time
        if val_set is not None and (step % cfg.eval_every == 0 or last):
            t0 = time.time()
            val_loss = evaluate(model, val_set, procs, n_eval, eval_rounds, mb)
            paused_s += time.time() - t0
            t_log += time.time() - t0  # keep evaluation out of tokens/s
            append_record(metrics_file, {"step": step, "tokens": tokens_seen, "val_loss": val_loss,
                                         "val_ppl": math.exp(min(val_loss, 50))})
            procs.log(f"step {step}/{max_steps} | val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.2f} "
                      f"| {time.time() - t0:.1f}s")
            last_metrics.update(val_loss=val_loss)
        if step > start_step and (last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            t0 = time.time()
            save_checkpoint(cfg, procs, model, optimizer, order, tokenizer_path,
                            step=step, max_steps=max_steps, run_start=run_start)
            paused_s += time.time() - t0
            t_log += time.time() - t0
        if last:
            break

        # one optimizer step: the global batch, split into micro-batches over accumulation and processes;
        # the next step's are made in the background meanwhile
        micro = prefetch.batches(this_rank(order.take(seqs_per_step)))
        if step + 1 < max_steps:
            prefetch.ahead(this_rank(order.peek(seqs_per_step)))
        n_targets = sum(int((t != IGNORE).sum()) for _, t in micro)  # counted on the host: no sync
        if world > 1:
            n_targets = int(procs.all_sum(torch.tensor(n_targets, device=device)).item())
        for i, (inputs, targets) in enumerate(micro):
            if world > 1:
                model.set_requires_gradient_sync(i == accum - 1)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with procs.autocast():
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
        lr = lr_at(step, cfg, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        interval["targets"] += n_targets
        interval["steps"] += 1

        if budget is not None:
            fit = budget.replan(step, max_steps, time.time() - run_start, paused_s, procs.agree)
            if fit < max_steps:
                procs.log(f"time budget {cfg.max_minutes} min: {budget.per_step_s:.3f} s/step, "
                          f"schedule shortened to {fit} steps")
                max_steps = fit

        if step % cfg.log_every == 0 or step == max_steps:
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            loss_value = (procs.all_sum(interval["ce"]) / interval["targets"]).item()
            bal = (procs.all_sum(interval["balance"]) / (world * interval["steps"])).tolist()
            load = procs.all_sum(interval["load"])
            dt = time.time() - t_log
            tok_s = interval["steps"] * tokens_per_step / dt
            mfu = 6 * n_active * tok_s / (cfg.peak_flops * world)
            spread = load_spread(load) if moe_layers else 1.0
            last_load = load_fractions(load).tolist() if moe_layers else None
            last_metrics = {"step": step, "tokens": tokens_seen, "loss": loss_value, "balance_expert": bal[0],
                            "balance_device": bal[1], "balance_comm": bal[2], "lr": lr,
                            "grad_norm": float(grad_norm), "tok_per_s": tok_s, "mfu": mfu, "load_spread": spread,
                            "load": last_load, "elapsed_s": time.time() - run_start}
            append_record(metrics_file, last_metrics)
            procs.log(f"step {step}/{max_steps} | loss {loss_value:.4f} | balance {sum(bal):.4f} | lr {lr:.2e} "
                      f"| grad {float(grad_norm):.2f} | {tok_s:,.0f} tok/s | MFU {100 * mfu:.1f}% "
                      f"| load max/mean {spread:.2f} | {(time.time() - run_start) / 60:.1f} min")
            interval = {k: (v.zero_() if torch.is_tensor(v) else 0) for k, v in interval.items()}
            t_log = time.time()

    prefetch.close()
    # -- the end: expert load picture, close down
    if procs.master and last_load is not None:
        try:
            groups = args.n_group or 1
            plot_expert_load(last_load, str(out / "expert_load.png"), f"expert load, step {step}",
                             layer_ids=[i for i, _ in moe_layers], group_size=E // groups if groups > 1 else None)
        except ImportError:
            procs.log("matplotlib is not installed: no expert_load.png (pip install deepseek-v2[train])")
    if metrics_file is not None:
        metrics_file.close()
    stop_processes(procs)
    return last_metrics
