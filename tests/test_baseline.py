"""Behaviour kept: small runs of three presets (every method of mnist1d plus cyclic SWA,
regression, graphs) give bit-for-bit the ``results.csv`` rows and ``metrics.jsonl`` curves
recorded before the laboratory refactor (issue 11) by ``tests/fixtures/make_baseline.py``."""
import importlib.util
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).with_name("fixtures")


@pytest.mark.slow
def test_results_unchanged_bit_for_bit():
    spec = importlib.util.spec_from_file_location("make_baseline", FIXTURES / "make_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = json.loads((FIXTURES / "baseline_results.json").read_text())
    got = module.results()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key]["results"] == expected[key]["results"], key
        assert got[key]["metrics"] == expected[key]["metrics"], key
