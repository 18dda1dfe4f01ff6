"""Hostile and random spec documents: each is valid, or a SpecError whose problems name a field path (or the
file), never another exception, within a time bound. Structures are built from the spec's own field and method names, so most
documents get deep into validation before they fail."""

from __future__ import annotations

import json
from datetime import timedelta
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# The bound on any hostile input (5 s); a document takes milliseconds, so only a hang (an unbounded
# expansion, a quadratic validation) reaches it, not a busy machine. hypothesis re-runs an example that passes
# the deadline before failing, so a single stall does not flake.
BOUND = timedelta(seconds=5)

from kvcompress import SpecError, load_spec, parse_spec
from kvcompress.plugins import get_registry

FIELDS = ["name", "description", "window", "sinks", "compress_run", "keys", "values", "evict", "layers",
          "quantizer", "estimator", "transform", "pruner", "codebook", "method", "bits", "axis", "group", "grid",
          "norm", "dtype", "seed", "ratio", "keep", "budget", "every", "depth", "codebook_size", "layout", "path",
          "sketch_dim", "outliers", "0", "0-3", "1,5-7", "x"]


def methods() -> list[str]:
    registry = get_registry()
    return sorted({name for stage in ("quantizer", "estimator", "transform", "pruner", "codebook", "evict")
                   for name in registry.provided(stage)})


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["scalar", "token", "channel", "lloyd-max", "minmax", "preserve", "float32", "hadamard", ""]),
    st.text(max_size=12),
)


def documents(method_names: list[str]):
    leaf = st.one_of(scalars, st.sampled_from(method_names))
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.sampled_from(FIELDS), children, max_size=6),
        ),
        max_leaves=40,
    )


def check_problems(error: SpecError, from_file: bool = False) -> None:
    """Every problem says where: "field.path: what", or, for a file, the file (its encoding, its syntax, its
    top level); and stays short (bad values are cut to an excerpt)."""
    assert error.problems
    for problem in error.problems:
        assert len(problem) < 2000, problem
        assert ": " in problem or (from_file and error.source), problem


def check_file(content: bytes, suffix: str) -> None:
    """A spec file holding `content` loads, or is refused with a SpecError about the file or a field."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"spec{suffix}"
        path.write_bytes(content)
        try:
            load_spec(path)
        except SpecError as error:
            check_problems(error, from_file=True)


@settings(max_examples=300, deadline=BOUND, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_document_is_valid_or_a_spec_error(data):
    document = data.draw(st.dictionaries(st.sampled_from(FIELDS), documents(methods()), max_size=8))
    try:
        parse_spec(document)
    except SpecError as error:
        check_problems(error)


@settings(max_examples=150, deadline=BOUND, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.sampled_from([".yaml", ".json", ".toml"]))
def test_any_file_content_is_valid_or_a_spec_error(content, suffix):
    check_file(content, suffix)


@settings(max_examples=100, deadline=BOUND, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(["yaml", "json"]))
def test_structured_files_are_valid_or_a_spec_error(data, kind):
    document = data.draw(st.dictionaries(st.sampled_from(FIELDS), documents(methods()), max_size=8))
    text = yaml.safe_dump(document) if kind == "yaml" else json.dumps(document, allow_nan=True)
    check_file(text.encode(), f".{kind}")


def test_a_valid_document_is_reachable():
    """The strategy's vocabulary is enough to build a valid spec (the fuzz is not only about refusals)."""
    spec = parse_spec({"name": "x", "keys": {"quantizer": {"method": "float"}}, "values": {"quantizer": {"method": "float"}}})
    assert spec.name == "x" and "float" in methods()
