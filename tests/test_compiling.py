"""`compiling.inductor_options`: what every torch.compile of the library hands to inductor. Inductor's on-disk
cache keys a graph's generated C++ by its config but not by the vector width it was written for; the options
name that width, so that a cache filled at one width never hands its code to a process at another (the decode
step passes them: tests/test_compiled_decode.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from windowed_attention import compiling
from windowed_attention.compiling import inductor_options

_RUN = """
import torch
from windowed_attention.compiling import inductor_options

def f(x, y):
    return torch.sin(x) * y + torch.exp(x) * 0.5

x, y = torch.linspace(-1, 1, 45), torch.linspace(2, 3, 45)  # two 16-float vectors and a tail; five of 8
got = torch.compile(f, options=inductor_options())(x, y)
print(torch.backends.cpu.get_cpu_capability(), torch.allclose(got, f(x, y), rtol=1e-5, atol=1e-6))
"""


@pytest.mark.parametrize("machine, capability, bits", [
    ("x86_64", "AVX512", 512), ("x86_64", "AVX2", 256), ("x86_64", "DEFAULT", 0), ("AMD64", "AVX2", 256),
    # elsewhere inductor's own choice stands: DEFAULT is NEON to it on ARM without SVE, not scalar code
    ("aarch64", "DEFAULT", None), ("arm64", "DEFAULT", None), ("aarch64", "SVE256", None), ("ppc64le", "VSX", None),
])
def test_the_options_name_the_width_torch_runs_at(monkeypatch, machine, capability, bits):
    monkeypatch.setattr(compiling.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert inductor_options() == ({} if bits is None else {"cpp.simdlen": bits})


def test_a_torch_whose_options_cannot_take_the_width_gets_none(monkeypatch):
    """torch 2.5's compile options must have the type of the default (None for `cpp.simdlen`): an int
    there fails the compile, so such a torch gets no options (recognised by its config lacking `get_type`)."""
    import types

    import torch._inductor

    monkeypatch.setattr(compiling.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert inductor_options() == {"cpp.simdlen": 256}
    monkeypatch.setattr(torch._inductor, "config", types.SimpleNamespace(cpp=torch._inductor.config.cpp))
    assert inductor_options() == {}


@pytest.mark.slow  # two processes, each compiling a small graph
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="needs a CPU that runs AVX-512")
def test_a_cache_of_another_vector_width_is_not_reused(tmp_path):
    """One inductor cache directory, a graph compiled at AVX-512, then the same graph in a process whose torch
    runs at AVX2 (`ATEN_CPU_CAPABILITY=avx2`, as on an AVX2-only CPU): right there too. Without the width in
    the options the second process took the first one's AVX-512 code and computed wrong values (a decode step
    built so decoded wrong tokens)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    env.pop("ATEN_CPU_CAPABILITY", None)
    for capability in ("AVX512", "AVX2"):
        if capability == "AVX2":
            env["ATEN_CPU_CAPABILITY"] = "avx2"
        run = subprocess.run([sys.executable, "-c", _RUN], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split() == [capability, "True"], run.stderr[-2000:]
