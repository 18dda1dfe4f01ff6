"""The rows of a results table: each runs the model with its own cache, the baseline's or a spec's."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from kvcompress.spec import CacheSpec

BASELINE = "baseline"


@dataclass
class Runner:
    """How one row of the results gets its cache: the baseline's DynamicCache or a spec's CompressedCache."""

    name: str
    spec: CacheSpec | None

    @contextmanager
    def session(self, model: Any) -> Iterator[Callable[[], Any]]:
        """The model set up for this row while the context lasts; yields a factory of fresh, empty caches.

        A spec's row patches the model with kvcompress's attention and restores it on exit, so the
        baseline always runs the model's own attention.
        """
        if self.spec is None:
            from transformers import DynamicCache

            yield lambda: DynamicCache(config=model.config)
            return
        import kvcompress

        with kvcompress.patch(model, self.spec) as patched:
            yield patched.cache


def check_runners(model: Any, runners: list[Runner]) -> None:
    """Build each runner's cache for this model once, so that what only the model reveals (layer overrides
    beyond its depth, a codebook file not yet calibrated, an unsupported architecture) fails before any
    measurement runs rather than after the baseline and the specs before it."""
    for runner in runners:
        with runner.session(model) as new_cache:
            new_cache()
