"""What the kernels' launch heuristics know of the device they run on, and how our kernels are launched on it
(programmatic dependent launch)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Programmatic dependent launch on Hopper-class GPUs, for launches of at most PDL_MAX_ROWS rows (tokens
# or sequences): each of our Triton kernels is launched so that its programs may be resident before the
# kernel ahead of it in the stream has finished; they wait (griddepcontrol.wait) for it to finish and its
# writes to be visible before they read or write anything, so the arithmetic is unchanged, and once all
# of a kernel's programs have started it lets the next one be launched. What it saves is the launch and
# the programs' start-up between two kernels, where a step is hundreds of kernels bound by latency. On an
# H200 (docs/benchmarks.md, "Programmatic dependent launch"): batch-1 decode with FP8 weights 2.32
# against 2.48 ms/token, bf16 2.52 against 2.54; 256 sequences in bf16 2-4% slower, hence the limit.
PDL = True
PDL_MAX_ROWS = 16
# Such a kernel may also ask L2 for its weights before it waits (prefetch_l2): no kernel of a step writes
# them, so their bytes can come from HBM while the kernel ahead still runs. Done by the FP8 GEMM, W_UK's
# and W_UV's products and the router (the weights whose addresses need no load). On an H200, batch-1
# decode 2.39-2.40 against 2.43-2.44 ms/token in bf16, 2.02 against 2.04 with FP8 weights (twice each;
# docs/benchmarks.md, "The weights asked of L2 before the wait").
PREFETCH_WEIGHTS = True


@functools.cache
def num_sms(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device; for the CPU (Triton's interpreter) a small
    number, which keeps the interpreter's grids small."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def hopper_class(device: torch.device) -> bool:
    """A GPU with sm_90 / sm_100's ~227 KB of shared memory a block and the tensor-memory accelerator
    (H100, H200, B200), which the largest launches need; not A100 (164 KB) or consumer cards (~100 KB)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)


def pdl_launch(device: torch.device, rows: int) -> dict:
    """The launch arguments that turn programmatic dependent launch on for a kernel taking a `PDL`
    constexpr (which makes it call wait_for_prior_kernels) and launched for `rows` rows: none for more
    than PDL_MAX_ROWS, none off Hopper-class GPUs, where the instructions do not exist, and none in
    Triton's interpreter."""
    return {"PDL": True, "launch_pdl": True} if PDL and rows <= PDL_MAX_ROWS and hopper_class(device) else {}


def prefetch_launch(device: torch.device, rows: int) -> dict:
    """The launch argument that has a kernel taking a `PREFETCH` constexpr ask L2 for its weights before it
    waits: for a launch of `rows` rows with PREFETCH_WEIGHTS on and programmatic dependent launch (without
    it there is no kernel ahead to overlap); none otherwise."""
    return {"PREFETCH": True} if PREFETCH_WEIGHTS and pdl_launch(device, rows) else {}


@triton.jit
def prefetch_l2(ptrs, mask):
    """Ask L2 for the 128-byte lines that hold ptrs (where mask), without waiting for them and with no
    register to fill: prefetch.global.L2. For a kernel's weights before wait_for_prior_kernels, one pointer
    a line or more (a line asked for twice costs an instruction, nothing more). CUDA only: callers take it
    behind a constexpr that is off in Triton's interpreter."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def wait_for_prior_kernels(PDL: tl.constexpr):
    """The first thing a kernel launched with programmatic dependent launch does: wait until the kernel
    ahead of it has finished and its writes are visible, then let the kernel after it be launched (it
    waits in turn). Every program calls it before any load or store, so no read or write of this kernel
    can meet one of the kernel before; nothing without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def tma_aligned(t: torch.Tensor) -> bool:
    """A tensor descriptor can address this tensor: its start and its strides but the last (which must be
    1) are multiples of 16 bytes."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))


_counters: dict[tuple[torch.device, str], torch.Tensor] = {}


def arrival_counters(device: torch.device, owner: str, size: int) -> torch.Tensor:
    """The int32 counters a kernel's "last program to arrive" counts on (the router, the MoE's combine,
    the FP8 GEMM's pieces): one zeroed buffer per device and owner, allocated on first use (a warm-up
    step, before any CUDA-graph capture) and left at zero by every launch that uses it."""
    key = (device, owner)
    if key not in _counters:
        _counters[key] = torch.zeros(size, dtype=torch.int32, device=device)
    return _counters[key]
