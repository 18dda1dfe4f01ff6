"""Conformance suite for quantizer and estimator plugins, ours and third parties'.

Subclass in your plugin's tests (the class name must start with Test for pytest to collect it):

    from kvcompress.testing import QuantizerConformance

    class TestMyQuantizerKeys(QuantizerConformance):
        spec = {"method": "mine", "bits": 2}     # the quantizer's spec, as in a spec file
        role = "keys"
        head_dim = 64
        max_relative_error = 0.5                 # relative Frobenius error on N(0, 1) data

Each check builds the quantizer through the registry, exactly as a cache layer would.
"""

from __future__ import annotations

import ctypes
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from kvcompress.methods import LayerContext
from kvcompress.pipeline import RoleCodec, build_pruner
from kvcompress.plugins import Registry, get_registry
from kvcompress.spec import parse_spec
from kvcompress.state import PackedState, reachable_tensors
from kvcompress_kernels.aot import ARCHS

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Codebook = Callable[[LayerContext], Any] | dict | None


def interpret_triton_without_gpu() -> None:
    """Run Triton kernels under the interpreter (TRITON_INTERPRET=1) where no CUDA device answers. Call it from
    the conftest.py of a test suite that runs kernels, before any kernel module is imported: it is this
    project's (and a plugin's) choice for its own tests, not something installing kvcompress imposes."""
    import os

    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def kernel_devices() -> list[torch.device]:
    """Where kernel tests run the Triton kernels: on CUDA (compiled) where a GPU answers, else on the CPU under
    TRITON_INTERPRET=1 (see interpret_triton_without_gpu); none without Triton. Parametrize kernel tests over it
    and hand the kernels tensors on that device."""
    import os

    from kvcompress_kernels.dispatch import HAS_TRITON

    if not HAS_TRITON:
        return []
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [torch.device("cpu")]
    return [torch.device("cuda")] if torch.cuda.is_available() else []


def native_or_skip(source: Path) -> ctypes.CDLL:
    """The compiled C++ kernels of `source` (kvcompress_kernels.native), or a skip of the calling test that says why
    they cannot be built here (no compiler, a compile error): for the tests of a method's CPU kernels, e.g. an
    autouse fixture calling it with the package's source."""
    from kvcompress_kernels import native

    library = native.library(source)
    if library is None:
        pytest.skip(f"no C++ kernel: {native.unavailable(source)}")
    return library


class KernelCompileConformance:
    """Every compile case (`aot_cases()`) of `modules` compiles ahead of time for sm_80 and sm_90, on any machine,
    within each architecture's shared memory and without register spills its case does not accept
    (kvcompress_kernels.aot). Subclass in a package's tests with the package's kernel modules."""

    modules: tuple[str, ...] = ()

    @pytest.fixture(scope="class")
    @classmethod
    def reports(cls) -> list[dict]:
        from kvcompress_kernels.aot import compile_cases
        from kvcompress_kernels.dispatch import HAS_TRITON

        if not HAS_TRITON:
            pytest.skip("Triton is not installed")
        return compile_cases(list(cls.modules))

    @pytest.mark.parametrize("arch", ARCHS)
    def test_kernels_compile_ahead_of_time(self, reports: list[dict], arch: int) -> None:
        from kvcompress_kernels.aot import problems

        compiled = [report for report in reports if report["arch"] == arch]
        assert compiled, f"no kernel of {self.modules} compiled for sm_{arch}"
        found = [problem for report in compiled for problem in problems(report)]
        assert not found, "\n".join(found)


def make_codec(
    quantizer: dict,
    role: str = "keys",
    head_dim: int = 64,
    kv_heads: int = 2,
    layer: int = 0,
    num_layers: int = 1,
    estimator: dict | None = None,
    transform: dict | None = None,
    codebook: Codebook = None,
    registry: Registry | None = None,
    pruner: dict | None = None,
) -> RoleCodec:
    """A RoleCodec built through the registry from stage dicts.

    codebook: a codebook stage dict, or a callable(ctx) -> codebook object (for tests that make their own).
    pruner: a pruner stage dict; the other stages are then built for its kept channels.
    """
    registry = registry or get_registry()
    ctx = LayerContext(layer=layer, num_layers=num_layers, role=role, head_dim=head_dim, kv_heads=kv_heads)
    pruning, observes = None, frozenset()
    if pruner is not None:
        method = registry.get("pruner", pruner["method"])
        pruning, observes, ctx = build_pruner(method.spec.model_validate(pruner), ctx, registry)
    if callable(codebook):
        ctx = replace(ctx, codebook=codebook(ctx))
    elif codebook is not None:
        ctx = replace(ctx, codebook=_build(registry, "codebook", codebook, ctx))
    built = _build(registry, "quantizer", quantizer, ctx)
    return RoleCodec(
        name=f"conformance {role} ({quantizer.get('method')})",
        quantizer=built,
        estimator=_build(registry, "estimator", estimator or {"method": "decode"}, replace(ctx, quantizer=built)),
        transform=_build(registry, "transform", transform, ctx) if transform else None,
        pruner=pruning,
        observes=observes,
    )


def _build(registry: Registry, stage: str, data: dict, ctx: LayerContext) -> Any:
    method = registry.get(stage, data["method"])
    return method.factory(method.spec.model_validate(data), ctx)


def relative_error(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).norm() / x.float().norm().clamp_min(1e-12)).item()


class QuantizerConformance:
    """Checks every quantizer must pass. Set the class attributes in your subclass:

    spec: the quantizer's spec as in a spec file; role: "keys" or "values"; head_dim, kv_heads, batch: the
    shape of the test tensors; max_relative_error: required, the relative Frobenius error of a round trip
    on N(0, 1) data your method must stay under (measure it and leave a little room; there is no default,
    since any default would pass a method that stores nothing, whose error is exactly 1); codebook: what
    the pipeline's codebook stage would hand the factory (an object, a `LayerContext -> object` callable,
    or a codebook spec dict built through the registry); transform: a transform spec dict run before the
    quantizer, as a pipeline would.
    """

    spec: dict = {}
    role: str = "keys"
    head_dim: int = 64
    kv_heads: int = 2
    batch: int = 2
    max_relative_error: float | None = None
    codebook: Codebook = None
    transform: dict | None = None

    def codec(self, **overrides: Any) -> RoleCodec:
        return make_codec(
            self.spec, role=self.role, head_dim=self.head_dim, kv_heads=self.kv_heads,
            codebook=self.codebook, transform=self.transform, **overrides,
        )

    def tokens(self, codec: RoleCodec) -> int:
        """A few whole token blocks, at least 64 tokens."""
        block = codec.token_block
        return block * max(2, math.ceil(64 / block))

    def sample(self, tokens: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.kv_heads, tokens, self.head_dim, generator=generator)
        return x.to(dtype)

    def test_spec_round_trip(self) -> None:
        registry = get_registry()
        method = registry.get("quantizer", self.spec["method"])
        parsed = method.spec.model_validate(self.spec)
        assert parsed.model_dump(mode="json", exclude_unset=True) == self.spec
        assert method.spec.model_validate(json.loads(parsed.model_dump_json())) == parsed
        if not method.needs_codebook and self.role in method.roles:
            other = "values" if self.role == "keys" else "keys"
            data = {"name": "conformance", self.role: {"quantizer": self.spec}, other: {"quantizer": {"method": "float"}}}
            assert parse_spec(data).model_dump(mode="json", exclude_unset=True) == data

    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    def test_shapes_and_dtypes(self, dtype: torch.dtype) -> None:
        codec = self.codec()
        x = self.sample(self.tokens(codec), dtype)
        state = codec.encode(x)
        assert isinstance(state, PackedState)
        assert state.tokens == x.shape[2] and state.head_dim == self.head_dim
        for name, tensor in state.tensors.items():
            assert tensor.shape[:2] == x.shape[:2], f"{name}: state tensors are [batch, kv_heads, rows, ...]"
            assert tensor.device == x.device
        out = codec.decode(state)
        assert out.shape == x.shape and out.dtype == dtype
        assert torch.isfinite(out).all()

    def test_reported_bytes_are_the_bytes_held(self) -> None:
        codec = self.codec()
        x = self.sample(self.tokens(codec))
        state = codec.encode(x)
        tensors = reachable_tensors(state)
        distinct = {t.untyped_storage().data_ptr(): t for t in tensors}
        assert state.nbytes() == sum(t.untyped_storage().nbytes() for t in distinct.values())
        for t in distinct.values():
            # a view into a larger buffer would hold memory the accounting cannot see
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), "state holds a view of a larger buffer"

    def test_bits_match_formula(self) -> None:
        codec = self.codec()
        expected = codec.quantizer.bits_per_element(self.head_dim)
        if expected is None:
            pytest.skip("this quantizer's size depends on the data")
        x = self.sample(self.tokens(codec))
        bits = codec.encode(x).nbytes() * 8 / x.numel()
        assert bits == pytest.approx(expected, rel=1e-9)

    def test_deterministic(self) -> None:
        first, second = self.codec(), self.codec()
        x = self.sample(self.tokens(first))
        a, b = first.encode(x), second.encode(x)
        assert a.tensors.keys() == b.tensors.keys()
        for name in a.tensors:
            assert torch.equal(a.tensors[name], b.tensors[name]), f"{name} differs between two builds of one spec"
        assert torch.equal(first.decode(a), second.decode(b))

    def test_states_concatenate(self) -> None:
        codec = self.codec()
        tokens = self.tokens(codec)
        x1, x2 = self.sample(tokens, seed=1), self.sample(tokens, seed=2)
        joined = codec.encode(x1).cat(codec.encode(x2))
        assert joined.tokens == 2 * tokens
        expected = torch.cat([codec.decode(codec.encode(x1)), codec.decode(codec.encode(x2))], dim=2)
        assert torch.equal(codec.decode(joined), expected)

    def test_error_bound(self) -> None:
        if self.max_relative_error is None:
            pytest.fail(f"{type(self).__name__}: set max_relative_error to the round-trip error your method measures")
        codec = self.codec()
        x = self.sample(self.tokens(codec))
        assert relative_error(x, codec.decode(codec.encode(x))) <= self.max_relative_error

    def test_rejects_non_finite(self) -> None:
        codec = self.codec()
        for bad in (float("nan"), float("inf"), float("-inf")):
            x = self.sample(self.tokens(codec))
            x[0, 0, -1, -1] = bad
            with pytest.raises(ValueError, match="non-finite"):
                codec.encode(x)

    def test_decode_estimator_reads_the_state(self) -> None:
        codec = self.codec()
        x = self.sample(self.tokens(codec))
        state = codec.encode(x)
        query = self.sample(3)
        decoded = codec.decode(state)
        assert torch.allclose(codec.scores(query, state), query @ decoded.transpose(-1, -2), atol=1e-4, rtol=1e-4)


class EstimatorConformance:
    """An estimator must agree with the decode estimator on the same packed state. Set in your subclass:
    quantizer and estimator (spec dicts), role, head_dim, kv_heads, queries_per_kv_head (query heads per KV
    head x query length), codebook (as in QuantizerConformance), and atol/rtol, the tolerance of its scores
    and mixes against decode-then-matmul."""

    quantizer: dict = {}
    estimator: dict = {}
    role: str = "keys"
    head_dim: int = 64
    kv_heads: int = 2
    queries_per_kv_head: int = 6  # query heads per KV head x query length: GQA comes for free
    codebook: Codebook = None
    atol: float = 1e-4
    rtol: float = 1e-4

    def codecs(self) -> tuple[RoleCodec, RoleCodec]:
        common = dict(role=self.role, head_dim=self.head_dim, kv_heads=self.kv_heads, codebook=self.codebook)
        return make_codec(self.quantizer, estimator=self.estimator, **common), make_codec(self.quantizer, **common)

    def data(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, self.kv_heads, tokens, self.head_dim, generator=generator)
        query = torch.randn(2, self.kv_heads, self.queries_per_kv_head, self.head_dim, generator=generator)
        return x, query

    def test_scores_equal_decode(self) -> None:
        estimated, decoded = self.codecs()
        if "keys" != self.role:
            pytest.skip("scores are read from keys")
        x, query = self.data(estimated.token_block * 3)
        state = estimated.encode(x)
        got, want = estimated.scores(query, state), decoded.scores(query, state)
        assert got.shape == (2, self.kv_heads, self.queries_per_kv_head, x.shape[2])
        torch.testing.assert_close(got, want, atol=self.atol, rtol=self.rtol)

    def test_mix_equals_decode(self) -> None:
        estimated, decoded = self.codecs()
        if "values" != self.role:
            pytest.skip("mixes are read from values")
        x, query = self.data(estimated.token_block * 3)
        state = estimated.encode(x)
        weights = torch.softmax(query @ x.transpose(-1, -2), dim=-1)
        torch.testing.assert_close(estimated.mix(weights, state), decoded.mix(weights, state), atol=self.atol, rtol=self.rtol)

    def read(self, tokens: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimator's scores (keys) or mix (values) of `tokens` tokens with queries or weights of `dtype`,
        and the decode estimator's on the same inputs in float32."""
        estimated, decoded = self.codecs()
        x, query = self.data(tokens)
        state = estimated.encode(x)
        if self.role == "keys":
            query = query.to(dtype)
            return estimated.scores(query, state), decoded.scores(query.float(), state)
        weights = torch.softmax(query @ x.transpose(-1, -2), dim=-1).to(dtype)
        return estimated.mix(weights, state), decoded.mix(weights.float(), state)

    @pytest.mark.parametrize("blocks", [1, 7, 13])
    def test_odd_token_counts(self, blocks: int) -> None:
        got, want = self.read(self.codecs()[0].token_block * blocks)
        torch.testing.assert_close(got, want, atol=self.atol, rtol=self.rtol)

    @pytest.mark.parametrize("dtype", DTYPES[1:], ids=lambda d: str(d).removeprefix("torch."))
    def test_half_precision_inputs(self, dtype: torch.dtype) -> None:
        got, want = self.read(self.codecs()[0].token_block * 11, dtype)
        assert got.dtype == dtype
        # one rounding of a float32 result to the dtype: its epsilon bounds the relative difference
        torch.testing.assert_close(got, want.to(dtype), atol=10 * self.atol, rtol=torch.finfo(dtype).eps)


# ---------------------------------------------------------------------------------------------------
# Tiny random models of the architectures kvcompress is tested on

VOCAB = 128


def _tiny_configs() -> dict[str, Callable[[], object]]:
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


# The keys of _tiny_configs(), listed here so that importing this module does not import transformers.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3")


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A randomly initialized causal LM of architecture `arch` (2 layers, 4 query / 2 KV heads of size 16,
    vocabulary VOCAB), in eval mode: seconds on a CPU, for tests of methods inside a model."""
    from transformers import AutoModelForCausalLM

    config = _tiny_configs()[arch]()
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def spec_model(arch: str = "llama", dtype: torch.dtype = torch.float32, layers: int = 2) -> torch.nn.Module:
    """A tiny model the shipped specs run on: head_dim 128 (their groups span up to 64 channels; 128 is
    Qwen2.5's), named /models/tiny-{arch} (RVQ codebooks are named after the model). Gemma-3 as the real one
    is: sliding layers (here of 96 positions, so they pack tokens too) alternating with full ones."""
    kinds = (["sliding_attention", "full_attention"] * layers)[:layers]
    sliding = {"sliding_window": 96, "layer_types": kinds} if arch == "gemma3" else {}
    model = tiny_model(arch, dtype=dtype, head_dim=128, num_hidden_layers=layers, **sliding)
    model.config._name_or_path = f"/models/tiny-{arch}"
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(text: str, vocab_size: int = 400) -> Any:
    """A small byte-level BPE trained on `text`, with SmolLM2's special tokens and a chat template: a real
    tokenizer for tests of commands that read text, without any model files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def reader_bias(keys: Any, rows: int, left_padding: int) -> torch.Tensor:
    """The additive bias attention hands a reader of a TokenStore `keys` for `rows` query rows: each head's
    padding rows, sequence 1's first `left_padding` tokens, and the last query row's final 3 tokens hidden."""
    from kvcompress_kernels.partial import bias_from_mask

    visible = ~keys.padding()[:, :, None, :].expand(-1, -1, rows, -1).clone()
    visible[1, :, :, :left_padding] = False
    visible[:, :, -1, -3:] = False
    return bias_from_mask(visible)


def assert_fused_read_matches(
    reader: Any, keys: Any, values: Any, head_dim: int, rows: int, *, splits: int | None = None,
    softcap: float | None = None, dtype: torch.dtype = torch.float32, seed: int = 0, tolerance: float = 2e-5,
) -> None:
    """A fused reader (kvcompress.pipeline.FusedDecodeReader) with KVCOMPRESS_KERNELS=triton reads TokenStores
    `keys` and `values` (on the kernels' device) for `rows` random query rows of `dtype` and `head_dim` channels
    per KV head, under reader_bias (padding rows, left padding, a row's last tokens hidden), as its estimators do
    in float32 on the CPU: output and log-sum-exp float32, within `tolerance` (1e-4 for a half-precision query).
    The estimator path rounds scores and weights to the query's dtype; the kernels keep float32 throughout (a half
    query is exact in float32), so they are held to the estimators' float32 read."""
    from kvcompress.pipeline import EstimatorReader

    keys_state, values_state = keys.view(), values.view()
    batch, heads = keys_state.tensors[next(iter(keys_state.tensors))].shape[:2]
    gen = torch.Generator().manual_seed(seed + 1)
    query = (torch.randn(batch, heads, rows, head_dim, generator=gen) * 2).to(dtype)
    bias = reader_bias(keys, rows, left_padding=5)
    scale = head_dim**-0.5
    reader.splits = splits
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVCOMPRESS_KERNELS", "triton")
        out, lse = reader.attend(query.to(bias.device), keys_state, values_state, bias, scale, softcap)
    cpu = lambda state: state.map(lambda t: t.cpu())
    expected, expected_lse = EstimatorReader(reader.keys, reader.values).attend(
        query.float(), cpu(keys_state), cpu(values_state), bias.cpu(), scale, softcap
    )
    tolerance = tolerance if dtype == torch.float32 else max(tolerance, 1e-4)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse.cpu(), expected_lse, atol=tolerance, rtol=tolerance)


def assert_fused_generation_matches(
    monkeypatch: pytest.MonkeyPatch, spec: dict, module: object, launcher: str, device: torch.device
) -> None:
    """A tiny Llama (head_dim 16, 2 query heads per KV head; two left-padded sequences) generating with `spec` and
    KVCOMPRESS_KERNELS=triton reaches the fused kernel launcher `module.<launcher>` (a reader module's name for
    it) and gives the tokens, and within 1e-4 the logits, that KVCOMPRESS_KERNELS=torch gives."""
    import kvcompress
    from kvcompress.hf.keywords import with_cache

    model = tiny_model("llama").to(device)
    ids = torch.randint(0, 100, (2, 21), generator=torch.Generator().manual_seed(5)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    calls = []
    real = getattr(module, launcher)
    monkeypatch.setattr(module, launcher, lambda *args: calls.append(1) or real(*args))
    results = {}
    for kernels in ("torch", "triton"):
        monkeypatch.setenv("KVCOMPRESS_KERNELS", kernels)
        results[kernels] = model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, **with_cache(model, kvcompress.cache_for(model, spec)),
            output_logits=True, return_dict_in_generate=True,
        )
    assert calls, f"the triton run never reached {launcher}"
    assert results["triton"].sequences.tolist() == results["torch"].sequences.tolist()
    torch.testing.assert_close(
        torch.stack(results["triton"].logits), torch.stack(results["torch"].logits), atol=1e-4, rtol=1e-4
    )


def adapter_rope_views(
    model: torch.nn.Module, ids: torch.Tensor, prompt: int, registry: Registry | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Holds a model adapter to the model: runs `ids` [batch, tokens] through the unpatched model into a
    DynamicCache in two forwards (the first `prompt` tokens, then the rest), capturing the keys before RoPE
    through the adapter of the model's type (kvcompress.hf.adapters.model_adapter).

    Returns per layer (adapter.apply_rope(captured keys, their absolute positions), the keys the DynamicCache
    holds), both [batch, kv_heads, tokens, head_dim] and cut to the tokens the cache holds (a sliding-window
    layer keeps only the last ones). The first forward passes positions as [tokens], the second as
    [batch, tokens]. They must agree.
    """
    from transformers import DynamicCache

    from kvcompress.hf.adapters import model_adapter
    from kvcompress.hf.cache import model_geometry
    from kvcompress.hf.keywords import with_cache

    adapter = model_adapter(model, registry)
    geometry = model_geometry(model.config)
    modules = adapter.attention_modules(model, geometry)
    captured: list[list[torch.Tensor]] = [[] for _ in modules]
    hooks = []
    for index, module in enumerate(modules):
        found = adapter.pre_rope_keys(module)
        assert found is not None, f"the adapter captures no keys before RoPE from {type(module).__name__}"
        submodule, read = found

        def capture(sub, args, output, index=index, module=module, read=read):
            captured[index].append(read(module, output, geometry.head_dim))

        hooks.append(submodule.register_forward_hook(capture))
    cache = DynamicCache(config=model.config)
    try:
        with torch.no_grad():
            model(ids[:, :prompt], **with_cache(model, cache))
            model(ids[:, prompt:], **with_cache(model, cache))
    finally:
        for hook in hooks:
            hook.remove()
    batch, tokens = ids.shape
    positions = (torch.arange(prompt), torch.arange(prompt, tokens).expand(batch, -1))
    views = []
    for index, (first, second) in enumerate(captured):
        with torch.no_grad():
            rotated = torch.cat([adapter.apply_rope(model, index, k, p) for k, p in zip((first, second), positions)], 2)
        stored = cache.layers[index].keys
        views.append((rotated[:, :, tokens - stored.shape[2]:], stored))
    return views
