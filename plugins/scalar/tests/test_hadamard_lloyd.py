"""The randomized Hadamard transform and the Lloyd-Max levels of N(0, 1)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from kvcompress import get_registry
from kvcompress.state import reachable_tensors, storage_nbytes
from kvcompress.testing import make_codec
from kvcompress_scalar.quantizers import LLOYD_MAX_LEVELS, HadamardTransform, hadamard_matrix, lloyd_max_gaussian


def rotation(head_dim: int = 64, seed: int = 0, layer: int = 0) -> HadamardTransform:
    return HadamardTransform(head_dim=head_dim, seed=seed, layer=layer)


# ---------------------------------------------------------------------------------------------------
# Hadamard


@pytest.mark.parametrize("head_dim", [1, 2, 16, 64, 128, 256])
def test_hadamard_is_orthogonal(head_dim):
    matrix = rotation(head_dim).matrix
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(head_dim), atol=1e-6, rtol=0)


def test_sylvester_matrix_is_a_hadamard_matrix():
    h = hadamard_matrix(32)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, 32 * torch.eye(32))
    assert torch.equal(h, h.T)


def test_hadamard_matches_signs_then_walsh_hadamard_butterflies():
    transform = rotation(16, seed=5)
    x = torch.randn(3, 16, dtype=torch.float64)
    # reference: the in-place fast Walsh-Hadamard transform on the sign-flipped vector
    y = x * transform.signs.double()
    span = 1
    while span < 16:
        y = y.reshape(3, -1, 2, span)
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2).reshape(3, 16)
        span *= 2
    expected = (y / 4).float()
    torch.testing.assert_close(transform.forward(x.float()), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_hadamard_inverse_and_inner_products(dtype):
    transform = rotation(64, seed=1)
    q, k = torch.randn(2, 3, 5, 64), torch.randn(2, 3, 7, 64)
    forward = transform.forward(k.to(dtype))
    assert forward.dtype == dtype and forward.shape == k.shape
    tolerance = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    torch.testing.assert_close(transform.inverse(forward).float(), k, atol=tolerance * 4, rtol=tolerance)
    scores = transform.forward(q) @ transform.forward(k).transpose(-1, -2)
    torch.testing.assert_close(scores, q @ k.transpose(-1, -2), atol=1e-4, rtol=1e-5)


def test_hadamard_spreads_an_outlier_channel():
    x = torch.zeros(1, 64)
    x[0, 7] = 8.0
    y = rotation(64).forward(x)
    assert torch.allclose(y.abs(), torch.full_like(y, 1.0))


def test_hadamard_signs_are_seeded_per_layer():
    assert torch.equal(rotation(seed=3, layer=2).signs, rotation(seed=3, layer=2).signs)
    assert not torch.equal(rotation(seed=3, layer=0).signs, rotation(seed=3, layer=1).signs)
    assert not torch.equal(rotation(seed=3, layer=0).signs, rotation(seed=4, layer=0).signs)
    signs = rotation(128).constants()["signs"]
    assert signs.dtype == torch.int8 and set(signs.unique().tolist()) == {-1, 1}


def test_hadamard_rejects_head_dims_that_are_not_powers_of_two():
    with pytest.raises(ValueError, match="head_dim 96 is not a power of two"):
        make_codec({"method": "float"}, head_dim=96, transform={"method": "hadamard"})


def test_hadamard_codec_reports_what_it_holds_as_constants():
    codec = make_codec({"method": "float", "dtype": "float32"}, transform={"method": "hadamard", "seed": 2})
    x = torch.randn(1, 2, 4, 64)
    torch.testing.assert_close(codec.decode(codec.encode(x)), x, atol=1e-5, rtol=1e-5)
    constants = codec.constants()
    assert set(constants) == {"transform.signs", "transform.matrix"}
    assert storage_nbytes(constants.values()) == storage_nbytes(reachable_tensors(codec.transform))


# ---------------------------------------------------------------------------------------------------
# Lloyd-Max levels


def test_lloyd_max_levels_match_the_published_points():
    published = {1: [0.7979], 2: [0.4528, 1.510], 3: [0.2451, 0.7560, 1.3440, 2.1520]}
    for bits, positive in published.items():
        expected = [-v for v in reversed(positive)] + positive
        assert LLOYD_MAX_LEVELS[bits] == pytest.approx(expected, abs=1e-3)


def test_lloyd_max_levels_are_symmetric_sorted_and_self_consistent():
    for bits, levels in LLOYD_MAX_LEVELS.items():
        assert len(levels) == 2**bits and levels == sorted(levels)
        assert levels == pytest.approx([-v for v in reversed(levels)], abs=1e-10)
        # a fixed point of Lloyd's iteration: one more pass moves nothing
        assert lloyd_max_gaussian(bits) == pytest.approx(levels, abs=1e-10)


def test_lloyd_max_levels_minimize_gaussian_mse():
    """The 4-bit grid's MSE on N(0, 1) samples equals the known Lloyd-Max distortion and beats any perturbation."""
    samples = torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def mse(levels: torch.Tensor) -> float:
        thresholds = (levels[1:] + levels[:-1]) / 2
        return ((samples - levels[torch.bucketize(samples, thresholds)]) ** 2).mean().item()

    levels = torch.tensor(LLOYD_MAX_LEVELS[4], dtype=torch.float64)
    assert mse(levels) == pytest.approx(0.009497, rel=0.02)
    assert mse(levels * 1.03) > mse(levels) and mse(levels * 0.97) > mse(levels)
    uniform = torch.linspace(levels[0].item(), levels[-1].item(), 16, dtype=torch.float64)
    assert mse(uniform) > mse(levels)


# ---------------------------------------------------------------------------------------------------
# Plugin registration


def test_plugin_registers_its_methods():
    registry = get_registry()
    assert {"scalar", "fp8"} <= set(registry.names("quantizer"))
    assert "hadamard" in registry.names("transform")


def test_plugin_module_imports_no_torch():
    code = "import sys, kvcompress_scalar.plugin; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_levels_module_constant_is_tabulated_once():
    # the runtime module computes the levels at import; they are plain floats, in order
    assert all(isinstance(v, float) for levels in LLOYD_MAX_LEVELS.values() for v in levels)
    assert math.isclose(LLOYD_MAX_LEVELS[1][1], math.sqrt(2 / math.pi), abs_tol=1e-12)
