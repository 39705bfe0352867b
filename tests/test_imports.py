"""What gets imported when (#24, #27): `import windowed_attention` loads no torch (its names are imported
on first use), eager calls never load the compiler (`torch._dynamo`), and what only training, plotting or
an integration needs is an extra whose absence is one line naming it.

Each check runs in a fresh interpreter, where nothing has been imported yet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import windowed_attention
from windowed_attention.extras import MissingExtra, require

ROOT = Path(windowed_attention.__file__).resolve().parent.parent  # subprocesses run the code under test
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def fresh(code: str) -> str:
    """Run `code` in a new interpreter; its stdout (it must succeed)."""
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_package_imports_its_names_on_first_use():
    out = fresh("""
import sys
import windowed_attention as wa
print("torch" in sys.modules)
print(set(wa.__all__) <= set(dir(wa)))
from windowed_attention import LocalAttention, local_attention
print("torch" in sys.modules, LocalAttention.__module__, local_attention.__module__)
print(wa.LocalTransformer.__module__, wa.ops.local_attention is local_attention,
      all(callable(getattr(wa, name)) for name in wa.__all__))
try:
    wa.no_such_name
except AttributeError as error:
    print(error)
""")
    assert out.splitlines() == [
        "False",
        "True",
        "True windowed_attention.attention windowed_attention.ops.api",
        "windowed_attention.transformer True True",
        "module 'windowed_attention' has no attribute 'no_such_name'",
    ]


def test_eager_calls_never_import_the_compiler():
    """The first `local_attention` call (the fused CPU kernel where it builds), its backward, and a small
    transformer's forward and backward leave `torch._dynamo` unloaded: it costs seconds."""
    out = fresh("""
import sys
import torch
from windowed_attention import LocalTransformer, local_attention
from windowed_attention.ops import fused_cpu
q = torch.randn(1, 4, 128, 32, requires_grad=True)
local_attention(q, q, q, window_size=32, causal=True).sum().backward()
model = LocalTransformer(num_tokens=256, dim=32, depth=1, heads=2, dim_head=16, max_seq_len=64,
                         local_attn_window_size=16, num_residual_streams=2)
model(torch.randint(0, 256, (2, 64))).sum().backward()
print(fused_cpu.available(), "torch._dynamo" in sys.modules)
""")
    assert out.endswith(" False"), out


# the command line in a fresh interpreter where the packages named in argv[1] are not installed (an entry
# of None in sys.modules makes their import fail as a missing package's does)
WITHOUT = """
import sys
for name in filter(None, sys.argv[1].split(",")):
    sys.modules[name] = None
from windowed_attention.cli import main
sys.exit(main(sys.argv[2:]))
"""


def command_without(packages: list[str], *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT, ",".join(packages), *argv], env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("package", ["tqdm", "matplotlib"])
def test_train_without_its_extra_is_one_line_naming_it(tmp_path, package):
    """Checked before the run starts (not when loss.png is drawn at its end): no folder is left."""
    result = command_without([package], "train", "--out", str(tmp_path / "run"), "--steps", "1", "--no-progress")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("windowed-attention train: error: training")
    assert result.stderr.rstrip().endswith(f"needs {package}: pip install 'windowed-attention[train]'")
    assert not (tmp_path / "run").exists()


def test_bench_without_its_extra_is_one_line_naming_it(tmp_path):
    result = command_without(["matplotlib"], "bench", "--quick", "--out", str(tmp_path / "bench"))
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("windowed-attention bench: error: the benchmark's plots needs matplotlib: "
                             "pip install 'windowed-attention[bench]'\n")
    assert not (tmp_path / "bench").exists()


def test_the_core_generates_without_any_extra(tmp_path):
    """`generate` (and the whole command line's start) needs only torch, einops and safetensors."""
    from windowed_attention.training.config import ModelConfig
    from windowed_attention.training.runs import save_run

    config = ModelConfig(dim=16, depth=1, heads=2, dim_head=8, max_seq_len=16, local_attn_window_size=8)
    save_run(tmp_path / "run", config.build(), config)
    result = command_without(["tqdm", "matplotlib", "local_attention", "transformers"], "generate", "--checkpoint",
                             str(tmp_path / "run"), "--prime", "ab", "--length", "4", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ab") and result.stderr == ""


def test_require_names_the_extra_and_leaves_other_import_errors_alone(tmp_path, monkeypatch):
    with pytest.raises(MissingExtra) as missing:
        require("not_installed_here.sub", "bench", "plotting")
    assert str(missing.value) == "plotting needs not-installed-here: pip install 'windowed-attention[bench]'"
    assert isinstance(missing.value, ImportError) and missing.value.name == "not_installed_here"
    (tmp_path / "broken_package").mkdir()
    (tmp_path / "broken_package" / "__init__.py").write_text("import a_dependency_it_lacks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as broken:  # installed but broken: its own error, unchanged
        require("broken_package", "train", "training")
    assert not isinstance(broken.value, MissingExtra) and broken.value.name == "a_dependency_it_lacks"


def test_the_core_needs_three_packages_and_each_extra_brings_what_is_required_of_it():
    """pyproject.toml: the core is torch, einops, safetensors; every `require(package, extra, ...)` in the
    package names an extra that lists that package; `test` brings every extra (CI runs every test)."""
    import re

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.match(r"[A-Za-z0-9_.-]+(\[[^]]*\])?", r).group(0).lower().replace("_", "-") for r in requirements}

    extras = {extra: names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    assert names(project["dependencies"]) == {"torch", "einops", "safetensors"}
    calls = set()
    for path in (ROOT / "windowed_attention").rglob("*.py"):
        calls |= set(re.findall(r'require\("([\w.]+)", "(\w+)"', path.read_text()))
    assert {("tqdm", "train"), ("matplotlib", "train"), ("matplotlib", "bench")} <= calls
    for module, extra in calls:
        assert module.partition(".")[0].replace("_", "-") in extras[extra], (module, extra)
    assert extras["all"] == {"windowed-attention[train,bench,transformers]"}
    assert "windowed-attention[all]" in extras["test"]
