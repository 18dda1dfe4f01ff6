"""Spec validation: the registry-built union, round trips, overrides, composition checks, error messages."""

from __future__ import annotations

import json
from typing import Literal

import pytest
import yaml
from pydantic import Field

from kvcompress import (
    CodebookMethod,
    EstimatorMethod,
    MethodSpec,
    QuantizerMethod,
    Registry,
    SpecError,
    hookimpl,
    load_spec,
    parse_spec,
)
from kvcompress.methods import STAGES
from kvcompress.spec import PipelineOverride, PipelineSpec, json_schema, parse_layer_selection


class SketchSpec(MethodSpec):
    method: Literal["sketch"] = "sketch"
    rows: int = Field(128, ge=1)


class SketchScoresSpec(MethodSpec):
    method: Literal["sketch-scores"] = "sketch-scores"


class LearnedSpec(MethodSpec):
    method: Literal["learned"] = "learned"
    size: Literal[16, 256] = 256


class TableSpec(MethodSpec):
    method: Literal["table"] = "table"
    path: str


class ToyMethods:
    @hookimpl
    def kvcompress_quantizers(self):
        return [
            QuantizerMethod(name="sketch", spec=SketchSpec, factory=None, roles=frozenset({"keys"})),
            QuantizerMethod(name="learned", spec=LearnedSpec, factory=None, needs_codebook=True),
        ]

    @hookimpl
    def kvcompress_estimators(self):
        return [EstimatorMethod(name="sketch-scores", spec=SketchScoresSpec, factory=None,
                                quantizers=frozenset({"sketch"}), roles=frozenset({"keys"}))]

    @hookimpl
    def kvcompress_codebooks(self):
        return [CodebookMethod(name="table", spec=TableSpec, factory=None, quantizers=frozenset({"learned"}))]


@pytest.fixture
def registry() -> Registry:
    registry = Registry(entry_points=False)
    registry.register(ToyMethods(), "toy")
    return registry


BASE = {
    "name": "toy",
    "window": 16,
    "keys": {"quantizer": {"method": "sketch", "rows": 64}, "estimator": {"method": "sketch-scores"}},
    "values": {"quantizer": {"method": "float"}},
}


def test_pipeline_fields_are_the_stages_in_order():
    """The pipeline models spell their fields out (for their docs and schema); they must be kvcompress.methods.STAGES,
    then the `center` switch."""
    assert tuple(PipelineSpec.model_fields) == (*STAGES, "center")
    assert tuple(PipelineOverride.model_fields) == (*STAGES, "center")


def test_valid_spec_dumps_back_to_the_same_content(registry):
    spec = parse_spec(BASE, registry=registry)
    assert spec.keys.quantizer.rows == 64
    assert spec.model_dump(mode="json", exclude_unset=True) == BASE
    full = spec.model_dump(mode="json")
    assert full["keys"]["quantizer"] == {"method": "sketch", "rows": 64}  # SerializeAsAny keeps plugin fields
    assert parse_spec(full, registry=registry) == spec


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_file_formats_by_extension(registry, tmp_path, suffix):
    path = tmp_path / f"toy{suffix}"
    if suffix == ".yaml":
        path.write_text(yaml.safe_dump(BASE))
    elif suffix == ".json":
        path.write_text(json.dumps(BASE))
    else:
        path.write_text(
            'name = "toy"\nwindow = 16\n[keys.quantizer]\nmethod = "sketch"\nrows = 64\n'
            '[keys.estimator]\nmethod = "sketch-scores"\n[values.quantizer]\nmethod = "float"\n'
        )
    spec = load_spec(path, registry=registry)
    assert spec.source == str(path)
    assert spec.model_dump(mode="json", exclude_unset=True) == BASE


def _problems(data, registry, source=None) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, source=source, registry=registry)
    return str(info.value)


def test_extra_field_names_path_given_and_allowed(registry):
    data = {**BASE, "keys": {**BASE["keys"], "quantizer": {"method": "sketch", "rowz": 3}}}
    message = _problems(data, registry, source="specs/toy.yaml")
    assert message == "specs/toy.yaml: keys.quantizer.rowz: unknown field (given 3); allowed fields: method, rows"


def test_wrong_value_names_allowed_values(registry):
    data = {**BASE, "values": {"quantizer": {"method": "learned", "size": 17}, "codebook": {"method": "table", "path": "x"}}}
    assert "values.quantizer.size: Input should be 16 or 256 (given 17)" in _problems(data, registry)


def test_unknown_method_names_the_package(registry):
    data = {**BASE, "values": {"quantizer": {"method": "rvq"}}}
    message = _problems(data, registry)
    assert "values.quantizer.method: unknown quantizer method 'rvq'" in message
    assert "pip install kvcompress-rvq" in message


def test_missing_required_and_top_level_extra(registry):
    message = _problems({"name": "x", "keys": BASE["keys"], "windw": 3}, registry)
    assert "values: required field is missing" in message
    assert "windw: unknown field" in message


def test_estimator_for_another_quantizer_is_rejected(registry):
    data = {**BASE, "keys": {"quantizer": {"method": "float"}, "estimator": {"method": "sketch-scores"}}}
    assert "keys.estimator: 'sketch-scores' reads only sketch state, but the quantizer is 'float'" in _problems(data, registry)


def test_role_the_quantizer_cannot_serve_is_rejected(registry):
    data = {**BASE, "values": {"quantizer": {"method": "sketch"}}}
    assert "values.quantizer: 'sketch' cannot quantize values; it supports keys" in _problems(data, registry)


def test_missing_codebook_is_rejected(registry):
    data = {**BASE, "values": {"quantizer": {"method": "learned"}}}
    assert "values.codebook: quantizer 'learned' needs a codebook stage" in _problems(data, registry)


def test_layer_overrides_resolve_per_layer(registry):
    data = {**BASE, "layers": {"0-1": {"keys": {"quantizer": {"method": "sketch", "rows": 256}}}, "3,5": {"window": 0}}}
    spec = parse_spec(data, registry=registry)
    assert [spec.layer(i).keys.quantizer.rows for i in range(4)] == [256, 256, 64, 64]
    assert spec.layer(0).keys.estimator.method == "sketch-scores"  # stages not overridden are kept
    assert [spec.layer(i).window for i in (2, 3, 5)] == [16, 0, 0]
    assert spec.model_dump(mode="json", exclude_unset=True) == data


def test_override_breaking_a_composition_is_rejected(registry):
    data = {**BASE, "layers": {"0": {"keys": {"quantizer": {"method": "float"}}}}}
    assert "layers.0.keys.estimator: 'sketch-scores' reads only sketch state" in _problems(data, registry)


def test_min_layers_covers_every_selection(registry):
    assert parse_spec(BASE, registry=registry).min_layers() == 1
    assert parse_spec({**BASE, "layers": {"0-1": {"window": 1}, "7": {"window": 2}}}, registry=registry).min_layers() == 8


def test_overlapping_layer_selections_are_rejected(registry):
    data = {**BASE, "layers": {"0-2": {"window": 1}, "2": {"window": 2}}}
    assert "layer 2 is selected by both '0-2' and '2'" in _problems(data, registry)


def test_layer_override_beyond_the_model_fails_when_built(registry):
    spec = parse_spec({**BASE, "layers": {"40": {"window": 1}}}, registry=registry)
    with pytest.raises(SpecError, match="selects layer 40, but the model has 30 layers"):
        spec.check_layers(30)


@pytest.mark.parametrize("key,expected", [("3", [3]), ("0-2", [0, 1, 2]), ("0, 4-5", [0, 4, 5])])
def test_layer_selection_syntax(key, expected):
    assert [i for span in parse_layer_selection(key) for i in span] == expected


def test_a_huge_layer_selection_costs_nothing_and_is_checked_against_the_model():
    data = {"name": "x", "keys": {"quantizer": {"method": "float"}}, "values": {"quantizer": {"method": "float"}},
            "layers": {"0-100000000": {"window": 4}, "100000001": {"window": 2}}}
    spec = parse_spec(data)
    assert spec.min_layers() == 100000002
    with pytest.raises(SpecError, match="layers.0-100000000: selects layer 30, but the model has 30 layers"):
        spec.check_layers(30)
    with pytest.raises(SpecError, match="layer 5 is selected by both '0-9' and '5'"):
        parse_spec({**data, "layers": {"0-9": {"window": 4}, "5": {"window": 2}}})


def test_hostile_spec_files_fail_fast_with_a_short_message(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    bomb.write_text("\n".join(lines) + "\nname: *a8\n")
    with pytest.raises(SpecError, match="more than 100000 values"):
        load_spec(bomb)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100 + "]" * 100)
    with pytest.raises(SpecError, match="nests deeper than 32"):
        load_spec(deep)
    big = tmp_path / "big.yaml"
    big.write_text("name: " + "x" * (1 << 20))
    with pytest.raises(SpecError, match="spec files are at most"):
        load_spec(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(latin)
    for name, text in (("dup.yaml", "name: a\nname: b\n"), ("dup.json", '{"name": "a", "name": "b"}')):
        (tmp_path / name).write_text(text)
        with pytest.raises(SpecError, match="the key 'name' appears twice"):
            load_spec(tmp_path / name)
    long_value = tmp_path / "long.yaml"
    long_value.write_text("name: x\nwindow: '" + "9" * 10000 + "'\nkeys: {quantizer: {method: float}}\nvalues: {quantizer: {method: float}}\n")
    with pytest.raises(SpecError) as info:
        load_spec(long_value)
    assert len(str(info.value)) < 400 and "..." in str(info.value)


@pytest.mark.parametrize("key", ["a", "3-", "5-2", ""])
def test_bad_layer_selection(key):
    with pytest.raises(ValueError):
        parse_layer_selection(key)


def test_unreadable_and_malformed_files(registry, tmp_path):
    with pytest.raises(SpecError, match="cannot read the spec file"):
        load_spec(tmp_path / "missing.yaml", registry=registry)
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad, registry=registry)
    with pytest.raises(SpecError, match="unknown spec file type '.txt'"):
        load_spec(tmp_path / "spec.txt", registry=registry)


def test_json_schema_contains_every_installed_method(registry):
    schema = json.dumps(json_schema(registry))
    for name in ("SketchSpec", "LearnedSpec", "TableSpec", "FloatSpec", "DecodeSpec"):
        assert name in schema


@pytest.mark.parametrize("field,value", [("window", "32"), ("window", True), ("window", 32.0)])
def test_numbers_are_not_converted_from_other_types(field, value):
    data = {"name": "strict", field: value, "keys": {"quantizer": {"method": "float"}}, "values": {"quantizer": {"method": "float"}}}
    with pytest.raises(SpecError, match=f"{field}: Input should be a valid integer"):
        parse_spec(data)


@pytest.mark.parametrize("value", ["32", 32.0, False])
def test_method_fields_are_strict_too(value):
    data = {"name": "strict", "keys": {"quantizer": {"method": "scalar", "bits": 2, "axis": "channel", "group": value}},
            "values": {"quantizer": {"method": "float"}}}
    with pytest.raises(SpecError, match="keys.quantizer.group"):
        parse_spec(data)


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_a_literal_choice(value):
    """pydantic matches Literal[1, 2, ...] by equality, so `bits: true` would be bits 1: MethodSpec refuses it."""
    data = {"name": "strict", "keys": {"quantizer": {"method": "scalar", "bits": value, "axis": "channel", "group": 32}},
            "values": {"quantizer": {"method": "float"}}}
    with pytest.raises(SpecError, match=f"keys.quantizer.bits: {value} is a boolean; this field takes one of 1, 2"):
        parse_spec(data)


def test_a_yaml_boolean_for_an_optional_choice_names_the_choices():
    """YAML reads `norm: true` as a boolean; the error lists the words the field takes."""
    data = {"name": "strict", "keys": {"quantizer": {"method": "scalar", "bits": 2, "grid": "lloyd-max", "norm": True}},
            "values": {"quantizer": {"method": "float"}}}
    with pytest.raises(SpecError, match="keys.quantizer.norm: True is a boolean; this field takes one of 'preserve', "
                       "'input', 'least-squares' or null"):
        parse_spec(data)


def test_a_spec_pickles_and_comes_back_validated_with_its_source():
    """multiprocessing and torch.save pickle specs; their class is built at run time from the installed methods."""
    import pickle

    spec = load_spec("specs/kivi-2.yaml")
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and back.source == "specs/kivi-2.yaml" and back.layer(3) == spec.layer(3)
