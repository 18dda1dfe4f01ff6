"""Which path a kernel dispatcher takes: Triton for CUDA tensors, the torch reference elsewhere (tests call
the Triton kernels directly, under TRITON_INTERPRET=1 without a GPU)."""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton for CUDA tensors; the torch reference on CPU (the interpreter is for tests, not speed)."""
    return HAS_TRITON and all(t.is_cuda for t in tensors)
