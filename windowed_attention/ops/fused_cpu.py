"""Local attention in our own fused CPU kernel (backend "fused"): float32, float64, bfloat16 and float16,
with backward.

PyTorch's fused CPU attention kernels cost a whole `(w, span * w)` block per window whatever the mask, and
FlexAttention has no CPU backward. The kernel in `csrc/local_attention_cpu.cpp` works on blocks of 64
query rows and computes, per block, only the contiguous range of keys those rows can see, so causal and
exact windows skip their masked work; it keeps O(n d) memory (the log-sum-exp is saved, the weights are
recomputed in the backward) and computes every option of a call (`ops.call.ALL_FEATURES`): key padding
masks, `attn_bias` (with its gradient), `shared_qk`, xpos (`key_scale`, a constant), dropout (which weights
drop is a hash of a seed drawn from torch's generator and the (head, query, key) position, so the backward
recomputes them instead of storing a mask), block and token windows (the rule's `spec.bounds`), shorter
queries, softcap, learned sinks (with their gradient), packed documents (each as if alone, no work across
them) and sink tokens. Matmuls go to MKL, or to our own GEMMs: float32 on CPUs with AVX-512F or AVX2 and
FMA (`csrc/f32_gemm.h`), bfloat16 on CPUs with AVX512-BF16 but no AMX (`csrc/bf16_gemm.h`).

Outputs of 1 MB and more (the output and the q, k, v gradients) come from a pool inside the kernel that
keeps the memory of freed outputs for the next call, so long sequences do not pay fresh page faults
every step; idle memory is marked reclaimable (MADV_FREE), bounded by `$WINDOWED_ATTENTION_POOL_MB`
(`POOL_ENV`; default 1024, 0 turns the pool off, read once when the kernel loads), unmapped at the pool's
next use once no call has reused it for `$WINDOWED_ATTENTION_POOL_IDLE_S` seconds (`POOL_IDLE_ENV`; default
30) and returned at once by `release_memory()`.

The kernels are registered as `torch.library` custom ops (`torch.ops.windowed_attention.attention_forward`,
`attention_backward`, `rotate`; the hyper-connection ops live in `ops/hyper.py`) with fake implementations
and autograd formulas, so `torch.compile` (fullgraph) and `torch.export` trace through them. Double
backward through the attention raises. They are defined with `torch.library.Library` (see `custom_op`), so
that eager calls never import the compiler (`torch._dynamo`).

The source is compiled on first use (one line on stderr announces it; needs a C++20 compiler with OpenMP,
`c++` or `$CXX`) into `~/.cache/windowed_attention` (or `$WINDOWED_ATTENTION_CACHE`), and reused from
there (`ops/kernel_cache.py`: who may write the folder; a library is loaded only when its size, SHA-256 and
ELF layout agree with the record of its build, and a damaged or foreign one is rebuilt). Where it cannot be
built `available()` is False, `unavailable_reason()` says why, `auto` takes the `sdpa` backend and warns
once; `WINDOWED_ATTENTION_NO_FUSED=1` skips the build altogether (without a warning).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import kernel_cache
from .call import ALL_FEATURES, AttentionCall
from .dtypes import accumulation_dtype, autocast_inputs, without_autocast
from .reference import repeat_kv

CSRC = Path(__file__).parent / "csrc"
# the attention kernel, the rotary kernel the modules use on CPU (`positional.py`), the decode step
# (`ops/decode.py`), the hyper-connection stream mix (`ops/hyper.py`), the few-row projections
# (`ops/small_linear.py`) and the feed-forward's gate (`ops/geglu.py`), in one library
SOURCES = [CSRC / "local_attention_cpu.cpp", CSRC / "rotary_cpu.cpp", CSRC / "decode_cpu.cpp", CSRC / "hyper_cpu.cpp",
           CSRC / "small_linear_cpu.cpp", CSRC / "geglu_cpu.cpp", CSRC / "f32_gemm_avx2.cpp"]
# sources compiled without the instruction-set flags of the CPU torch targets: the AVX2 build of the GEMM, whose
# `#pragma GCC target("avx2,fma")` would otherwise add to AVX-512's sets (see the file)
OWN_ISA_SOURCES = {CSRC / "f32_gemm_avx2.cpp"}
HEADERS = sorted(CSRC.glob("*.h"))  # included by the sources: part of what the build's hash covers
DISABLE_ENV = "WINDOWED_ATTENTION_NO_FUSED"
CACHE_ENV = kernel_cache.CACHE_ENV
POOL_ENV = "WINDOWED_ATTENTION_POOL_MB"
POOL_IDLE_ENV = "WINDOWED_ATTENTION_POOL_IDLE_S"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

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


def _source_flags(source: Path, flags: list[str]) -> list[str]:
    """The flags one source is compiled with (each source's are part of the build's hash): `flags`, less the
    capability flags for the sources that set their own instruction set."""
    isa = set(_capability_flags())
    return [f for f in flags if source not in OWN_ISA_SOURCES or f not in isa]


def _build() -> object:
    """Compile the kernel once per (source, torch, flags) into the cache (`ops.kernel_cache`) and load it into
    torch.ops. A cached library is loaded only when `kernel_cache.flaw` finds nothing wrong with it; one that
    fails the check is rebuilt (RuntimeError naming it when that fails too), and so is a missing one."""
    compiler = os.environ.get("CXX", "c++")
    flags = [
        "-O3", "-std=c++20", "-fPIC", "-fopenmp", "-fvisibility=hidden",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *_capability_flags(),
    ]
    built_from = [torch.__version__, compiler, kernel_cache.RECORD_FORMAT,
                  *(f"{source.name}: {' '.join(_source_flags(source, flags))}" for source in SOURCES)]
    digest = hashlib.sha256(
        b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS)) + " ".join(built_from).encode()
    ).hexdigest()[:16]
    library = kernel_cache.open_cache() / f"local_attention_cpu_{digest}.so"
    flaw = kernel_cache.flaw(library)
    if flaw is not None:
        if flaw != kernel_cache.MISSING:
            print(f"windowed-attention: not loading {library}: {flaw}", file=sys.stderr, flush=True)
        try:
            _compile(compiler, flags, library)
        except (OSError, RuntimeError) as exc:
            if flaw == kernel_cache.MISSING:
                raise
            raise RuntimeError(f"the cached {library} is not loaded ({flaw}) and rebuilding it failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        flaw = kernel_cache.flaw(library)
        if flaw is not None:
            raise RuntimeError(f"the library just built, {library}, fails its check: {flaw}")
    torch.ops.load_library(str(library))
    _state["library"] = library
    return torch.ops.windowed_attention_cpu


def _compile(compiler: str, flags: list[str], library: Path) -> None:
    """Build `library` and its record: plain compiler calls (no ninja or setuptools needed), one per source in
    parallel, then the link. Both files are written under temporary names and renamed into place, so
    processes building at the same time (torchrun) never load a partial file."""
    torch_dir = Path(torch.__file__).parent
    partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")
    record = library.with_name(f"{kernel_cache.record_path(library).name}.{os.getpid()}.tmp")
    objects = [library.with_name(f"{library.stem}.{source.stem}.{os.getpid()}.o") for source in SOURCES]
    includes = ["-isystem", str(torch_dir / "include"),
                "-isystem", str(torch_dir / "include" / "torch" / "csrc" / "api" / "include")]
    print(f"windowed-attention: compiling the fused CPU kernel into {library} (once; about 60 s of compiler "
          "time)", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        # one compiler process per source, side by side, then the link
        jobs = [subprocess.Popen([compiler, *_source_flags(source, flags), *includes, "-c", str(source),
                                  "-o", str(obj)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for source, obj in zip(SOURCES, objects)]
        failed = [err for job in jobs for _, err in [job.communicate()] if job.returncode != 0]
        if failed:
            raise RuntimeError(f"{compiler} failed: {failed[0].strip()[-2000:]}")
        result = subprocess.run(
            [compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(partial), f"-L{torch_dir / 'lib'}",
             f"-Wl,-rpath,{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu"], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed to link: {result.stderr.strip()[-2000:]}")
        record.write_text(kernel_cache.record(partial.read_bytes()))
        os.replace(record, kernel_cache.record_path(library))
        os.replace(partial, library)
    finally:
        for path in (partial, record, *objects):
            path.unlink(missing_ok=True)
    _state["build_seconds"] = time.perf_counter() - started


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
    """Whether the kernel is built (or can be built now) in this environment. The first call that finds
    it cannot be built warns once with the reason (not when it is disabled by `$WINDOWED_ATTENTION_NO_FUSED`).

    Traced code (torch.compile, torch.export) takes its answer as a constant."""
    if "ops" in _state:
        return True
    try:
        kernel()
    except RuntimeError:
        if not _state.get("warned") and not _state["error"].startswith("disabled by"):
            _state["warned"] = True
            warnings.warn(f"windowed-attention: the fused CPU kernel is unavailable, falling back to the 'sdpa' "
                          f"backend ({_state['error']})", RuntimeWarning, stacklevel=2)
        return False
    return True


# torch.compiler.assume_constant_result(available), without importing dynamo (0.7 s) when the package loads
available._dynamo_marked_constant = True


def unavailable_reason() -> str | None:
    """Why the `fused` backend is unavailable here (None when it is available; tries the build once)."""
    try:
        kernel()
    except RuntimeError:
        return str(_state["error"])
    return None


def release_memory() -> None:
    """Unmap the output memory the kernel keeps for reuse (nothing to do when it is not loaded)."""
    if "ops" in _state:
        _state["ops"].release_memory()


def idle_bytes() -> int:
    """Bytes of freed outputs the kernel keeps for reuse (0 when it is not loaded)."""
    return int(_state["ops"].idle_bytes()) if "ops" in _state else 0


# What the kernel computes: every option of a call; `ops.backends` dispatches by it.
FEATURES = ALL_FEATURES


def takes_head_dims(head_dim: int, value_dim: int) -> bool:
    return True


# ---- the custom ops: what torch.compile and torch.export see -------------------------------------------
#
# `q (P, n_q, d)`, `k (P_kv, n, d)`, `v (P_kv, n, d_v)` contiguous (the queries are the last n_q positions);
# `bias (H, w, span * w)`, `keep (B, n)` 1/0, `key_scale (span, d)` and `sinks (h,)` in the accumulation
# dtype (float64 for float64 inputs, else float32) or None; `documents (B, n)` int64 ids or None; `seed` an
# int64 scalar tensor (dropout) or None. The window (`spec.bounds` as `left, right`, -1 for none; `causal`
# only for sink tokens, which a causal query sees up to itself) and options are plain ints, floats, bools
# (`softcap` 0.0: none).


# `torch.library.custom_op` wraps each kernel in `torch._disable_dynamo`, which imports dynamo (1 to 2 s)
# on the op's first eager call; `Library.define` + `impl` registers the same op without that wrapper.
LIBRARY = torch.library.Library("windowed_attention", "DEF")


def custom_op(name: str):
    """Decorator: register the annotated function as the CPU kernel of the functional op
    `windowed_attention::<name>` (schema inferred from its annotations, no argument mutated); it becomes
    the op (`OpOverload`), called as the function was. Add `torch.library.register_fake` and
    `torch.library.register_autograd` for torch.compile, torch.export and autograd."""

    def define(kernel):
        LIBRARY.define(name + torch.library.infer_schema(kernel, mutates_args=()))
        LIBRARY.impl(name, kernel, "CPU")
        return getattr(torch.ops.windowed_attention, name).default

    return define


@custom_op("attention_forward")
def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, keep: Tensor | None, key_scale: Tensor | None,
    seed: Tensor | None, documents: Tensor | None, sinks: Tensor | None, window_size: int, look_backward: int,
    look_forward: int, left: int, right: int, causal: bool, sink_tokens: int, softcap: float, scale: float,
    mask_self: bool, dropout_p: float,
) -> tuple[Tensor, Tensor]:
    """`(out (P, n_q, d_v) in q's dtype, lse (P, n_q) in the accumulation dtype)`."""
    return kernel().forward(q, k, v, bias, keep, key_scale, documents, sinks, window_size, look_backward,
                            look_forward, left, right, causal, sink_tokens, softcap, scale, mask_self, dropout_p,
                            0 if seed is None else int(seed))


@torch.library.register_fake(attention_forward)
def _(q, k, v, bias, keep, key_scale, seed, documents, sinks, *options):
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    return out, q.new_empty(q.shape[0], q.shape[1], dtype=accumulation_dtype(q.dtype))


@custom_op("attention_backward")
def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, bias: Tensor | None, keep: Tensor | None,
    key_scale: Tensor | None, seed: Tensor | None, documents: Tensor | None, sinks: Tensor | None, window_size: int,
    look_backward: int, look_forward: int, left: int, right: int, causal: bool, sink_tokens: int, softcap: float,
    scale: float, mask_self: bool, dropout_p: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(dq in q's dtype, dk, dv, dbias, dsinks in the accumulation dtype)`; `dbias`, `dsinks` are empty `(0,)`
    without bias, sinks."""
    return kernel().backward(grad_out, q, k, v, lse, bias, keep, key_scale, documents, sinks, window_size,
                             look_backward, look_forward, left, right, causal, sink_tokens, softcap, scale,
                             mask_self, dropout_p, 0 if seed is None else int(seed))


@torch.library.register_fake(attention_backward)
def _(grad_out, q, k, v, lse, bias, keep, key_scale, seed, documents, sinks, *options):
    acc = accumulation_dtype(q.dtype)
    dbias = q.new_empty(0, dtype=acc) if bias is None else torch.empty_like(bias, memory_format=torch.contiguous_format)
    dsinks = q.new_empty(0, dtype=acc) if sinks is None else torch.empty_like(sinks, memory_format=torch.contiguous_format)
    return torch.empty_like(q), k.new_empty(k.shape, dtype=acc), v.new_empty(v.shape, dtype=acc), dbias, dsinks


def _attention_setup(ctx, inputs, output):
    q, k, v, bias, keep, key_scale, seed, documents, sinks, *options = inputs
    # not out: the backward needs no output
    ctx.save_for_backward(q, k, v, output[1], bias, keep, key_scale, seed, documents, sinks)
    ctx.options = options
    ctx.mark_non_differentiable(output[1])


def _attention_grad(ctx, grad_out, _grad_lse):
    q, k, v, lse, bias, keep, key_scale, seed, documents, sinks = ctx.saved_tensors
    dq, dk, dv, dbias, dsinks = attention_backward(grad_out, q, k, v, lse, bias, keep, key_scale, seed, documents,
                                                   sinks, *ctx.options)
    dbias = dbias if ctx.needs_input_grad[3] else None
    dsinks = dsinks if ctx.needs_input_grad[8] else None
    return dq, dk.to(k.dtype), dv.to(v.dtype), dbias, None, None, None, None, dsinks, *(None,) * len(ctx.options)


def no_double_backward(kernel: str, instead: str):
    """The autograd formula of a backward op whose kernel has no derivative: it raises, naming `instead`."""

    def refuse(ctx, *grads):
        raise RuntimeError(
            f"double backward (a gradient of a gradient, create_graph=True) is not implemented by the {kernel}; "
            f"{instead}"
        )

    return refuse


torch.library.register_autograd(attention_forward, _attention_grad, setup_context=_attention_setup)
torch.library.register_autograd(attention_backward, no_double_backward(
    "fused CPU kernel", "use local_attention(..., backend='reference') for higher-order derivatives"))


@custom_op("rotate")
def rotate_op(x: Tensor, c: Tensor, s: Tensor, transpose: bool) -> Tensor:
    """`x (P, n, d)` rotated by the tables `c, s (n, d / 2)` (their transpose with `transpose`), contiguous."""
    return kernel().rotate(x, c, s, transpose)


@torch.library.register_fake(rotate_op)
def _(x, c, s, transpose):
    return x.new_empty(x.shape)


def _rotate_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])
    ctx.transpose = inputs[3]


def _rotate_grad(ctx, grad):
    c, s = ctx.saved_tensors
    return rotate_op(grad, c, s, not ctx.transpose), None, None, None  # linear: its own double backward


torch.library.register_autograd(rotate_op, _rotate_grad, setup_context=_rotate_setup)


def rotate(x: Tensor, c: Tensor, s: Tensor) -> Tensor:
    """Rotate `x (P, n, d)` by the rotation tables `c, s (n, d / 2)` in one pass of the kernel (see
    `positional.apply_rotation`); differentiable in `x`."""
    return rotate_op(x, c, s, False)


def fused_cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """Same contract as `reference_attention`: `q (P, n_q, d)`, `k (P_kv, n, d)`, `v (P_kv, n, d_v)` ->
    `(P, n_q, d_v)`.

    Under CPU autocast, float32 inputs compute in the autocast dtype (as every matmul does there).
    """
    device_type = q.device.type
    q, k, v = autocast_inputs(q, k, v, takes=DTYPES) if device_type == "cpu" else (q, k, v)
    if device_type != "cpu" or q.dtype not in DTYPES:
        raise ValueError(
            "backend 'fused' supports float32/float64/bfloat16/float16 CPU tensors; use backend='auto' or 'reference'"
        )
    call.require("fused", FEATURES)
    # the seed comes from torch's default generator, so torch.manual_seed makes dropout reproducible; a
    # tensor, so that traced code draws it at run time
    seed = torch.randint(0, 2**62, (), device=q.device) if call.dropout_p > 0.0 else None
    acc = accumulation_dtype(q.dtype)
    with without_autocast(device_type):
        documents = call.documents
        if documents is not None and (q.shape[0] // documents.shape[0]) % (q.shape[0] // k.shape[0]):
            # query rows sharing a key row lie in different rows of documents: give each its own key row
            # (the kernel's backward owns a key row per task)
            k, v = repeat_kv(k, q.shape[0]), repeat_kv(v, q.shape[0])
        q, k, v = (_dense(t, q.dtype) for t in (q, k, v))
        keep = None if call.mask is None else _dense(call.mask, acc)
        bias = None if call.attn_bias is None else _dense(call.attn_bias, acc)
        key_scale = None if call.key_scale is None else _dense(call.key_scale.detach(), acc)
        documents = None if documents is None else _dense(documents, torch.int64)
        sinks = None if call.sinks is None else _dense(call.sinks, acc)
        if _needs_op(q, k, v, bias, sinks):  # traced code calls `_options` itself (dynamo skips caches, warning)
            options = _options.__wrapped__(call.spec, call.scale, call.mask_self, call.dropout_p)
            out, _ = attention_forward(q, k, v, bias, keep, key_scale, seed, documents, sinks, *options)
        else:  # the kernel itself: what the op would call, without its dispatch and autograd wrapper
            options = _options(call.spec, call.scale, call.mask_self, call.dropout_p)
            out, _ = (_state.get("ops") or kernel()).forward(q, k, v, bias, keep, key_scale, documents, sinks,
                                                             *options, 0 if seed is None else int(seed))
        return out


def plain_options(call: AttentionCall) -> tuple:
    """The arguments after `q, k, v` of `plain_forward` for `call`, a call with no mask, bias, key scale,
    documents, sinks, shared-qk rule or dropout (`ops.backends.plain_route`)."""
    return _options(call.spec, call.scale, False, 0.0)[:9]


def plain_forward(q: Tensor, k: Tensor, v: Tensor, options: tuple) -> Tensor | None:
    """The kernel's forward in one call for a plain call (`plain_options`) that autograd does not record, eager,
    without autocast: `q (..., n_q, d)`, `k (..., n, d)`, `v (..., n, d_v)`, plain CPU tensors of one dtype of
    `DTYPES`, packed and unpacked as `ops.api.pack_leading` does -> `(..., n_q, d_v)`; the same result as the
    backend's. None when `k` or `v` holds a non-finite entry (checked in the kernel, entry by entry): the
    caller then takes the exact route of `ops.finite`. Saves the Python packing, finiteness sums and dispatch
    of a small call (issue #22)."""
    return _state["ops"].forward_plain(q, k, v, *options)


def _dense(t: Tensor, dtype: torch.dtype) -> Tensor:
    """`t` in `dtype` and contiguous (itself when it already is: no dispatch for the common case)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


@functools.lru_cache(maxsize=256)
def _options(spec, scale: float, mask_self: bool, dropout_p: float) -> tuple:
    """The kernel's plain arguments after the tensors: the window (`spec.bounds` as `left, right`, -1 for none),
    `causal` (for sink tokens), sink tokens, softcap (0.0: none), scale, the shared-qk rule, dropout."""
    left, right = spec.flash_bounds
    return (spec.window_size, spec.look_backward, spec.look_forward, left, right, spec.causal, spec.sink_tokens,
            float(spec.softcap or 0.0), float(scale), bool(mask_self), float(dropout_p))


def _needs_op(*tensors: Tensor | None) -> bool:
    """Whether a forward must go through the registered op: in traced code, when autograd records it, or for
    a tensor that is not a plain `torch.Tensor` (a subclass or mode may dispatch it). Otherwise the op would
    only call `kernel().forward`, after about 15 us of dispatch, a third of a small call."""
    if torch.compiler.is_compiling():
        return True
    grad = torch.is_grad_enabled()
    return any(t is not None and (type(t) is not Tensor or (grad and t.requires_grad)) for t in tensors)
