"""Shared test settings: hypothesis profiles.

- `default`: random examples, no deadline (CPU timings vary too much for one).
- `ci`: the same budget, derandomized so CI runs are reproducible; chosen when `CI` is set.
- `thorough`: many more examples, for a local soak (`HYPOTHESIS_PROFILE=thorough`).
"""

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

# tests/oracle.py is imported as `oracle` by the test modules
sys.path.insert(0, str(Path(__file__).parent))

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("default", max_examples=60, **_common)
settings.register_profile("ci", max_examples=60, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=500, **_common)

_ci = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if _ci else "default"))
