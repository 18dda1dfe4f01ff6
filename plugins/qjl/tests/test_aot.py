"""QJL's Triton kernels compile ahead of time for sm_80 and sm_90 (kvcompress_kernels.aot), on any machine."""

from kvcompress.testing import KernelCompileConformance


class TestQJLKernelsCompile(KernelCompileConformance):
    modules = ("kvcompress_qjl.kernels", "kvcompress_qjl.decode_kernels")
