"""What the kernels' launch heuristics know of the device they run on."""

from __future__ import annotations

import functools

import torch


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
