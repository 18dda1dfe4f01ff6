"""The shared Triton kernels compile ahead of time for sm_80 and sm_90 (kvcompress_kernels.aot), on any machine;
what the compile test fails on."""

import pytest

from kvcompress.testing import KernelCompileConformance
from kvcompress_kernels.aot import AOTCase, problems


class TestSharedKernelsCompile(KernelCompileConformance):
    modules = ("kvcompress_kernels.bitpack", "kvcompress_kernels.decode")


def report(**fields) -> dict:
    base = {"case": "pack 3 bits", "kernel": "_pack_kernel", "arch": 80, "shared": 0, "shared_limit": 166912,
            "registers": 32, "spills": 0, "accepted_spills": 0}
    return {**base, **fields}


def test_shared_memory_over_the_limit_and_unexpected_spills_are_problems():
    assert problems(report()) == []
    assert problems(report(spills=2, accepted_spills=2)) == []
    (over,) = problems(report(shared=166913))
    assert "166913 bytes of shared memory, over the 166912" in over and "sm_80" in over
    (spills,) = problems(report(spills=3, accepted_spills=2, registers=255))
    assert "spills 3 registers (255 used), 2 accepted" in spills


def test_accepted_spills_need_a_reason():
    with pytest.raises(ValueError, match="say why"):
        AOTCase("big tile", lambda: None, spills={80: 4})
    assert AOTCase("big tile", lambda: None, spills={80: 4}, why="the tile must hold a whole head").spills == {80: 4}
