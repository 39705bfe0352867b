"""What gets imported when (#24, #27): `import windowed_attention` loads no torch (its names are imported
on first use), eager calls never load the compiler (`torch._dynamo`), and what only training, plotting or
an integration needs is an extra whose absence is one line naming it.

Each check runs in a fresh interpreter, where nothing has been imported yet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import windowed_attention

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
print(sorted(wa.__all__) == sorted(name for name in dir(wa) if name in wa.__all__))
from windowed_attention import LocalAttention, local_attention
print("torch" in sys.modules, LocalAttention.__module__, local_attention.__module__)
print(wa.LocalTransformer.__module__, wa.ops.local_attention is local_attention)
try:
    wa.no_such_name
except AttributeError as error:
    print(error)
""")
    assert out.splitlines() == [
        "False",
        "True",
        "True windowed_attention.attention windowed_attention.ops.api",
        "windowed_attention.transformer True",
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
