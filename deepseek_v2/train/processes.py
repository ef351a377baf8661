"""The processes of a training run: rank, world size and device (what torchrun sets), the process
group, the collectives the loop needs and FSDP2 sharding. With one process each of them is a no-op,
so the loop reads like single-device code."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..parallel import launch_env


@dataclass
class Processes:
    """This process's place in the run."""
    rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    def log(self, msg: str) -> None:
        if self.master:
            print(msg, flush=True)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def agree(self, value: float) -> float:
        """Rank 0's value on every rank: decisions taken from a clock must not differ between processes."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.device)
        dist.broadcast(t, 0)
        return t.item()

    def autocast(self):
        """bf16 autocast on CUDA (the weights stay fp32); nothing on CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_cuda else contextlib.nullcontext()


def start_processes(device: str) -> Processes:
    """Pick the device ("auto": CUDA when available) and join the process group under torchrun."""
    launch = launch_env()
    rank, world, local_rank = launch.rank, launch.world, launch.local_rank
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    procs = Processes(rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))
    if use_cuda:
        torch.cuda.set_device(procs.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return procs


def shard_model(model: nn.Module, procs: Processes) -> None:
    """FSDP2 over several processes: one shard unit per decoder layer, then the rest of the model."""
    if procs.world > 1:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)


def stop_processes(procs: Processes) -> None:
    """Leave the process group together: rank 0 may still be writing the run's last files, and a gloo rank
    that tore its group down before the others once aborted at exit (SIGABRT in CI)."""
    if procs.world > 1:
        dist.barrier()
        dist.destroy_process_group()
