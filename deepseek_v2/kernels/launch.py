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
