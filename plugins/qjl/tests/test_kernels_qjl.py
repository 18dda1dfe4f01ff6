"""The QJL Triton kernels against their torch references on the CPU: compiled on CUDA where a GPU answers, under
TRITON_INTERPRET=1 on CPU tensors elsewhere (kvcompress.testing.kernel_devices)."""

from __future__ import annotations

import pytest
import torch

from kvcompress.testing import kernel_devices
from kvcompress_qjl.kernels import (
    NATIVE_QUERIES,
    QJLCodes,
    outlier_channels,
    qjl_quantize,
    qjl_quantize_torch,
    qjl_quantize_triton,
    qjl_scores,
    qjl_scores_torch,
    qjl_scores_triton,
)

SCALE = 1.2533  # any constant: both paths multiply by it


def sign_bits_match(reference: torch.Tensor, kernel: torch.Tensor, projection: torch.Tensor) -> None:
    """Packed signs equal, except where the projection is within float rounding of zero (summation order)."""
    differ = torch.nonzero(reference != kernel)
    for *lead, byte in differ.tolist():
        rows = projection[tuple(lead)][byte * 8 : byte * 8 + 8]
        assert rows.abs().min() < 1e-4, f"sign bits differ at {lead + [byte]} away from zero: {rows}"


def case(d: int, t: int, outliers: int, group: int, m: int, m_out: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, t, d, generator=generator)
    keys[..., [1, d // 2]] *= 8.0  # heavy channels, as in real keys
    sketch = torch.randn(m, d, generator=generator)
    index = outlier_channels(keys, outliers, group) if outliers else None
    return keys, sketch, index


CASES = [
    # head_dim, tokens (odd), outliers, group, m, m'
    (64, 37, 0, 1, 128, 0),
    (128, 37, 0, 1, 256, 0),
    (64, 39, 8, 13, 128, 64),
    (128, 33, 8, 11, 256, 256),
    (64, 35, 3, 35, 72, 40),  # sketch rows not a power of two, one group of 35
]


def on(device: torch.device, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if x is None else x.to(device) for x in tensors]


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("d, t, outliers, group, m, m_out", CASES)
def test_quantize_kernel_matches_torch(d, t, outliers, group, m, m_out, device):
    keys, sketch, index = case(d, t, outliers, group, m, m_out)
    want = qjl_quantize_torch(keys, sketch, index, group, m_out)
    got = QJLCodes(*on(torch.device("cpu"), *qjl_quantize_triton(*on(device, keys, sketch, index), group, m_out)))
    inlier = keys if index is None else keys.masked_fill(
        torch.zeros(1, 2, t // group, d, dtype=torch.bool).scatter_(-1, index.long(), True).repeat_interleave(group, 2), 0
    )
    sign_bits_match(want.signs, got.signs, inlier @ sketch.T)
    torch.testing.assert_close(got.norm, want.norm, rtol=1e-3, atol=0)
    if index is None:
        assert got.outlier_signs is None and got.outlier_norm is None
    else:
        sign_bits_match(want.outlier_signs, got.outlier_signs, (keys - inlier) @ sketch[:m_out].T)
        torch.testing.assert_close(got.outlier_norm, want.outlier_norm, rtol=1e-3, atol=0)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("d, t, outliers, group, m, m_out", CASES)
def test_scores_kernel_matches_torch_with_gqa(d, t, outliers, group, m, m_out, device):
    keys, sketch, index = case(d, t, outliers, group, m, m_out)
    codes = qjl_quantize_torch(keys, sketch, index, group, m_out)
    # 2 query heads per KV head x 3 query tokens, grouped by KV head: n = 6 rows per KV head
    query = torch.randn(1, 2, 6, d, generator=torch.Generator().manual_seed(9))
    want = qjl_scores_torch(query, codes, sketch, SCALE, index, group)
    query_on, sketch_on, index_on = on(device, query, sketch, index)
    got = qjl_scores_triton(query_on, QJLCodes(*on(device, *codes)), sketch_on, SCALE, index_on, group).cpu()
    assert got.shape == (1, 2, 6, t)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
def test_scores_kernel_query_and_group_blocks(device):
    """More queries than one block and more groups than one program: every tile lands in place."""
    keys, sketch, index = case(64, 96, 4, 8, 128, 64, seed=2)
    codes = qjl_quantize_torch(keys, sketch, index, 8, 64)
    query = torch.randn(1, 2, 19, 64, generator=torch.Generator().manual_seed(4))
    want = qjl_scores_torch(query, codes, sketch, SCALE, index, 8)
    query_on, sketch_on, index_on = on(device, query, sketch, index)
    got = qjl_scores_triton(
        query_on, QJLCodes(*on(device, *codes)), sketch_on, SCALE, index_on, 8, block_queries=16, groups_per_program=3
    ).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_dispatch_on_cpu(monkeypatch):
    """CPU tensors: quantize takes the torch path; scores the C++ kernel for decode-sized query blocks (where it
    builds: test_kernels_cpu_qjl holds it to the reference), the torch path for larger ones or when told to."""
    keys, sketch, index = case(64, 64, 8, 32, 128, 128)
    codes = qjl_quantize(keys, sketch, index, 32, 128)
    for name, tensor in qjl_quantize_torch(keys, sketch, index, 32, 128)._asdict().items():
        assert torch.equal(getattr(codes, name), tensor)
    query = torch.randn(1, 2, 3, 64)
    expected = qjl_scores_torch(query, codes, sketch, SCALE, index, 32)
    torch.testing.assert_close(qjl_scores(query, codes, sketch, SCALE, index, 32), expected, rtol=1e-5, atol=1e-4)
    many = torch.randn(1, 2, NATIVE_QUERIES + 1, 64)
    assert torch.equal(qjl_scores(many, codes, sketch, SCALE, index, 32), qjl_scores_torch(many, codes, sketch, SCALE, index, 32))
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
    assert torch.equal(qjl_scores(query, codes, sketch, SCALE, index, 32), expected)


def test_bad_shapes_are_named():
    keys, sketch, index = case(64, 64, 8, 32, 128, 128)
    with pytest.raises(ValueError, match="multiple of 8"):
        qjl_quantize_torch(keys, sketch[:100], None)
    with pytest.raises(ValueError, match="does not cover"):
        qjl_quantize_torch(keys, sketch, index, 16, 128)
    with pytest.raises(ValueError, match="whole groups"):
        outlier_channels(keys[:, :, :40], 8, 32)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("magnitude", [1e-6, 1e6])
def test_scores_kernel_is_accurate_at_any_query_scale(magnitude, device):
    """The fp16 parts of S q are scaled per query row: queries far outside fp16's range (S q of 1e7, or 1e-5 where
    fp16 is subnormal) score like the fp32 reference."""
    keys, sketch, index = case(128, 64, 8, 32, 256, 64, seed=5)
    codes = qjl_quantize_torch(keys, sketch, index, 32, 64)
    query = torch.randn(1, 2, 4, 128, generator=torch.Generator().manual_seed(6)) * magnitude
    want = qjl_scores_torch(query, codes, sketch, SCALE, index, 32)
    query_on, sketch_on, index_on = on(device, query, sketch, index)
    got = qjl_scores_triton(query_on, QJLCodes(*on(device, *codes)), sketch_on, SCALE, index_on, 32).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("outliers", [0, 4])
def test_keys_longer_than_fp16_saturate_their_norms_and_scores_stay_finite(outliers, device):
    """A key of norm 1e6 stored as an fp16 norm was Inf, and every score of its row NaN."""
    keys, sketch, index = case(64, 32, outliers, 32, 128, 64 if outliers else 0)
    keys[0, 1, 5] *= 1e5
    query = torch.randn(1, 2, 3, 64)
    for quantize in (qjl_quantize_torch, qjl_quantize_triton):
        codes = QJLCodes(*on(torch.device("cpu"), *quantize(*on(device, keys, sketch, index), 32, 64 if outliers else 0)))
        assert torch.isfinite(codes.norm).all() and codes.norm.float().max() == torch.finfo(torch.float16).max
        scores = qjl_scores_torch(query, codes, sketch, SCALE, index, 32)
        assert torch.isfinite(scores).all()
