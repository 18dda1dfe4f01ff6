"""Codebook learning (k-means, EMA) and the safetensors file: round trip, and mismatches refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kvcompress import KVCompressError
from kvcompress.methods import LayerContext
from kvcompress.testing import make_codec
from kvcompress_rvq.codebooks import EMAState, ema_init, ema_step, kmeans, learn, load
from kvcompress_rvq.plugin import KMeansSpec, RVQSpec

QUANTIZER = {"method": "rvq", "depth": 2, "codebook_size": 16, "group": 32, "layout": "strided"}


def ctx(**fields) -> LayerContext:
    base = {"layer": 0, "num_layers": 2, "role": "keys", "head_dim": 64, "kv_heads": 2, "model": "/models/tiny-llama"}
    return LayerContext(**{**base, **fields})


def test_ema_moves_codewords_toward_their_assigned_data():
    codebooks = torch.tensor([[[0.0, 0.0], [10.0, 10.0]]])  # one level, two codewords
    batch = torch.tensor([[1.0, 1.0], [1.2, 0.8], [9.0, 11.0]])
    states = [ema_init(batch, codebooks[0], batch=3)]
    before = codebooks.clone()
    target = torch.tensor([[1.1, 0.9], [9.0, 11.0]])  # the mean of the vectors assigned to each codeword
    ema_step(codebooks, states, batch, decay=0.9, eps=1e-5)
    assert ((codebooks[0] - target).norm(dim=-1) < (before[0] - target).norm(dim=-1)).all()
    for _ in range(200):
        ema_step(codebooks, states, batch, decay=0.9, eps=1e-5)
    torch.testing.assert_close(codebooks[0], target, atol=1e-3, rtol=0)


def test_ema_initial_state_reproduces_the_codebook():
    x = torch.randn(400, 4, generator=torch.Generator().manual_seed(0))
    codebook = kmeans(x, 8, 5, torch.Generator().manual_seed(1))
    state = ema_init(x, codebook, batch=64)
    assert isinstance(state, EMAState)
    torch.testing.assert_close(state.counts.sum(), torch.tensor(64.0))
    used = state.counts > 0
    torch.testing.assert_close(state.sums[used] / state.counts[used, None], codebook[used])


def test_kmeans_lowers_the_error_and_uses_every_codeword():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 4, generator=g) * 5
    x = centers[torch.randint(0, 8, (800,), generator=g)] + 0.1 * torch.randn(800, 4, generator=g)

    def error(iterations: int) -> float:
        codebook = kmeans(x, 8, iterations, torch.Generator().manual_seed(3))
        assert torch.cdist(x, codebook).argmin(-1).unique().numel() == 8
        return torch.cdist(x, codebook).min(-1).values.square().mean().item()

    assert error(10) < 0.5 * error(0)  # Lloyd iterations from the random initial codewords


def test_learn_needs_enough_vectors():
    spec = KMeansSpec(path="x.safetensors", iterations=1)
    quantizer = RVQSpec(depth=1, codebook_size=256, group=32)
    with pytest.raises(ValueError, match="100 group vectors cannot train 256 codewords"):
        learn(spec, quantizer, torch.randn(50, 64), ctx())


def test_learning_is_deterministic_and_fp16():
    spec = KMeansSpec(path="x.safetensors", iterations=2, samples=300)
    quantizer = RVQSpec(depth=2, codebook_size=16, group=32)
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    first, second = learn(spec, quantizer, x, ctx()), learn(spec, quantizer, x, ctx())
    assert first["codewords"].dtype == torch.float16 and first["codewords"].shape == (2, 16, 32)
    assert torch.equal(first["codewords"], second["codewords"])


# ---------------------------------------------------------------------------------------------------
# The file


def write_file(path, layers=2, head_dim=64, model="/cache/models/tiny-llama", quantizer=QUANTIZER, fmt="kvcompress-codebooks/1"):
    tensors, entries = {}, {}
    for layer in range(layers):
        for role in ("keys", "values"):
            tensors[f"layers.{layer}.{role}.codewords"] = torch.randn(2, 16, 32).half()
            entries[f"{layer}.{role}"] = {"quantizer": quantizer, "codebook": {"method": "kmeans", "path": str(path)}}
    metadata = {"format": fmt, "model": model, "num_layers": str(layers), "head_dim": str(head_dim),
                "kv_heads": "2", "spec": "test", "entries": json.dumps(entries)}
    save_file(tensors, str(path), metadata=metadata)
    return tensors


def test_file_round_trip_through_the_codebook_stage(tmp_path):
    tensors = write_file(tmp_path / "cb.safetensors")
    stage = {"method": "kmeans", "path": "cb.safetensors"}
    books = load(KMeansSpec.model_validate(stage), ctx(layer=1, role="values", spec_dir=str(tmp_path)))
    assert torch.equal(books.codewords, tensors["layers.1.values.codewords"])
    assert books.fields == {k: QUANTIZER[k] for k in ("depth", "codebook_size", "group", "layout")}
    codec = make_codec(QUANTIZER, codebook=lambda c: books)
    x = torch.randn(1, 2, 8, 64)
    assert codec.decode(codec.encode(x)).shape == x.shape


def test_model_is_compared_by_name_not_by_cache_directory(tmp_path):
    write_file(tmp_path / "cb.safetensors", model="/home/a/.cache/kvcompress/models/tiny-llama")
    load(KMeansSpec(path=str(tmp_path / "cb.safetensors")), ctx(model="/root/.cache/kvcompress/models/tiny-llama"))


def test_no_model_known_checks_only_the_shapes(tmp_path):
    write_file(tmp_path / "cb.safetensors")
    load(KMeansSpec(path=str(tmp_path / "cb.safetensors")), ctx(model=None, num_layers=1))


@pytest.mark.parametrize(
    "context,message",
    [
        ({"model": "/models/other-model"}, "calibrated for model '/cache/models/tiny-llama', not '/models/other-model'"),
        ({"head_dim": 128}, "codebooks are for head_dim 64, the cache has head_dim 128"),
        ({"num_layers": 30}, "codebooks are for 2 layers, the model has 30"),
        ({"layer": 5, "model": None, "num_layers": 6}, "no codebooks for layer 5 keys"),
    ],
)
def test_mismatches_are_refused_with_the_fix(tmp_path, context, message):
    write_file(tmp_path / "cb.safetensors")
    with pytest.raises(KVCompressError, match=message) as error:
        load(KMeansSpec(path=str(tmp_path / "cb.safetensors")), ctx(**context))
    assert "kvcompress calibrate" in str(error.value)


def test_a_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(KVCompressError, match=r"does not exist; write it with `kvcompress calibrate SPEC --model "
                       r"/models/tiny-llama --out .*nope.safetensors`"):
        load(KMeansSpec(path="nope.safetensors"), ctx(spec_dir=str(tmp_path)))


def test_model_in_the_path_is_the_model_name_so_one_spec_serves_every_model(tmp_path):
    write_file(tmp_path / "tiny-llama-rvq.safetensors")
    spec = KMeansSpec(path="{model}-rvq.safetensors")
    assert load(spec, ctx(spec_dir=str(tmp_path))).source == str(tmp_path / "tiny-llama-rvq.safetensors")
    with pytest.raises(KVCompressError, match=r"other-rvq.safetensors does not exist; write it with `kvcompress "
                       r"calibrate SPEC --model /models/other --out .*other-rvq.safetensors`"):
        load(spec, ctx(spec_dir=str(tmp_path), model="/models/other"))
    # Codecs built without a model (random tensors) read the default model's file.
    with pytest.raises(KVCompressError, match=r"smollm2-rvq.safetensors does not exist"):
        load(spec, ctx(spec_dir=str(tmp_path), model=None))


def test_foreign_files_are_refused(tmp_path):
    write_file(tmp_path / "other.safetensors", fmt="something-else")
    with pytest.raises(KVCompressError, match="not a kvcompress codebook file"):
        load(KMeansSpec(path=str(tmp_path / "other.safetensors")), ctx())
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(KVCompressError, match="not a readable safetensors codebook file"):
        load(KMeansSpec(path=str(tmp_path / "junk.safetensors")), ctx())


def test_codebooks_for_other_quantizer_fields_are_refused(tmp_path):
    write_file(tmp_path / "cb.safetensors", quantizer={**QUANTIZER, "layout": "contiguous"})
    books = load(KMeansSpec(path=str(tmp_path / "cb.safetensors")), ctx())
    with pytest.raises(ValueError, match=r"learned for another rvq quantizer: layout 'contiguous' \(spec: 'strided'\)"):
        make_codec(QUANTIZER, codebook=lambda c: books)
