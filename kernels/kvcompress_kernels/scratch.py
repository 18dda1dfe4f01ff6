"""Reused buffers for the torch read paths: a CPU read that widens a block of packed codes into floats writes
a few MB, and a fresh allocation of that size costs page faults that take longer than filling it. Each thread
keeps one float32 buffer per (device, slot), grown as needed; what a caller gets is valid until its next call
with the same slot in the same thread (reads consume their block before asking for the next one)."""

from __future__ import annotations

import threading

import torch

_held = threading.local()


def scratch(numel: int, device: torch.device, slot: str = "codes") -> torch.Tensor:
    """A float32 tensor of `numel` elements from this thread's buffer for `slot` (contents undefined)."""
    buffers = getattr(_held, "buffers", None)
    if buffers is None:
        buffers = _held.buffers = {}
    key = (torch.device(device), slot)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        # A normal tensor, even when first asked for under torch.inference_mode: an inference tensor could not be
        # written outside it, and the same process may read a cache both ways (an eval, then generate()).
        with torch.inference_mode(False):
            buffer = buffers[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffer[:numel]
