"""The scalar family's fused decode kernels compile ahead of time for sm_80 and sm_90 (kvcompress_kernels.aot),
on any machine."""

from kvcompress.testing import KernelCompileConformance


class TestScalarKernelsCompile(KernelCompileConformance):
    modules = ("kvcompress_scalar.decode_kernels",)
