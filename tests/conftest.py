"""Shared test settings: hypothesis profiles.

- `default`: random examples, no deadline (CPU timings vary too much for one).
- `ci`: the same budget, derandomized so CI runs are reproducible; chosen when `CI` is set.
- `thorough`: many more examples, for a local soak (`HYPOTHESIS_PROFILE=thorough`).
"""

import os
import sys
from pathlib import Path

import pytest
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

# The fast tier: `pytest -m "not slow"` leaves out what spawns processes, trains through the command
# line or compiles, runs the first and last case of each parametrized test (`FAST_CASES`), draws at most
# `FAST_EXAMPLES` hypothesis examples per test (a test's own `@settings(max_examples=...)` included) and runs torch
# on one thread (`FAST_THREADS`); it still runs every other test function of every module. The full suite (plain
# `pytest`) is CI's.
FAST_EXAMPLES = 3
settings.register_profile("fast", max_examples=FAST_EXAMPLES, **_common)

SLOW_MODULES = {"test_context_parallel.py", "test_distributed.py", "test_compile.py", "test_runs.py",
                "test_cuda.py", "test_checkpoint.py",
                "test_kernel_cache.py"}
SLOW_TESTS = {
    "test_fused_pool_can_be_turned_off", "test_the_console_script_gives_one_line",
    "test_console_entry_point_train_then_generate", "test_through_the_real_entry_point",
    "test_second_run_on_the_same_folder_is_refused_and_the_first_is_unharmed",
    "test_resume_from_another_working_directory", "test_closed_stdout_and_an_ascii_console_never_end_training",
    "test_bench_with_a_closed_stdout_saves_everything", "test_bench_never_replaces_earlier_results_and_removes_stale_plots",
    "test_generate_on_an_ascii_console", "test_a_new_run_refuses_a_folder_holding_a_checkpoint",
    "test_resume_refuses_metrics_of_another_run", "test_local_attention_test_file_passes_through_the_route",
    "test_helpers_refuse_what_local_attention_gets_wrong",
    "test_validation_survives_python_O", "test_modules_with_a_huge_window_run_in_little_memory",
    "test_traced_code_zeroes_what_the_mask_hides", "test_readers_during_saves_see_one_whole_checkpoint",
    "test_packed_context_parallel_training_logs_the_single_process_losses",
    "test_signals_during_start_up_are_one_line_and_leave_no_new_folder",
    "test_first_ctrl_c_says_so_and_saves_a_second_aborts_after_the_save",
    "test_hybrid_model_under_context_parallelism_equals_the_single_process",
    "test_backend_matches_the_oracle_or_refuses_by_name", "test_nonfinite_entries_reach_only_the_rows_that_see_them", "test_flex_runs_compiled_on_cpu_forward_only",
    "test_third_party_model_trains_and_generates_through_the_route",
    "test_fast_tier_runs_every_test_function_outside_the_slow_list",
    # each starts a Python that imports torch (about 2 s)
    "test_the_package_imports_its_names_on_first_use", "test_eager_calls_never_import_the_compiler",
    "test_train_without_its_extra_is_one_line_naming_it", "test_bench_without_its_extra_is_one_line_naming_it",
    "test_the_core_generates_without_any_extra", "test_importing_windowed_attention_installs_nothing",
    "test_missing_transformers_names_the_extra",
    # eager FlexAttention on CPU over many configurations (the block-mask builder's tile tests stay)
    "test_flex_with_masks_documents_sinks_and_short_queries_matches_the_reference",
    # the README's Python in a fresh interpreter (test_docs' link and quickstart checks stay)
    "test_readme_python_runs_as_written",
    # xpos at a million positions (test_attention_properties' float64 xpos test stays)
    "test_xpos_finite_at_a_million_positions_non_causal_autopad",
    "test_xpos_is_finite_and_window_relative_at_a_million_positions",
    # 2000 decoding steps (test_cache_grad's gradient tests and test_generation's rolling cache stay)
    "test_memory_held_by_caches_is_flat_without_grad_and_after_each_detach",
    # eager FlexAttention, about 1 s an example (test_robustness' eager flex tests and the tile tests stay)
    "test_flex_forward_matches_reference",
    # ragged prompts decoded several ways, about 1 s a case (test_generation's ragged sampling and bfloat16
    # cache tests, which compare rows with their prompts alone, and test_cache's cut-window test stay)
    "test_ragged_prompts_match_one_by_one", "test_ragged_prompts_with_a_window_longer_than_the_text",
}


# The fast tier runs torch on this many threads (0: torch's default). Its tensors are small, and a tiny parallel
# region on a busy machine waits for a core for each of its threads (ten times the time and more here when
# other work shares the two cores); the tests of thread counts set theirs themselves, and the full suite keeps
# torch's default.
FAST_THREADS = int(os.environ.get("FAST_THREADS", "1"))


def _fast_tier(config) -> bool:
    return "not slow" in (config.option.markexpr or "")


def _fast_examples(config) -> bool:
    """Whether this run draws the fast tier's few hypothesis examples (a chosen profile wins)."""
    return _fast_tier(config) and "HYPOTHESIS_PROFILE" not in os.environ


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the fast tier (`pytest -m 'not slow'`)")
    config.addinivalue_line("markers", "fast_cases(n): the fast tier runs n cases of this parametrized test "
                                       "(fewer than FAST_CASES; for tests whose every case is costly)")
    if _fast_examples(config):
        settings.load_profile("fast")
    if _fast_tier(config) and FAST_THREADS > 0:
        import torch

        torch.set_num_threads(FAST_THREADS)


# In the fast tier a parametrized test runs at most this many of its cases, spread evenly over its list (the
# first and last always); the full suite runs them all.
FAST_CASES = int(os.environ.get("FAST_CASES", "2"))  # 0: every case


def fast_sample(count: int, keep: int = FAST_CASES) -> set[int]:
    """Indices of the cases of one parametrized test the fast tier runs: `keep` of `count`, evenly spread."""
    if keep <= 0 or count <= keep:
        return set(range(count))
    if keep == 1:
        return {0}
    return {round(i * (count - 1) / (keep - 1)) for i in range(keep)}


def pytest_collection_modifyitems(config, items):
    import pytest

    cases: dict[tuple, list] = {}
    for item in items:
        if item.path.name in SLOW_MODULES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        elif getattr(item, "callspec", None) is not None:
            cases.setdefault((item.path, item.cls, item.originalname), []).append(item)
    for group in cases.values():
        fewer = group[0].get_closest_marker("fast_cases")
        kept = fast_sample(len(group), FAST_CASES if fewer is None or FAST_CASES <= 0 else min(FAST_CASES, fewer.args[0]))
        for index, item in enumerate(group):
            if index not in kept:
                item.add_marker(pytest.mark.slow)
    if _fast_examples(config):
        for item in items:
            _cap_examples(getattr(item, "obj", None))


def _cap_examples(test) -> None:
    """At most `FAST_EXAMPLES` examples for a hypothesis test, even one whose `@settings` asks for more: the
    loaded profile only sets the default, and a test's own `max_examples` (there for the full suite) wins over it.
    Hypothesis reads the settings from this attribute of the wrapped test on each call."""
    test = getattr(test, "__func__", test)
    own = getattr(test, "_hypothesis_internal_use_settings", None)
    if getattr(test, "is_hypothesis_test", False) and own is not None and own.max_examples > FAST_EXAMPLES:
        test._hypothesis_internal_use_settings = settings(own, max_examples=FAST_EXAMPLES)


@pytest.fixture
def count_calls(monkeypatch):
    """`count_calls(owner, name)` replaces `owner.name` with a wrapper that counts its calls and returns the
    list that grows by one entry per call (a kernel's entry point, to see that a path took it)."""

    def spy_on(owner, name: str) -> list:
        count, original = [], getattr(owner, name)

        def spy(*args, **kwargs):
            count.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
        return count

    return spy_on
