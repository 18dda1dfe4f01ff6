"""Which path a kernel dispatcher takes: Triton for CUDA tensors; on the CPU a method's C++ kernel where it has one
and it compiles (kvcompress_kernels.native), else the torch reference.

KVCOMPRESS_KERNELS=torch forces the torch references everywhere (to compare, or to work around a kernel);
KVCOMPRESS_KERNELS=triton asks for Triton even where the default would not take it (CPU tensors run under
TRITON_INTERPRET=1, which is for tests, not speed); KVCOMPRESS_KERNELS=native makes a C++ kernel that cannot be
built an error instead of a quiet fallback. Tests call the kernels directly.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import torch

from kvcompress_kernels import native

HAS_TRITON = importlib.util.find_spec("triton") is not None
OVERRIDE_ENV = "KVCOMPRESS_KERNELS"
CHOICES = ("torch", "triton", "native")


def kernel_choice() -> str | None:
    """The KVCOMPRESS_KERNELS override ('torch', 'triton' or 'native'), or None for the default."""
    value = os.environ.get(OVERRIDE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in CHOICES:
        raise ValueError(f"{OVERRIDE_ENV}={value!r}: use one of {', '.join(CHOICES)} (or leave it unset)")
    return value


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton for CUDA tensors, the torch reference elsewhere, unless KVCOMPRESS_KERNELS says otherwise."""
    choice = kernel_choice()
    if choice == "torch" or not HAS_TRITON:
        return False
    if choice == "triton":
        return True
    return all(t.is_cuda for t in tensors)


def native_library(source: Path, *tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The compiled C++ kernels of `source` where the CPU path should take them (every tensor on the CPU, no
    torch/triton override), else None: the caller keeps its torch path."""
    choice = kernel_choice()
    if choice in ("torch", "triton") or not all(t.device.type == "cpu" for t in tensors):
        return None
    library = native.library(source)
    if library is None and choice == "native":
        raise RuntimeError(f"{OVERRIDE_ENV}=native, but {native.unavailable(source)}")
    return library


def block_size(n: int, least: int = 16) -> int:
    """A power of two covering n, at least `least` (16 is the smallest tl.dot operand): a Triton block dim."""
    return max(least, 1 << max(0, n - 1).bit_length())
