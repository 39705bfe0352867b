"""Local attention in our own fused CPU kernel (backend "fused"): float32, float64, bfloat16 and float16,
with backward.

PyTorch's fused CPU attention kernels cost a whole `(w, span * w)` block per window whatever the mask, and
FlexAttention has no CPU backward. The kernel in `csrc/local_attention_cpu.cpp` works on blocks of 64
query rows and computes, per block, only the contiguous range of keys those rows can see, so causal and
exact windows skip their masked work; it keeps O(n d) memory (the log-sum-exp is saved, the weights are
recomputed in the backward) and takes key padding masks, `attn_bias` (with its gradient), `shared_qk`,
xpos (`key_scale`, a constant) and dropout (which weights drop is a hash of a seed drawn from torch's
generator and the (head, query, key) position, so the backward recomputes them instead of storing a
mask). bfloat16 matmuls go to MKL, or to our own AVX512-BF16 GEMM (`csrc/bf16_gemm.h`) on CPUs that have
those instructions but no AMX.

Outputs of 32 MB and more (the output and the q, k, v gradients) come from a pool inside the kernel that
keeps the memory of freed outputs for the next call, so long sequences do not pay fresh page faults
every step; idle memory is marked reclaimable (MADV_FREE), bounded by `$WINDOWED_ATTENTION_POOL_MB`
(`POOL_ENV`; default 1024, 0 turns the pool off, read once when the kernel loads) and returned by
`release_memory()`.

The source is compiled on first use (about 10 s; needs a C++20 compiler with OpenMP, `c++` or `$CXX`) into
`~/.cache/windowed_attention` (or `$WINDOWED_ATTENTION_CACHE`) and reused from there. Where it cannot be
built `available()` is False and `auto` takes the `sdpa` backend; `WINDOWED_ATTENTION_NO_FUSED=1` skips
the build altogether.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
from pathlib import Path

import torch

from .dtypes import accumulation_dtype, autocast_inputs
from .spec import WindowSpec

CSRC = Path(__file__).parent / "csrc"
# the attention kernel, the rotary kernel the modules use on CPU (`positional.py`) and the decode step
# (`ops/decode.py`), in one library
SOURCES = [CSRC / "local_attention_cpu.cpp", CSRC / "rotary_cpu.cpp", CSRC / "decode_cpu.cpp"]
HEADERS = sorted(CSRC.glob("*.h"))  # included by the sources: part of what the build's hash covers
DISABLE_ENV = "WINDOWED_ATTENTION_NO_FUSED"
POOL_ENV = "WINDOWED_ATTENTION_POOL_MB"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, object] = {}


def _capability_flags() -> list[str]:
    """Compiler flags for the vector width torch itself uses on this CPU (at::vec picks its code by them)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
    if capability == "AVX2":
        return ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return []


def _cache_dir() -> Path:
    root = os.environ.get("WINDOWED_ATTENTION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "windowed_attention"
    )
    return Path(root)


def _build():
    """Compile the kernel once per (source, torch, flags) into the cache and load it into torch.ops.

    A plain compiler call (no ninja or setuptools needed); the library is written under a temporary name
    and renamed into place, so processes building at the same time (torchrun) never load a partial file.
    """
    torch_dir = Path(torch.__file__).parent
    compiler = os.environ.get("CXX", "c++")
    flags = [
        "-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-fvisibility=hidden",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *_capability_flags(),
    ]
    digest = hashlib.sha256(
        b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS)) + " ".join([torch.__version__, compiler, *flags]).encode()
    ).hexdigest()[:16]
    library = _cache_dir() / f"local_attention_cpu_{digest}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")
        command = [
            compiler, *flags, "-isystem", str(torch_dir / "include"),
            "-isystem", str(torch_dir / "include" / "torch" / "csrc" / "api" / "include"),
            *map(str, SOURCES), "-o", str(partial), f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}",
            "-lc10", "-ltorch_cpu",
        ]
        _log.info("compiling the fused CPU kernel into %s (once)", library)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(partial, library)
    torch.ops.load_library(str(library))
    return torch.ops.windowed_attention_cpu


def kernel():
    """The loaded kernel ops, building them once per process; raises RuntimeError when that is impossible."""
    with _lock:
        if "ops" not in _state and "error" not in _state:
            if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
                _state["error"] = f"disabled by {DISABLE_ENV}"
            else:
                try:
                    _state["ops"] = _build()
                except (OSError, RuntimeError) as exc:  # no compiler, no OpenMP, unsupported platform: fall back
                    _state["error"] = f"{type(exc).__name__}: {exc}".strip()
        if "ops" not in _state:
            raise RuntimeError(f"the fused CPU kernel is unavailable ({_state['error']})")
        return _state["ops"]


def available() -> bool:
    """Whether the kernel is built (or can be built now) in this environment."""
    try:
        kernel()
    except RuntimeError:
        return False
    return True


def release_memory() -> None:
    """Unmap the output memory the kernel keeps for reuse (nothing to do when it is not loaded)."""
    if "ops" in _state:
        _state["ops"].release_memory()


def idle_bytes() -> int:
    """Bytes of freed outputs the kernel keeps for reuse (0 when it is not loaded)."""
    return int(_state["ops"].idle_bytes()) if "ops" in _state else 0


def supports(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this backend computes on this device and dtype (it takes every option)."""
    return device_type == "cpu" and dtype in DTYPES


class _FusedLocalAttention(torch.autograd.Function):
    """`q, k (P, n, d)`, `v (P, n, d_v)`, `bias (H, w, span * w)`, `keep (B, n)` 1/0 and `key_scale (span, d)`
    or None.

    `bias`, `keep` and `key_scale` are in the accumulation dtype (float64 for float64 inputs, else float32); the
    kernel returns k, v and bias gradients in it too.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, keep, key_scale, spec: WindowSpec, scale: float, mask_self: bool,
                dropout: tuple[float, int]):
        window = (spec.window_size, spec.look_backward, spec.look_forward, spec.causal, spec.exact_windowsize)
        out, lse = kernel().forward(q, k, v, bias, keep, key_scale, *window, scale, mask_self, *dropout)
        ctx.save_for_backward(q, k, v, lse, bias, keep, key_scale)  # not out: the backward needs no output
        ctx.options = (window, scale, mask_self, dropout)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, lse, bias, keep, key_scale = ctx.saved_tensors
        window, scale, mask_self, dropout = ctx.options
        dq, dk, dv, dbias = kernel().backward(grad_out, q, k, v, lse, bias, keep, key_scale, *window, scale,
                                              mask_self, *dropout)
        dbias = dbias if ctx.needs_input_grad[3] else None
        return dq, dk.to(k.dtype), dv.to(v.dtype), dbias, None, None, None, None, None, None


def fused_cpu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: WindowSpec,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    mask_self: bool = False,
    key_scale: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Same contract as `reference_attention`: `q, k (P, n, d)`, `v (P, n, d_v)` -> `(P, n, d_v)`.

    Under CPU autocast, float32 inputs compute in the autocast dtype (as every matmul does there).
    """
    device_type = q.device.type
    q, k, v = autocast_inputs(q, k, v, takes=DTYPES) if device_type == "cpu" else (q, k, v)
    if not supports(device_type, q.dtype):
        raise ValueError(
            "backend 'fused' supports float32/float64/bfloat16/float16 CPU tensors; use backend='auto' or 'reference'"
        )
    # the seed comes from torch's default generator, so torch.manual_seed makes dropout reproducible
    dropout = (float(dropout_p), int(torch.randint(0, 2**62, ())) if dropout_p > 0.0 else 0)
    acc = accumulation_dtype(q.dtype)
    with torch.autocast(device_type, enabled=False):
        q, k, v = (t.to(q.dtype).contiguous() for t in (q, k, v))
        keep = None if mask is None else mask.to(acc).contiguous()
        bias = None if attn_bias is None else attn_bias.to(acc).contiguous()
        key_scale = None if key_scale is None else key_scale.detach().to(acc).contiguous()
        return _FusedLocalAttention.apply(q, k, v, bias, keep, key_scale, spec, float(scale), bool(mask_self), dropout)
