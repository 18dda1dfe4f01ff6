"""C++ kernels for the CPU, compiled on first use and called through ctypes.

A method's C++ source sits beside its torch reference (e.g. `kvcompress_qjl/kernels_cpu.cpp`, next to
`kvcompress_qjl/kernels.py`). `library(source)` compiles it once with `$CXX -O3 -march=native` (CXX defaults to
c++) into KVCOMPRESS_NATIVE_CACHE (default ~/.cache/kvcompress/native), under a name hashed from the source, the
compiler command and the CPU, and returns the loaded library. With `-fopenmp` (dropped where the compiler has no
OpenMP): a kernel's `#pragma omp parallel` then runs on torch's own OpenMP threads (the library binds to the
libgomp torch has loaded), not on threads of its own that torch's idle workers, still spinning after the last
torch call, would crowd off the cores. Where no compiler works it returns None and
`unavailable(source)` says why: dispatchers then keep the torch path, so a machine without a compiler runs
everything, only slower. Plain C ABI (pointers and sizes), no Python or torch headers: a kernel compiles in about
a second. ctypes releases the GIL for the call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

CACHE_ENV = "KVCOMPRESS_NATIVE_CACHE"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
OPENMP = ("-fopenmp",)

_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL | None] = {}
_reasons: dict[Path, str] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept: $KVCOMPRESS_NATIVE_CACHE, else ~/.cache/kvcompress/native."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvcompress" / "native"


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), so a shared cache never hands one CPU a library
    built for another."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(source: Path, compiler: list[str]) -> Path:
    """The path of the library built from `source` (compiled now unless cached), with OpenMP where the compiler
    has it; raises on a compiler error. A library cached without OpenMP is taken as it is: its build means the
    compiler had none, and trying again would cost a failed compile in every new process."""
    with_openmp, without = _target(source, compiler, FLAGS + OPENMP), _target(source, compiler, FLAGS)
    for target in (with_openmp, without):
        if target.is_file():
            return target
    try:
        return _build(source, compiler, FLAGS + OPENMP, with_openmp)
    except RuntimeError:
        return _build(source, compiler, FLAGS, without)


def _target(source: Path, compiler: list[str], flags: tuple[str, ...]) -> Path:
    """Where the library of `source` built by this compiler with these flags for this CPU is cached."""
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(compiler + list(flags)).encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}.so"


def _build(source: Path, compiler: list[str], flags: tuple[str, ...], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: processes compiling at once never load a half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *flags, str(source), "-o", partial], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr.strip()[-2000:] or f"exit status {done.returncode}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def library(source: Path) -> ctypes.CDLL | None:
    """The compiled library of a C++ source, or None where it cannot be built or loaded (see unavailable)."""
    source = Path(source)
    if source in _loaded:
        return _loaded[source]
    with _lock:
        if source not in _loaded:
            compiler = shlex.split(os.environ.get("CXX", "c++"))
            try:
                _loaded[source] = ctypes.CDLL(str(_compile(source, compiler)))
            except (OSError, RuntimeError) as error:
                _loaded[source] = None
                _reasons[source] = f"{' '.join(compiler)} could not build {source.name}: {error}"
    return _loaded[source]


def required(source: Path) -> ctypes.CDLL:
    """The compiled library of a C++ source, or a RuntimeError saying why it cannot be built (for a kernel called
    directly; dispatchers ask `library` and fall back instead)."""
    loaded = library(source)
    if loaded is None:
        raise RuntimeError(unavailable(source))
    return loaded


def unavailable(source: Path) -> str | None:
    """Why `library(source)` returned None (None if it loaded or was not asked for yet)."""
    return _reasons.get(Path(source))


def token_rows(tensor: torch.Tensor) -> torch.Tensor:
    """tensor [batch, heads, tokens, ...] whose (batch, head) blocks are contiguous, as a kernel indexing it by its
    batch and head strides needs: a store's view (a slice of buffers with room for more tokens) already is, and
    is returned as it is; anything else is copied."""
    if tensor.shape[0] and tensor.shape[1] and not tensor[0, 0].is_contiguous():
        return tensor.contiguous()
    return tensor


def pointer(tensor: torch.Tensor | None) -> ctypes.c_void_p:
    """The address of a tensor's first element (NULL for None), for a ctypes argument."""
    return ctypes.c_void_p(None if tensor is None else tensor.data_ptr())
