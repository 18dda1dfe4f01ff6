"""kvcompress.eval.plot (`kvcompress eval --plot`): the series are the JSON rows' figures, and the figure draws
exactly those series."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kvcompress.errors import KVCompressError
from kvcompress.eval import plot
from kvcompress.eval.runners import BASELINE

HEADER = {"model": "smollm2", "model_dtype": "float32"}
PPL_ROWS = [
    {"name": BASELINE, "bits_per_element": 32.0, "cache_bytes": 58_000_000, "ppl": 21.3},
    {"name": "kivi-4", "bits_per_element": 5.0, "cache_bytes": 12_000_000, "ppl": 21.4},
    {"name": "kivi-2", "bits_per_element": 3.0, "cache_bytes": 8_500_000, "ppl": 25.4},
]


def ruler_row(name: str, bits: float, nbytes: int, at_2048: float, at_4096: float) -> dict:
    return {"name": name, "bits_per_element": bits, "cache_bytes": nbytes,
            "average": {"2048": {"mean": at_2048, "std": 1.0}, "4096": {"mean": at_4096, "std": 2.0}}}


def test_ppl_series_are_the_rows_figures():
    data = plot.plot_data({**HEADER, "task": "ppl"}, PPL_ROWS)
    assert data.baseline == plot.Point(BASELINE, 32.0, 58_000_000, 21.3)
    assert [(p.name, p.bits, p.nbytes, p.quality) for p in data.specs] == [
        (r["name"], r["bits_per_element"], r["cache_bytes"], r["ppl"]) for r in PPL_ROWS[1:]
    ]
    assert "perplexity" in data.quality_label and data.title == "smollm2 (float32), ppl"


def test_ruler_series_take_the_average_at_the_longest_length_and_needle_the_accuracy():
    rows = [ruler_row(BASELINE, 32.0, 9_000, 70.0, 60.0), ruler_row("kivi-2", 3.0, 1_000, 50.0, 40.0)]
    data = plot.plot_data({**HEADER, "task": "ruler"}, rows)
    assert data.baseline.quality == 60.0 and data.specs[0].quality == 40.0 and "4096" in data.quality_label
    needle_rows = [{"name": BASELINE, "bits_per_element": 32.0, "cache_bytes": 10, "accuracy": 1.0},
                   {"name": "qjl", "bits_per_element": 3.8, "cache_bytes": 2, "accuracy": 5 / 9}]
    data = plot.plot_data({**HEADER, "task": "needle"}, needle_rows)
    assert data.specs[0].quality == pytest.approx(100 * 5 / 9) and data.baseline.quality == 100.0


def test_rows_without_a_baseline_are_refused():
    with pytest.raises(KVCompressError, match="no baseline row"):
        plot.plot_data({**HEADER, "task": "ppl"}, PPL_ROWS[1:])


def test_bad_plot_paths_and_a_missing_matplotlib_are_named(tmp_path, monkeypatch):
    with pytest.raises(KVCompressError, match=r"\.png or \.svg"):
        plot.check_plot_path(tmp_path / "plot.pdf")
    with pytest.raises(KVCompressError, match="existing directory"):
        plot.check_plot_path(tmp_path / "missing" / "plot.png")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(KVCompressError, match=r'needs matplotlib.*pip install -e "\.\[plot\]"'):
        plot.check_plot_path(tmp_path / "plot.png")


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_the_figure_draws_exactly_the_series(tmp_path, suffix):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip(f"needs matplotlib: {plot.INSTALL}")
    data = plot.plot_data({**HEADER, "task": "ppl"}, PPL_ROWS)
    fig = plot.figure(data)
    left, right = fig.axes
    for ax, x in ((left, lambda p: p.bits), (right, lambda p: p.nbytes / 1024)):
        star, specs = (c.get_offsets().tolist() for c in ax.collections)
        assert star == [[x(data.baseline), data.baseline.quality]]
        assert specs == [[x(p), p.quality] for p in data.specs]
        assert [t.get_text() for t in ax.texts] == [p.name for p in data.specs]
        assert ax.lines[0].get_ydata()[0] == data.baseline.quality  # the baseline's line
    out = Path(tmp_path / f"plot{suffix}")
    plot.save_plot(data, out)
    head = out.read_bytes()[:64]
    assert head.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in out.read_bytes()[:2000]
