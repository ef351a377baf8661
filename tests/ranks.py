"""Run a function on several CPU processes joined in a gloo process group, as tensor-parallel ranks
(for the tests of the parallel paths). `run_ranks(world, "module:function", *args)` returns each
rank's result; the function is called as function(tp, *args) with tp this rank's TensorParallel."""

from __future__ import annotations

import importlib
import os
import socket
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, target: str, args: tuple, out_dir: str) -> None:
    from deepseek_v2.parallel import TensorParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(TensorParallel(rank, world, dist.group.WORLD), *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        # every rank done before any tears its connections down: a rank that destroys the group while a
        # peer's last collective is still in flight can make gloo's thread throw, and the peer abort
        # ("terminate called without an active exception", SIGABRT; seen about once in 20 runs)
        dist.monitored_barrier(timeout=timedelta(seconds=120))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, target: str, *args) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(world, free_port(), target, args, out_dir), nprocs=world,
                           join=True, start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world)]
