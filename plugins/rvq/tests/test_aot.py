"""RVQ's Triton kernels compile ahead of time for sm_80 and sm_90 (kvcompress_kernels.aot), on any machine."""

from kvcompress.testing import KernelCompileConformance


class TestRVQKernelsCompile(KernelCompileConformance):
    modules = ("kvcompress_rvq.kernels", "kvcompress_rvq.decode_kernels")
