"""The kvcompress conformance suites on rvq state, with codebooks learned from Gaussian vectors."""

from __future__ import annotations

import pytest

import kvcompress_rvq.kernels
from kvcompress_rvq.testing import learned

from kvcompress.testing import EstimatorConformance, QuantizerConformance

KEYS = {"method": "rvq", "depth": 4, "codebook_size": 64, "group": 32, "layout": "strided"}
VALUES = {"method": "rvq", "depth": 4, "codebook_size": 64, "group": 32, "layout": "contiguous"}
ODD = {"method": "rvq", "depth": 3, "codebook_size": 32, "group": 8, "layout": "strided"}  # 5-bit codes


class TestRVQKeys(QuantizerConformance):
    spec = KEYS
    role = "keys"
    codebook = staticmethod(lambda ctx: learned(4, 64, 32, "strided"))
    max_relative_error = 0.75  # 4 x 6 bits per 32 Gaussian channels (0.75 bits each): measured 0.70


class TestRVQValues(QuantizerConformance):
    spec = VALUES
    role = "values"
    codebook = staticmethod(lambda ctx: learned(4, 64, 32, "contiguous"))
    max_relative_error = 0.75


class TestRVQOddCodeWidth(QuantizerConformance):
    # 8 groups x 3 levels x 5 bits = 120 bits = 15 bytes per token: codes straddle byte boundaries
    spec = ODD
    role = "keys"
    codebook = staticmethod(lambda ctx: learned(3, 32, 8, "strided"))
    max_relative_error = 0.45  # 1.875 bits per channel: measured 0.38


class SmallChunks:
    """Codes read 48 tokens at a time, so that every check crosses chunk bounds."""

    @pytest.fixture(autouse=True)
    def small_chunks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(kvcompress_rvq.kernels, "SCORE_CHUNK", 48)


class TestLUTScores(SmallChunks, EstimatorConformance):
    quantizer = KEYS
    estimator = {"method": "rvq-lut"}
    role = "keys"
    codebook = staticmethod(lambda ctx: learned(4, 64, 32, "strided"))


class TestLUTScoresOddWidth(SmallChunks, EstimatorConformance):
    quantizer = ODD
    estimator = {"method": "rvq-lut"}
    role = "keys"
    codebook = staticmethod(lambda ctx: learned(3, 32, 8, "strided"))


class TestLUTMix(SmallChunks, EstimatorConformance):
    quantizer = VALUES
    estimator = {"method": "rvq-lut"}
    role = "values"
    codebook = staticmethod(lambda ctx: learned(4, 64, 32, "contiguous"))
