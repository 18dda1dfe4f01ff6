"""The keyword the core hands a model its cache under (kvcompress.hf.keywords)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import kvcompress  # noqa: E402
from kvcompress.eval.perplexity import Protocol, continuation_nll  # noqa: E402
from kvcompress.hf.keywords import cache_keyword, with_cache  # noqa: E402
from kvcompress.testing import tiny_model  # noqa: E402


class NewModel(torch.nn.Module):
    def forward(self, input_ids=None, cache=None, use_cache=None, **kwargs):
        return cache


class OldModel(torch.nn.Module):
    def forward(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        return past_key_values


@pytest.mark.parametrize("model, keyword", [(NewModel(), "cache"), (OldModel(), "past_key_values")])
def test_the_cache_goes_under_the_keyword_the_forward_names(model, keyword):
    marker = object()
    assert cache_keyword(model) == keyword
    assert model(**with_cache(model, marker)) is marker


def test_the_core_never_passes_a_cache_under_a_deprecated_keyword():
    model = tiny_model("llama")
    spec = {"name": "scalar-4", "keys": {"quantizer": {"method": "scalar", "bits": 4, "axis": "token", "group": 16}},
            "values": {"quantizer": {"method": "scalar", "bits": 4, "axis": "token", "group": 16}}}
    protocol = Protocol(context=8, continuation=6, chunk=4)
    ids = torch.randint(0, 100, (1, protocol.tokens), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        nll, scored = continuation_nll(model, ids, protocol, kvcompress.cache_for(model, spec))
    assert scored == 6 and nll > 0
