"""Ahead-of-time compilation of the Triton kernels for CUDA targets, on any machine: ptxas ships in triton's wheel.

A kernel module lists its compile cases in `aot_cases()`: example calls of its launchers at the shapes the shipped
specs use, one `AOTCase` per entry. The cases run in a child process without TRITON_INTERPRET (under the
interpreter `@triton.jit` gives interpreter objects that cannot be compiled, and the interpreter patches
`triton.language` while it runs), where every kernel launch is intercepted instead of run: the arguments the
launcher passes are specialized exactly as triton's launcher would (types, 16-byte alignment, constexprs,
num_warps), then compiled by `triton.compile` for each target architecture. Registers and spills are read from
the cubin with cuobjdump: the attributes (NUM_REGS, LOCAL_SIZE_BYTES / 4) the driver reports as a compiled
kernel's `n_regs` / `n_spills` on a GPU.

    python -m kvcompress_kernels.aot kvcompress_kernels.bitpack kvcompress_qjl.kernels [--markdown]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Callable

# Shared memory one block may opt in to, per compute capability (CUDA programming guide, table of
# technical specifications): what a kernel's `shared` must fit.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
ARCHS = tuple(SHARED_MEMORY_LIMIT)


@dataclass(frozen=True)
class AOTCase:
    """One example launch of a kernel module's launcher. spills: register spills accepted per architecture
    (none by default), with `why` they are."""

    label: str
    launch: Callable[[], Any]
    spills: dict[int, int] = field(default_factory=dict)
    why: str = ""

    def __post_init__(self) -> None:
        if self.spills and not self.why:
            raise ValueError(f"AOT case {self.label!r} accepts spills {self.spills}: say why in `why`")


@dataclass
class _Launch:
    case: AOTCase
    kernel: Any
    args: tuple
    kwargs: dict


def _capture(cases: list[AOTCase]) -> list[_Launch]:
    """Every kernel launch each case's launcher makes, recorded instead of run."""
    from triton.runtime.jit import JITFunction

    launches: list[_Launch] = []
    running = JITFunction.run
    for case in cases:
        # the launcher runs as it does in use; its `kernel[grid](...)` calls land here
        JITFunction.run = lambda kernel, *args, grid, warmup, **kwargs: launches.append(_Launch(case, kernel, args, kwargs))
        try:
            before = len(launches)
            case.launch()
        finally:
            JITFunction.run = running
        if len(launches) == before:
            raise ValueError(f"AOT case {case.label!r} launched no Triton kernel: its launch must call a launcher")
    return launches


def _specialize(launch: _Launch, arch: int) -> tuple[Any, dict, dict, dict, Any]:
    """What triton's launcher compiles for these arguments on `arch`: its own binder and argument packing."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, spilled 32-bit words) of the one kernel in a cubin, as cuobjdump reports its resource usage."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name], check=True, capture_output=True, text=True
        ).stdout
    found = re.search(r"REG:(\d+) .*LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for the kernel:\n{usage}")
    return int(found[1]), int(found[2]) // 4


_LAUNCHES: list[_Launch] = []  # what the worker processes compile, by index (forked: kernels do not pickle)


def _compile(job: tuple[int, int]) -> dict[str, Any]:
    import triton
    from triton.compiler import ASTSource

    index, arch = job
    launch = _LAUNCHES[index]
    target, signature, constexprs, attrs, options = _specialize(launch, arch)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    registers, spills = _resources(compiled.asm["cubin"])
    names = launch.kernel.arg_names
    return {
        "case": launch.case.label,
        "kernel": launch.kernel.fn.__name__,
        "arch": arch,
        "constexprs": {names[path[0]]: value for path, value in constexprs.items()},
        "num_warps": compiled.metadata.num_warps,
        "shared": compiled.metadata.shared,
        "shared_limit": SHARED_MEMORY_LIMIT[arch],
        "registers": registers,
        "spills": spills,
        "accepted_spills": launch.case.spills.get(arch, 0),
        "why": launch.case.why,
    }


def compile_here(modules: list[str], archs: tuple[int, ...] = ARCHS, workers: int | None = None) -> list[dict[str, Any]]:
    """Compile every case of `modules` for `archs` in this process, which must not be interpreting Triton.
    Launches that compile alike (same kernel, types, constexprs, options) are compiled once."""
    from triton import knobs

    if knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET=1 is set: compile in a process without it (kvcompress_kernels.aot.compile_cases)")
    cases = [case for module in modules for case in importlib.import_module(module).aot_cases()]
    _LAUNCHES[:] = _capture(cases)
    jobs, seen = [], {}
    for index, launch in enumerate(_LAUNCHES):
        for arch in archs:
            _, signature, constexprs, attrs, options = _specialize(launch, arch)
            key = (id(launch.kernel), arch, repr(signature), repr(sorted(constexprs.items())), repr(attrs), repr(options))
            if seen.setdefault(key, (index, arch)) == (index, arch):
                jobs.append((index, arch))
    workers = workers or min(len(jobs), len(os.sched_getaffinity(0))) or 1
    if workers == 1:
        return [_compile(job) for job in jobs]
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
        return list(pool.map(_compile, jobs))


def compile_cases(modules: list[str], archs: tuple[int, ...] = ARCHS) -> list[dict[str, Any]]:
    """compile_here in a child process without TRITON_INTERPRET, so a test run under the interpreter can call it."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "kvcompress_kernels.aot", *modules, "--archs", *map(str, archs), "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"AOT compilation failed ({' '.join(command)}):\n{done.stderr[-8000:]}")
    return json.loads(done.stdout)


def problems(report: dict[str, Any]) -> list[str]:
    """What is wrong with one compiled kernel: shared memory over its architecture's limit, unexpected spills."""
    where = f"{report['case']}: {report['kernel']} on sm_{report['arch']}"
    found = []
    if report["shared"] > report["shared_limit"]:
        found.append(
            f"{where} needs {report['shared']} bytes of shared memory, over the {report['shared_limit']} a block may "
            "use: tile the kernel smaller"
        )
    if report["spills"] > report["accepted_spills"]:
        found.append(
            f"{where} spills {report['spills']} registers ({report['registers']} used), {report['accepted_spills']} "
            "accepted: shrink its tiles, or accept the spills in its AOTCase with the reason"
        )
    return found


def markdown(reports: list[dict[str, Any]]) -> str:
    """One row per compiled kernel: case, kernel, architecture, shared memory, registers, spills."""
    lines = ["| case | kernel | arch | shared bytes | registers | spills |", "|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r['case']} | `{r['kernel']}` | sm_{r['arch']} | {r['shared']} | {r['registers']} | {r['spills']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", help="kernel modules with an aot_cases() function")
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--json", action="store_true", help="print the reports as JSON (default: a markdown table)")
    args = parser.parse_args(argv)
    reports = compile_here(args.modules, tuple(args.archs))
    print(json.dumps(reports) if args.json else markdown(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
