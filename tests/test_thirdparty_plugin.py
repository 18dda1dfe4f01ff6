"""A third-party plugin written from docs/writing-a-plugin.md alone, pip-installed, works without core changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent / "thirdparty"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin pip-installed (a real wheel build) into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(PACKAGE)],
        check=True,
        cwd=build,
    )
    return target


def run(site: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=cwd)


def test_cli_lists_the_installed_plugin(site):
    result = run(site, "-m", "kvcompress.cli", "plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["distribution"]: row for row in json.loads(result.stdout)}
    assert rows["kvcompress-absmax"]["methods"] == {"pruner": ["keynorm"], "quantizer": ["absmax"]}
    assert rows["kvcompress-absmax"]["adapters"] == {"gpt-neox": ["gpt_neox"]}


def test_spec_using_the_plugin_validates_and_round_trips(site, tmp_path):
    spec = tmp_path / "absmax.yaml"
    spec.write_text("name: absmax-v\nkeys:\n  quantizer: {method: float}\nvalues:\n  quantizer: {method: absmax}\n")
    assert run(site, "-m", "kvcompress.cli", "validate", str(spec)).returncode == 0
    result = run(site, "-m", "kvcompress.cli", "roundtrip", "--json", str(spec))
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)[0]
    assert row["value_bits"] == pytest.approx(4 + 16 / 64)
    assert row["value_rel_error"] < 0.2


def test_the_plugin_passes_its_own_conformance_tests(site, tmp_path):
    # A copy, so the run sees the installed plugin the way its author's checkout would, not this repo's config.
    shutil.copytree(PACKAGE / "tests", tmp_path / "tests")
    result = run(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout


def test_without_the_plugin_the_spec_names_what_is_missing(tmp_path):
    spec = tmp_path / "absmax.yaml"
    spec.write_text("name: absmax-v\nkeys:\n  quantizer: {method: float}\nvalues:\n  quantizer: {method: absmax}\n")
    result = subprocess.run([sys.executable, "-m", "kvcompress.cli", "validate", str(spec)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "values.quantizer.method: unknown quantizer method 'absmax'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_conformance_error_bound_must_be_set_by_the_plugin():
    """A default bound would pass a method that stores nothing (its round-trip error is exactly 1)."""
    from kvcompress.testing import QuantizerConformance

    class Unset(QuantizerConformance):
        spec = {"method": "float", "dtype": "float16"}

    with pytest.raises(pytest.fail.Exception, match="Unset: set max_relative_error"):
        Unset().test_error_bound()
