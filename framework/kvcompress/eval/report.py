"""What an eval run shows: aligned result tables, the header that says where and how it measured (and its
one-line footer), and the progress bar."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], scale: dict[str, float] | None = None) -> str:
    """Rows as an aligned text table: the first column left-aligned, the rest right-aligned."""
    scale = scale or {}
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else fmt.format(value * scale[key] if key in scale else value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def run_header(model_name: str, model: Any, text_source: str, task: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Where and how the results were measured."""
    import torch
    import transformers

    import kvcompress

    return {
        "model": model_name,
        "model_class": type(model).__name__,
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "text": text_source,
        "task": task,
        "protocol": settings,
        "versions": {
            "kvcompress": kvcompress.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(model.device),
        },
    }


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often just the arch)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_footer(header: dict[str, Any]) -> str:
    """The run header in one line, printed under the table."""
    v, m = header["versions"], header["machine"]
    return (
        f"model {header['model']} ({header['model_dtype']}), text {header['text']}, {header['task']} "
        f"{', '.join(f'{k}={val}' for k, val in header['protocol'].items())}; "
        f"torch {v['torch']}, transformers {v['transformers']}, kvcompress {v['kvcompress']}; "
        f"{m['platform']}, {m['processor']} x {m['cpu_count']}, {m['device']}"
    )


def progress(total: int, desc: str) -> Any:
    """A tqdm progress bar on stderr (hidden when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None, leave=False, unit="step")
