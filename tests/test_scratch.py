"""kvcompress_kernels.scratch: the reused buffers of the torch read paths."""

import torch

from kvcompress_kernels.scratch import scratch


def test_a_buffer_first_asked_for_under_inference_mode_is_writable_outside_it():
    """An eval (torch.inference_mode) then generate() (no_grad) in one process read through the same buffers."""
    with torch.inference_mode():
        first = scratch(1 << 20, torch.device("cpu"), slot="test-inference")
        first.fill_(1.0)
    again = scratch(1 << 10, torch.device("cpu"), slot="test-inference")
    again.fill_(2.0)  # raised "Inplace update to inference tensor outside InferenceMode" before
    assert again.data_ptr() == first.data_ptr() and bool((again == 2).all())
