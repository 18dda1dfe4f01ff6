"""This project's tests run Triton kernels under the interpreter where no CUDA device answers. The choice must
be made before any kernel module is imported, and only for this project's test run (not a pytest plugin
that every project in the environment would load)."""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
