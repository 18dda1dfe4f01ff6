"""Tiny random transformers models for the cache, attention and patch tests (seconds on CPU)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

VOCAB = 128


def _configs() -> dict[str, Callable[[], object]]:
    import transformers as tf

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
    )
    return {
        "llama": lambda: tf.LlamaConfig(**common),
        # A sliding window shorter than the test sequences, so the mask's window is exercised.
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=6),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common),
        "gemma": lambda: tf.GemmaConfig(**common),
        # Alternating sliding/full layers and tanh softcapping of the attention logits.
        "gemma2": lambda: tf.Gemma2Config(**common, sliding_window=6, attn_logit_softcapping=5.0, query_pre_attn_scalar=16),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, sliding_window=6, query_pre_attn_scalar=16),
    }


ARCHITECTURES = tuple(_configs())


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A randomly initialized causal LM of architecture `arch` (2 layers, 4 query / 2 KV heads), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = _configs()[arch]()
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def float_spec(dtype: str = "float32", window: int = 0, sinks: int = 0, **extra) -> dict:
    """A spec that stores both roles as plain floats: exact in float32, so results must match DynamicCache."""
    quantizer = {"method": "float", "dtype": dtype}
    return {
        "name": f"float-{dtype}-w{window}",
        "window": window,
        "sinks": sinks,
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
