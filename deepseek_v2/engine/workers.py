"""The processes of a tensor-parallel engine.

Rank 0 is the engine's own process: it keeps the scheduler, the sampler (and the server). Every other
rank holds its part of the model and its copy of the latent cache, and runs `run_worker`: it loads its
part, builds its model runner (the profile run, the cache sizing and the CUDA-graph captures are
collective, in step with rank 0), then runs each step's forward as rank 0 sends it (`Control`: one
broadcast of the step's host lists per step) until rank 0 says stop.

On one node rank 0 starts the others itself (`Workers.spawn`, torch.multiprocessing); on several
nodes `torchrun` starts one process per GPU running the same command, and the CLI sends every rank
but 0 to `run_worker` (docs/parallel.md). The backend is NCCL when every rank has a GPU of its own,
else gloo (CPU, or ranks sharing a GPU, which then run without CUDA graphs).

Failures end the engine with an error naming the rank: rank 0 watches its workers' processes and
checks them before every step; a collective with a dead peer fails (gloo at once, NCCL through the
abort below or its timeout). A worker dies with its parent (PR_SET_PDEATHSIG) and leaves when rank 0's
broadcast fails, so none is left behind.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing.connection
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..config import EngineConfig, ModelArgs
from ..parallel import SINGLE, TensorParallel, launch_env
from ..plan import check_parallel_size, format_plan, memory_plan

logger = logging.getLogger("deepseek_v2")
TIMEOUT = timedelta(minutes=10)  # a collective that waits longer fails: first Triton compiles take minutes


class WorkerError(RuntimeError):
    """A tensor-parallel rank failed; the message names it."""


@dataclass(frozen=True)
class ModelSource:
    """Where each rank's part of the model comes from: a checkpoint directory, or random weights of a
    shape (benchmarks); quantization "fp8": FP8 weights (EngineConfig.quantization). Picklable, so that
    spawned ranks can build their part."""

    path: str | None = None
    args: ModelArgs | None = None
    seed: int = 0
    dtype: str | torch.dtype | None = None
    quantization: str | None = None

    def model_args(self) -> ModelArgs:
        """The architecture (a checkpoint's config.json; clear errors for a missing or foreign directory)."""
        from ..checkpoint import checkpoint_args
        args = self.args if self.path is None else checkpoint_args(self.path)
        return args.replace(quantization=self.quantization) if self.quantization else args

    def build(self, tp: TensorParallel, device: torch.device):
        from ..model import DeepseekV2ForCausalLM
        if self.path is not None:
            return DeepseekV2ForCausalLM.from_pretrained(self.path, dtype=self.dtype, device=device, tp=tp,
                                                         quantization=self.quantization)
        with torch.device("meta"):
            model = DeepseekV2ForCausalLM(self.args, tp)
        model = model.to(self.dtype).to_empty(device=device).init_weights(seed=self.seed).eval()
        return model.use_fp8() if self.model_args().quantization == "fp8" else model


def resolve_device(source: ModelSource, config: EngineConfig, dtype: str | torch.dtype,
                   device: str | None) -> tuple[ModelSource, str]:
    """The source with its dtype settled ("auto": bfloat16 on a GPU, float32 on CPU) and the engine's
    quantization, and the device type."""
    from ..checkpoint import parse_dtype
    device_type = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    if dtype == "auto":
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    quantization = config.quantization or source.quantization
    return replace(source, dtype=parse_dtype(dtype), quantization=quantization), device_type


class Control:
    """Rank 0's messages to the other ranks: each step's forward inputs, or None to stop. One
    broadcast of a pickled object over a gloo group (host lists, no device tensors)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    def send(self, message) -> None:
        dist.broadcast_object_list([message], src=0, group=self.group)

    def receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree_min(self, value: int) -> int:
        """The smallest of the ranks' values, on every rank (e.g. how many cache blocks all can hold)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def choose_device(device_type: str, local_rank: int, ranks_per_node: int) -> tuple[torch.device, str]:
    """This rank's device and the backend: NCCL when each rank of the node has a GPU of its own."""
    if device_type != "cuda":
        return torch.device("cpu"), "gloo"
    count = torch.cuda.device_count()
    device = torch.device("cuda", local_rank % count)
    torch.cuda.set_device(device)
    return device, "nccl" if count >= ranks_per_node else "gloo"


def join_group(rank: int, world: int, init_method: str, backend: str) -> tuple[TensorParallel, Control]:
    """Join the process group; returns this rank's TensorParallel and the control channel."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else None
    return TensorParallel(rank, world, dist.group.WORLD), Control(control)


def run_launched_worker(source: ModelSource, config: EngineConfig, dtype: str | torch.dtype,
                        device: str | None) -> None:
    """A rank other than 0 that torchrun started, running the command rank 0 runs (the CLI's branch)."""
    launch = launch_env()
    if launch.world != config.tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size is {config.tensor_parallel_size} but torchrun started "
                         f"{launch.world} processes")
    source, device_type = resolve_device(source, config, dtype, device)
    _die_with_parent()
    run_worker(launch.rank, launch.world, "env://", launch.local_rank, launch.local_world, source, config,
               device_type)


def run_worker(rank: int, world: int, init_method: str, local_rank: int, ranks_per_node: int,
               source: ModelSource, config: EngineConfig, device_type: str) -> None:
    """A rank other than 0, from start to stop."""
    from .model_runner import ModelRunner, engine_max_model_len
    device, backend = choose_device(device_type, local_rank, ranks_per_node)
    tp, control = join_group(rank, world, init_method, backend)
    try:
        model = source.build(tp, device)
        runner = ModelRunner(model, config, engine_max_model_len(config, model.args), tp=tp, control=control,
                             graphs=backend == "nccl")
        runner.serve()
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group (rank 0 gone) is being left anyway
            pass


def _spawned_worker(index: int, world: int, init_method: str, source: ModelSource, config: EngineConfig,
                    device_type: str) -> None:
    """The entry point of a rank that rank 0 spawned (index 0 is rank 1)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches every process: rank 0 decides
    try:
        run_worker(index + 1, world, init_method, index + 1, world, source, config, device_type)
    except Exception as e:  # noqa: BLE001 - rank 0 reports the failure; a short line here, no traceback wall
        print(f"deepseek-v2 tensor-parallel rank {index + 1}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):  # PR_SET_PDEATHSIG: killed when rank 0's process goes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Workers:
    """Rank 0's view of the other ranks it started (none under torchrun, which starts them)."""

    def __init__(self, world: int, processes=None):
        self.world, self.processes = world, list(processes or [])
        self.failure: str | None = None
        self._watch = threading.Thread(target=self._watch_processes, daemon=True, name="tp-watch")
        if self.processes:
            self._watch.start()

    @classmethod
    def spawn(cls, world: int, source: ModelSource, config: EngineConfig, device_type: str) -> tuple["Workers", str]:
        """Start ranks 1 .. world-1 on this node; returns them and the address rank 0 joins with."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        context = mp.start_processes(_spawned_worker, args=(world, init_method, source, config, device_type),
                                     nprocs=world - 1, join=False, start_method="spawn")
        return cls(world, context.processes), init_method

    def _watch_processes(self) -> None:
        """Notice the first worker that dies, and abort the collectives so that rank 0 does not hang."""
        sentinels = {p.sentinel: i + 1 for i, p in enumerate(self.processes)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self.failure is not None:  # a shutdown: the ranks were told to stop
            return
        rank = sentinels[ready[0]]
        self.failure = f"tensor-parallel rank {rank} exited (code {self.processes[rank - 1].exitcode})"
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        try:
            if abort is not None and dist.is_initialized() and dist.get_backend() == "nccl":  # gloo fails by itself
                abort()
        except Exception:  # noqa: BLE001 - best effort: the NCCL timeout ends a stuck collective anyway
            logger.exception("could not abort the process group after rank %d exited", rank)

    def check(self) -> None:
        """Raise WorkerError if a rank has died."""
        for rank, p in enumerate(self.processes, start=1):
            if p.exitcode is not None and self.failure is None:
                self.failure = f"tensor-parallel rank {rank} exited (code {p.exitcode})"
        if self.failure is not None:
            raise WorkerError(self.failure)

    def explain(self, error: Exception, wait: float = 2.0) -> WorkerError:
        """The error to raise for a step that failed: which rank died, if one did (a collective can
        fail a moment before its peer's exit is seen), else the collective's own error."""
        deadline = time.monotonic() + wait
        while self.failure is None and time.monotonic() < deadline:
            if any(p.exitcode is not None for p in self.processes):
                break
            time.sleep(0.05)
        try:
            self.check()
        except WorkerError as dead:
            return WorkerError(f"{dead}; the step failed with: {error}")
        return WorkerError(f"a tensor-parallel collective failed: {error}")

    def close(self, control: Control | None, timeout: float = 10.0) -> None:
        """Tell the ranks to stop, wait for them, and kill any that do not go."""
        if self.failure is None and control is not None:
            try:
                self.failure = "the engine was shut down"
                control.send(None)
            except Exception:  # noqa: BLE001 - a rank is gone already: the kill below ends the rest
                pass
        for p in self.processes:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join()
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Started:
    """What start_model gives the engine: the model (rank 0's part of it), and its other ranks."""

    model: object
    workers: Workers | None = None
    control: Control | None = None
    graphs: bool = True  # CUDA graphs are possible (one process, or NCCL)


def start_model(source: ModelSource, config: EngineConfig, dtype: str | torch.dtype = "auto",
                device: str | None = None) -> Started:
    """Build the model on one process, or as rank 0 of a tensor-parallel group: the other ranks are
    started here on this node, or, under torchrun, were started by it (every rank but 0 then runs
    run_launched_worker: the CLI does that). A size that cannot split the model, and on a GPU a plan
    whose weights cannot fit, are refused before anything is loaded or started."""
    source, device_type = resolve_device(source, config, dtype, device)
    world = config.tensor_parallel_size
    check_parallel_size(source.model_args(), world)
    if device_type == "cuda" and config.num_kv_blocks is None:
        refuse_what_cannot_fit(source, config, torch.device(device or device_type))
    launch = launch_env()
    if world == 1 and launch.world == 1:
        return Started(source.build(SINGLE, torch.device(device or device_type)))
    if launch.world == 1:
        workers, init_method = Workers.spawn(world, source, config, device_type)
        ranks_per_node = world
    elif launch.world != world:
        raise ValueError(f"tensor_parallel_size is {world} but torchrun started {launch.world} processes")
    else:
        workers, init_method, ranks_per_node = Workers(world), "env://", launch.local_world
    try:
        dev, backend = choose_device(device_type, 0, ranks_per_node)
        tp, control = join_group(0, world, init_method, backend)
        return Started(source.build(tp, dev), workers, control, graphs=backend == "nccl")
    except BaseException:
        workers.close(None)
        raise


def refuse_what_cannot_fit(source: ModelSource, config: EngineConfig, device: torch.device) -> None:
    """The memory plan (plan.py, what `deepseek-v2 info` prints) of this GPU; a ValueError with its
    figures if the weights and the activation reserve do not fit."""
    args = source.model_args()
    value_bytes = torch.tensor([], dtype=source.dtype).element_size()
    total = torch.cuda.get_device_properties(device).total_memory
    plan = memory_plan(args, config.tensor_parallel_size, total, config,
                       1 if args.quantization == "fp8" else value_bytes,  # 1: FP8 weights (plan.py)
                       1 if config.kv_cache_dtype == "fp8" else value_bytes)
    if not plan.weights_fit:
        raise ValueError("the model does not fit on this GPU:\n" + format_plan(plan)
                         + "\n(more GPUs: --tensor-parallel-size; see deepseek-v2 info)")
