"""The fast tier (`pytest -m "not slow"`, tests/conftest.py): a few cases of each parametrized test, and
every test function outside the slow list still runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_EXAMPLES, FAST_THREADS, SLOW_MODULES, SLOW_TESTS, _cap_examples, _fast_tier, fast_sample
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]


def test_fast_sample_of_two_is_the_first_and_last_and_zero_is_all():
    assert fast_sample(10, 2) == {0, 9} and fast_sample(1, 2) == {0} and fast_sample(5, 0) == set(range(5))


@pytest.mark.parametrize("count", range(0, 40))
def test_fast_sample_keeps_the_ends_and_spreads_evenly(count):
    kept = sorted(fast_sample(count, 3))
    assert len(kept) == min(count, 3)
    assert all(0 <= i < count for i in kept)
    if count:
        assert kept[0] == 0 and kept[-1] == count - 1
    if count > 3:  # gaps differ by at most one
        gaps = [b - a for a, b in zip(kept, kept[1:])]
        assert max(gaps) - min(gaps) <= 1


def test_the_fast_tier_caps_the_examples_a_test_asks_for_itself():
    """A test's own `@settings(max_examples=...)` wins over the loaded profile, so the fast tier lowers it on the
    test: at most `FAST_EXAMPLES` calls however many it asks for, and a test asking for fewer keeps its number."""
    calls = {"many": 0, "one": 0}

    @settings(max_examples=50, database=None)
    @given(st.integers())
    def many(x):
        calls["many"] += 1

    @settings(max_examples=1, database=None)
    @given(st.integers())
    def one(x):
        calls["one"] += 1

    for test in (many, one):
        _cap_examples(test)
        test()
    assert 1 <= calls["many"] <= FAST_EXAMPLES and calls["one"] == 1


def test_the_fast_tier_runs_torch_on_its_threads(request):
    import torch

    if _fast_tier(request.config) and FAST_THREADS > 0:
        assert torch.get_num_threads() == FAST_THREADS


def _collected(*args: str, **env: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "--collect-only", "-q", *args, "tests"],
                         cwd=ROOT, capture_output=True, text=True, check=True, env={**os.environ, **env}).stdout
    return {line.split("[")[0] for line in out.splitlines() if "::" in line}


def test_fast_tier_runs_every_test_function_outside_the_slow_list():
    """Sampling the cases loses no test function: the fast tier holds the same functions as the fast tier with
    every case (`FAST_CASES=0`), and those are all functions but the ones marked slow."""
    every_case = _collected("-m", "not slow", FAST_CASES="0")
    assert _collected("-m", "not slow") == every_case
    everything = _collected()
    assert {name for name in everything
            if Path(name.split("::")[0]).name not in SLOW_MODULES and name.split("::")[-1] not in SLOW_TESTS} >= every_case
