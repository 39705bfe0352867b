"""The fast tier (`pytest -m "not slow"`, tests/conftest.py): a few cases of each parametrized test, and
every test function outside the slow list still runs."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST_CASES, SLOW_MODULES, SLOW_TESTS, fast_sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("count", range(0, 40))
def test_fast_sample_keeps_the_ends_and_spreads_evenly(count):
    kept = sorted(fast_sample(count))
    assert len(kept) == min(count, FAST_CASES)
    assert all(0 <= i < count for i in kept)
    if count:
        assert kept[0] == 0 and kept[-1] == count - 1
    if count > FAST_CASES:  # gaps differ by at most one
        gaps = [b - a for a, b in zip(kept, kept[1:])]
        assert max(gaps) - min(gaps) <= 1


def _collected(*args: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "--collect-only", "-q", *args, "tests"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line.split("[")[0] for line in out.splitlines() if "::" in line}


def test_fast_tier_runs_every_test_function_outside_the_slow_list():
    everything, fast = _collected(), _collected("-m", "not slow")
    expected = {name for name in everything
                if Path(name.split("::")[0]).name not in SLOW_MODULES and name.split("::")[-1] not in SLOW_TESTS}
    assert fast == expected
