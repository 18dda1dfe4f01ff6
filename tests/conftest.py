"""Fixtures over kvcompress.testing's tiny random models, for the cache, attention and patch tests, and a tiny
Llama with its own tokenizer for the eval and lm-eval tests (seconds on CPU)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from kvcompress.eval.text import default_text
from kvcompress.testing import ARCHITECTURES, spec_model, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def text() -> str:
    return default_text()[0]


@pytest.fixture(scope="module")
def tokenizer(text):
    return tiny_tokenizer(text)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def float_spec(dtype: str = "float32", window: int = 0, sinks: int = 0, **extra) -> dict:
    """A spec that stores both roles as plain floats: exact in float32, so results must match DynamicCache.
    Tokens leave the window one by one (compress_run 1), so short test sequences reach the packed state."""
    quantizer = {"method": "float", "dtype": dtype}
    return {
        "name": f"float-{dtype}-w{window}",
        "window": window,
        "sinks": sinks,
        "compress_run": 1,
        "keys": {"quantizer": dict(quantizer)},
        "values": {"quantizer": dict(quantizer)},
        **extra,
    }


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def make_model() -> Callable[..., torch.nn.Module]:
    return tiny_model


@pytest.fixture
def make_float_spec() -> Callable[..., dict]:
    return float_spec


@pytest.fixture(scope="session")
def shipped_specs(tmp_path_factory) -> Path:
    """A directory of the shipped specs, the RVQ ones with codebooks calibrated for kvcompress.testing.spec_model's
    tiny Llama and Gemma-3 (`{model}` in their path), learned in seconds: a short k-means is enough to read them."""
    pytest.importorskip("kvcompress_rvq", reason="the shipped specs use every plugin: pip install -e plugins/rvq")
    import kvcompress
    from kvcompress.calibrate import calibrate, save

    directory = tmp_path_factory.mktemp("specs")
    shipped = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))
    for path in shipped:
        shutil.copy(path, directory / path.name)
    rvq = [p for p in shipped if p.name.startswith("rvq")]
    for path in rvq:
        data = yaml.safe_load(path.read_text())
        for role in ("keys", "values"):
            data[role]["codebook"].update(samples=1024, iterations=1, ema_epochs=0)
        (directory / path.name).write_text(yaml.safe_dump(data))
    for arch in ("llama", "gemma3"):
        model = spec_model(arch, torch.bfloat16)
        ids = torch.randint(0, 128, (2048,), generator=torch.Generator().manual_seed(3))
        for path in rvq:
            spec = kvcompress.load_spec(directory / path.name)
            tensors, metadata = calibrate(spec, model, ids, tokens=2048, context=512, progress=False)
            save(directory / "codebooks" / f"tiny-{arch}-{spec.name}.safetensors", tensors, metadata)
    return directory
