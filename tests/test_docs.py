"""Docs that are generated must match what generates them."""

from __future__ import annotations

from pathlib import Path

from kvcompress import get_registry
from kvcompress.methods import STAGES
from kvcompress.spec_docs import render

ROOT = Path(__file__).parent.parent


def test_spec_reference_is_current():
    expected = render(get_registry())
    actual = (ROOT / "docs" / "specs.md").read_text()
    assert actual == expected, "docs/specs.md is stale: run `kvcompress schema --markdown --out docs/specs.md`"


def test_readme_gives_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_docs_name_every_stage_and_its_hook():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"(stages: {', '.join(STAGES)})" in readme
    architecture = (ROOT / "docs" / "architecture.md").read_text()
    guide = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    for stage in STAGES.values():
        assert f"| `{stage.hook}` | `{stage.descriptor.__name__}` |" in architecture
        assert f"| `{stage.hook}` | `{stage.descriptor.__name__}(" in guide


def test_the_module_table_in_architecture_md_matches_the_tree():
    import re

    architecture = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `((?:framework|kernels|plugins)/[^`]+\.py)` \|", architecture, flags=re.M))
    modules = {path.relative_to(ROOT) for top in ("framework", "kernels", "plugins") for path in (ROOT / top).rglob("*.py")}
    # a plugin package's __init__.py only names the package (the table says so once)
    tree = {
        str(path) for path in modules
        if "tests" not in path.parts and not (path.parts[0] == "plugins" and path.name == "__init__.py")
    }
    assert listed == tree, f"in the tree, not in the table: {sorted(tree - listed)}; in the table only: {sorted(listed - tree)}"
