"""This repository's test run: Triton kernels run under the interpreter where no CUDA device answers (each
plugin's tests/conftest.py does the same for a run of that plugin's tests alone)."""

from kvcompress.testing import interpret_triton_without_gpu

interpret_triton_without_gpu()
