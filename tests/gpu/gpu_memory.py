"""Shared by the GPU tests: fill freed device memory with NaN so that an output element a kernel
forgets to write shows up (the wrappers allocate their own outputs, so there is no buffer to poison)."""

import torch


def poison_free_memory(device: str = "cuda") -> None:
    """Fill big and small cached free blocks with 0xFF bytes (NaN in bf16 and fp32)."""
    chunks = [torch.empty(1 << 30, dtype=torch.uint8, device=device)]
    chunks += [torch.empty(1 << 19, dtype=torch.uint8, device=device) for _ in range(32)]
    for chunk in chunks:
        chunk.fill_(0xFF)
    del chunks
