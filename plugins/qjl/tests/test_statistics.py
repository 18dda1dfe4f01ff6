"""The QJL estimator is unbiased, with the variance the paper states, over many independent sketches.

Each trial builds the quantizer and estimator through the registry with its own seed, encodes one key and
scores one query. Tolerances come from the sample: the mean within 4 standard errors of <q, k>; the variance
within 5 standard errors of a variance estimate, sqrt((m4 - s^4) / n), with m4 the sample's fourth central moment.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvcompress.testing import make_codec

TRIALS = 3000
D = 64


@pytest.fixture(autouse=True)
def one_thread():
    """Thousands of tiny QR factorisations: thread start-up would dominate them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair(cosine: float, heavy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A query and key with the given cosine; the key's norm is exactly 8 (so its fp16 norm is exact)."""
    generator = torch.Generator().manual_seed(11)
    k = torch.randn(D, generator=generator, dtype=torch.float64)
    if heavy:
        k[[2, 30, 45]] *= 6.0
    other = torch.randn(D, generator=generator, dtype=torch.float64)
    other -= (other @ k) / (k @ k) * k
    q = cosine * k / k.norm() + math.sqrt(1 - cosine**2) * other / other.norm()
    return (q * 3.0).float(), (k / k.norm() * 8.0).float()


def estimates(spec: dict, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    values = []
    for seed in range(TRIALS):
        codec = make_codec({**spec, "seed": seed}, head_dim=D, kv_heads=1, estimator={"method": "qjl"})
        state = codec.encode(k.reshape(1, 1, 1, D))
        values.append(codec.scores(q.reshape(1, 1, 1, D), state).item())
    return torch.tensor(values, dtype=torch.float64)


def check_mean(samples: torch.Tensor, truth: float) -> None:
    standard_error = samples.std().item() / math.sqrt(len(samples))
    assert abs(samples.mean().item() - truth) < 4 * standard_error, (samples.mean().item(), truth, standard_error)


def variance_and_error(samples: torch.Tensor) -> tuple[float, float]:
    centred = samples - samples.mean()
    variance = centred.square().mean().item() * len(samples) / (len(samples) - 1)
    fourth = centred.pow(4).mean().item()
    return variance, math.sqrt(max(fourth - variance**2, 0.0) / len(samples))


def qjl_variance(q: torch.Tensor, k: torch.Tensor, m: int) -> float:
    q, k = q.double(), k.double()
    return ((math.pi / 2) * (q @ q) * (k @ k) - (q @ k) ** 2).item() / m


@pytest.mark.parametrize("cosine", [0.0, 0.6, 0.95])
def test_gaussian_sketch_unbiased_with_the_stated_variance(cosine):
    q, k = pair(cosine)
    samples = estimates({"method": "qjl", "sketch": "gaussian", "outliers": 0, "sketch_dim": 128}, q, k)
    check_mean(samples, (q.double() @ k.double()).item())
    variance, error = variance_and_error(samples)
    expected = qjl_variance(q, k, 128)
    assert abs(variance - expected) < 5 * error, (variance, expected, error)


@pytest.mark.parametrize("cosine", [0.0, 0.95])
def test_orthogonal_sketch_unbiased_and_no_noisier_than_gaussian(cosine):
    q, k = pair(cosine)
    samples = estimates({"method": "qjl", "outliers": 0, "sketch_dim": 128}, q, k)
    check_mean(samples, (q.double() @ k.double()).item())
    variance, error = variance_and_error(samples)
    assert variance < qjl_variance(q, k, 128) + 5 * error


def test_outlier_split_unbiased_with_the_summed_variance():
    """k = k_in + k_out: each part's estimate is unbiased; with a Gaussian sketch the two use disjoint columns
    of S, so they are independent and the variances add (m rows for the inliers, m' for the outliers)."""
    q, k = pair(0.8, heavy=True)
    spec = {"method": "qjl", "sketch": "gaussian", "outliers": 3, "group": 1, "sketch_dim": 128, "outlier_sketch_dim": 32}
    samples = estimates(spec, q, k)
    check_mean(samples, (q.double() @ k.double()).item())
    outlier = torch.zeros(D, dtype=torch.bool)
    outlier[k.abs().topk(3).indices] = True
    expected = qjl_variance(q * ~outlier, k * ~outlier, 128) + qjl_variance(q * outlier, k * outlier, 32)
    variance, error = variance_and_error(samples)
    assert abs(variance - expected) < 5 * error, (variance, expected, error)
    orthogonal = estimates({**spec, "sketch": "orthogonal"}, q, k)
    check_mean(orthogonal, (q.double() @ k.double()).item())
