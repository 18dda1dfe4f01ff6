"""Fixtures over kvcompress.testing's tiny random models, for the cache, attention and patch tests, and the eval tests' tiny
chat model (seconds on CPU)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from kvcompress.eval.text import default_text
from kvcompress.testing import ARCHITECTURES, tiny_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


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


# The eval tests' tiny chat model: no model files needed.


@pytest.fixture(scope="session")
def text() -> str:
    """The default text (a license text, or pydoc topics) the eval tests read."""
    return default_text()[0]


@pytest.fixture(scope="session")
def tokenizer(text):
    """A small byte-level BPE trained on the default text, with a chat template (no model files needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


@pytest.fixture(scope="session")
def model(tokenizer):
    """A random two-layer Llama over the tokenizer's vocabulary (4096 positions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, model, tokenizer):
    """The tiny model and its tokenizer saved as a local transformers directory (what --model takes)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
