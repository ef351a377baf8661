"""Triton kernels (GPU inference) beside their PyTorch references (reference.py). The kernel
modules import triton, so callers import them only on the GPU path chosen by `use_gpu_kernels`."""

import torch


def use_gpu_kernels(x: torch.Tensor) -> bool:
    """GPU inference runs the fused Triton kernels; CPU and training (autograd) run plain PyTorch."""
    return x.is_cuda and not torch.is_grad_enabled()
