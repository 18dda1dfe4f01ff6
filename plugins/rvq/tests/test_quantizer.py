"""The rvq quantizer: exact on sums of codewords, error falling with depth, byte accounting, clear errors."""

from __future__ import annotations

import pytest
import torch

from kvcompress_rvq.kernels import residual_decode
from kvcompress.methods import LayerContext
from kvcompress.testing import make_codec, relative_error
from kvcompress_rvq.plugin import RVQSpec
from kvcompress_rvq.quantizer import Grouping, RVQCodebooks, RVQQuantizer, vector_scale
from kvcompress_rvq.testing import learned, structured_vectors


def spec(**fields) -> dict:
    return {"method": "rvq", "depth": 3, "codebook_size": 32, "group": 16, "layout": "strided", **fields}


def ctx(**fields) -> LayerContext:
    return LayerContext(**{"layer": 0, "num_layers": 1, "role": "keys", "head_dim": 64, "kv_heads": 2, **fields})


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
def test_grouping_splits_and_merges_back(layout):
    grouping = Grouping(head_dim=12, group=4, layout=layout)
    x = torch.arange(12.0).reshape(1, 12)
    groups = grouping.split(x)
    assert groups.shape == (1, 3, 4)
    first = [0.0, 3.0, 6.0, 9.0] if layout == "strided" else [0.0, 1.0, 2.0, 3.0]
    assert groups[0, 0].tolist() == first
    assert torch.equal(grouping.merge(groups), x)


@pytest.mark.parametrize("layout", ["strided", "contiguous"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_sum_of_codewords_is_reproduced(layout, seed):
    g = torch.Generator().manual_seed(seed)
    depth, size, group, head_dim = 3, 32, 16, 64
    # levels of falling scale, so greedy residual search finds each level's codeword
    codewords = torch.stack([torch.randn(size, group, generator=g) * 4.0**-level for level in range(depth)])
    grouping = Grouping(head_dim, group, layout)
    codes = torch.randint(0, size, (1, 1, 1, head_dim // group, depth), generator=g)
    vector = grouping.merge(residual_decode(codes, codewords))
    # codebooks scaled so the vector has standard deviation 1: x = 2.5 * vector is then a sum of codewords
    # times a scale that fp16 holds exactly
    codewords = codewords / vector.std(unbiased=False)
    x = 2.5 * grouping.merge(residual_decode(codes, codewords))
    quantizer = RVQQuantizer(codewords, grouping)
    state = quantizer.encode(x)
    assert state.tensors["scale"].item() == 2.5
    assert torch.equal(quantizer.unpacked_codes(state), codes)
    torch.testing.assert_close(quantizer.decode(state), x, atol=1e-5, rtol=1e-5)


def test_error_falls_with_every_level_on_structured_keys():
    codebooks = learned(6, 64, 32, "strided", data="structured")
    grouping = Grouping(64, 32, "strided")
    x = structured_vectors(512, seed=7).reshape(1, 2, 256, 64)
    errors = []
    for depth in range(1, 7):
        quantizer = RVQQuantizer(codebooks.codewords[:depth].contiguous(), grouping)
        errors.append(relative_error(x, quantizer.decode(quantizer.encode(x))))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] < 1.0  # measured 0.79 after one level, 0.57 after six


def test_shipped_configuration_stores_three_bits_per_element():
    codewords = torch.randn(11, 256, 32, generator=torch.Generator().manual_seed(0))
    codec = make_codec(spec(depth=11, codebook_size=256, group=32), kv_heads=3, codebook=lambda c: codewords)
    x = torch.randn(1, 3, 40, 64, generator=torch.Generator().manual_seed(1))
    state = codec.encode(x)
    assert state.tensors["codes"].shape == (1, 3, 40, 22) and state.tensors["codes"].dtype == torch.uint8
    assert state.tensors["scale"].dtype == torch.float16
    assert state.nbytes() * 8 / x.numel() == 3.0 == codec.quantizer.bits_per_element(64)


def test_constant_and_huge_vectors_stay_finite():
    codebooks = learned(4, 64, 32, "strided")
    quantizer = RVQQuantizer(codebooks.codewords, Grouping(64, 32, "strided"))
    x = torch.zeros(1, 1, 3, 64)
    x[0, 0, 1] = 7.0  # constant: standard deviation 0
    x[0, 0, 2] = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 30000.0
    out = quantizer.decode(quantizer.encode(x.half()))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert vector_scale(x)[0, 0, :2].tolist() == [0.0, 7.0]  # zero: 0; constant: its root mean square


def test_zero_tiny_and_constant_vectors_decode_near_themselves():
    """An all-zero vector decoded as a sum of codewords (|y| up to 0.3), a tiny one floored to fp16's normal
    range came back hundreds of times larger, a constant one was coded at scale 1."""
    codebooks = learned(4, 64, 32, "strided")
    quantizer = RVQQuantizer(codebooks.codewords, Grouping(64, 32, "strided"))
    x = torch.zeros(1, 1, 4, 64)
    x[0, 0, 1] = torch.randn(64, generator=torch.Generator().manual_seed(1)) * 1e-7
    x[0, 0, 2] = 7.0
    x[0, 0, 3] = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 1e-3
    out = quantizer.decode(quantizer.encode(x))
    assert torch.equal(out[0, 0, 0], torch.zeros(64))
    assert (out[0, 0, 1] - x[0, 0, 1]).norm() <= x[0, 0, 1].norm()
    for row in (2, 3):
        assert relative_error(x[0, 0, row], out[0, 0, row]) < 1.0


@pytest.mark.parametrize("depth", [1, 2])
def test_a_norm_preserving_scale_keeps_the_codes_and_the_bits_and_decodes_to_the_input_norm(depth):
    """scale "preserve": the same codes as "std" (the search runs at the standard deviation either way), the
    same bytes, and each decoded vector as long as its input (to fp16's rounding of the scale), where the
    nearest codewords decode short; zero vectors still decode to zeros."""
    codebooks = learned(depth, 256, 8, "contiguous")
    grouping = Grouping(64, 8, "contiguous")
    std, preserve = RVQQuantizer(codebooks.codewords, grouping), RVQQuantizer(codebooks.codewords, grouping, preserve_norm=True)
    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(3))
    x[0, 1, 5] = 0.0
    plain, kept = std.encode(x), preserve.encode(x)
    assert torch.equal(plain.tensors["codes"], kept.tensors["codes"]) and plain.nbytes() == kept.nbytes()
    short, exact = std.decode(plain).norm(dim=-1), preserve.decode(kept).norm(dim=-1)
    lengths = x.norm(dim=-1)
    live = lengths > 0
    torch.testing.assert_close(exact[live], lengths[live], rtol=2e-3, atol=0)  # fp16 scale: 11 bits
    assert (short[live] / lengths[live]).mean() < 0.97  # the std scale decodes short on average
    assert exact[0, 1, 5] == 0


def test_rvq_spec_scale_chooses_the_stored_scale():
    codewords = learned(1, 256, 8, "contiguous")
    x = torch.randn(1, 2, 16, 64, generator=torch.Generator().manual_seed(4))
    decoded = {}
    for scale in ("std", "preserve"):
        codec = make_codec(spec(depth=1, codebook_size=256, group=8, layout="contiguous", scale=scale), codebook=lambda c: codewords)
        decoded[scale] = codec.decode(codec.encode(x))
    torch.testing.assert_close(decoded["preserve"].norm(dim=-1), x.norm(dim=-1), rtol=2e-3, atol=0)
    # not a smaller error (a longer decoded vector errs more), but no shrinking of logits and value mixes
    assert (decoded["std"].norm(dim=-1) / x.norm(dim=-1)).mean() < 0.97
    with pytest.raises(ValueError, match="scale"):
        RVQSpec(**spec(scale="rms"))


def test_group_must_divide_head_dim():
    with pytest.raises(ValueError, match="group 24 does not divide head_dim 64"):
        make_codec(spec(group=24), codebook=lambda c: torch.zeros(3, 32, 24))


def test_codebook_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two.*try 256 or 512"):
        RVQSpec(codebook_size=300)


def test_codebooks_of_another_shape_are_refused():
    with pytest.raises(ValueError, match=r"have shape \(3, 16, 16\), the rvq spec needs \[depth, codebook_size, group\] = \[3, 32, 16\]"):
        make_codec(spec(), codebook=lambda c: torch.zeros(3, 16, 16))


def test_codebooks_learned_for_other_fields_are_refused():
    books = RVQCodebooks(torch.zeros(3, 32, 16), fields={"depth": 3, "codebook_size": 32, "group": 16, "layout": "contiguous"},
                         source="cb.safetensors")
    with pytest.raises(ValueError, match=r"cb.safetensors .* layout 'contiguous' \(spec: 'strided'\).*kvcompress calibrate"):
        make_codec(spec(), codebook=lambda c: books)


def test_missing_codebooks_say_how_to_add_them():
    with pytest.raises(ValueError, match="add a codebook stage"):
        RVQQuantizer.from_spec(RVQSpec(**{k: v for k, v in spec().items() if k != "method"}), ctx())


def test_a_spec_without_a_codebook_stage_is_invalid():
    from kvcompress import SpecError, parse_spec

    with pytest.raises(SpecError, match="keys.codebook: quantizer 'rvq' needs a codebook stage"):
        parse_spec({"name": "x", "keys": {"quantizer": spec()}, "values": {"quantizer": {"method": "float"}}})
