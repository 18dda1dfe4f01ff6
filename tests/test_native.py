"""kvcompress_kernels.native: C++ kernels compiled once into a cache, a clear reason where they cannot be, and
the KVCOMPRESS_KERNELS override."""

from __future__ import annotations

import ctypes
import shutil

import pytest
import torch

from kvcompress_kernels import native
from kvcompress_kernels.dispatch import native_library

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")


def test_compiles_once_and_reuses_the_cached_library(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    source = tmp_path / "twice.cpp"
    source.write_text('extern "C" int twice(int x) { return 2 * x; }\n')
    library = native.library(source)
    assert library is not None and library.twice(21) == 42
    built = list((tmp_path / "cache").glob("twice-*.so"))
    assert len(built) == 1
    assert native.library(source) is library
    stamp = built[0].stat().st_mtime_ns
    native._loaded.pop(source)  # a new process: finds the file instead of compiling again
    assert native.library(source).twice(2) == 4
    assert built[0].stat().st_mtime_ns == stamp


def test_a_source_that_does_not_compile_gives_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    assert native.library(source) is None
    assert "broken.cpp" in native.unavailable(source) and "error" in native.unavailable(source)
    assert not list(tmp_path.glob("*.so"))
    cpu = torch.zeros(1)
    assert native_library(source, cpu) is None  # the caller keeps its torch path
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "native")
    with pytest.raises(RuntimeError, match="KVCOMPRESS_KERNELS=native, but .*broken.cpp"):
        native_library(source, cpu)


def test_a_missing_compiler_gives_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    source = tmp_path / "fine.cpp"
    source.write_text('extern "C" int one() { return 1; }\n')
    assert native.library(source) is None
    assert "no-such-compiler could not build fine.cpp" in native.unavailable(source)


def test_overrides_choose_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    source = tmp_path / "path.cpp"
    source.write_text('extern "C" int one() { return 1; }\n')
    cpu = torch.zeros(1)
    assert isinstance(native_library(source, cpu), ctypes.CDLL)
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
    assert native_library(source, cpu) is None
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "triton")
    assert native_library(source, cpu) is None
    monkeypatch.delenv("KVCOMPRESS_KERNELS")
    assert native_library(source, torch.zeros(1, device="meta")) is None  # not a CPU tensor


def test_required_raises_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    source = tmp_path / "required.cpp"
    source.write_text("not C++ either\n")
    with pytest.raises(RuntimeError, match="could not build required.cpp"):
        native.required(source)
    fine = tmp_path / "fine_required.cpp"
    fine.write_text('extern "C" int three() { return 3; }\n')
    assert native.required(fine).three() == 3


OPENMP_SOURCE = """
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif
// the number of threads the parallel region ran on (1 where the library was built without OpenMP)
extern "C" int64_t team(int64_t threads) {
    int64_t ran = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : ran)
    for (int64_t t = 0; t < threads; t++) ran += 1;
    int64_t size = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#pragma omp single
    size = omp_get_num_threads();
#endif
    return ran == threads ? size : -1;
}
"""


def test_parallel_regions_run_on_torchs_openmp_threads(tmp_path, monkeypatch):
    """Built with -fopenmp, a kernel's parallel region binds to the libgomp torch loaded (one runtime in the
    process, so torch's idle workers run it instead of competing with threads of its own)."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    source = tmp_path / "team.cpp"
    source.write_text(OPENMP_SOURCE)
    assert native.library(source).team(2) == 2
    runtimes = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line or "libomp" in line}
    assert len(runtimes) == 1


def test_a_compiler_without_openmp_still_builds(tmp_path, monkeypatch):
    """...and a new process takes the library cached without OpenMP, calling the compiler no more."""
    calls = tmp_path / "calls"
    wrapper = tmp_path / "no-openmp-c++"
    wrapper.write_text(f'#!/bin/sh\necho >> {calls}\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\n'
                       'exec c++ "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CXX", str(wrapper))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    source = tmp_path / "team.cpp"
    source.write_text(OPENMP_SOURCE)
    assert native.library(source).team(2) == 1
    assert len(calls.read_text().splitlines()) == 2  # with OpenMP (refused), then without
    native._loaded.pop(source)
    assert native.library(source).team(2) == 1
    assert len(calls.read_text().splitlines()) == 2


def test_native_or_skip_gives_the_library_or_skips_with_the_reason(tmp_path, monkeypatch):
    from kvcompress.testing import native_or_skip

    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    fine, broken = tmp_path / "fine.cpp", tmp_path / "broken.cpp"
    fine.write_text('extern "C" int four() { return 4; }\n')
    broken.write_text("not C++\n")
    assert native_or_skip(fine).four() == 4
    with pytest.raises(pytest.skip.Exception, match="no C\\+\\+ kernel: .* could not build broken.cpp"):
        native_or_skip(broken)
