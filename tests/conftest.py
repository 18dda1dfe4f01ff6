"""Fixtures over kvcompress.testing's tiny random models, for the cache, attention and patch tests (seconds on CPU)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from kvcompress.testing import ARCHITECTURES, tiny_model


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
