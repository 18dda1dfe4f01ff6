"""Triton kernels run under the interpreter where no CUDA device answers, also when these tests run alone."""

from kvcompress.testing import interpret_triton_without_gpu

interpret_triton_without_gpu()
