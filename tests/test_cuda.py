"""The CUDA paths on a GPU: `flex` (and `flash` where flash-attn is installed) against the dense oracle,
forward and backward, and the modules on CUDA against the same modules on CPU.

Skipped where no CUDA device exists (CI has none); the dispatch rule itself is tested without a GPU in
tests/test_dispatch.py. Run on a GPU machine with `python -m pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oracle import oracle_attention
from windowed_attention import LocalTransformer, local_attention
from windowed_attention.ops import backends
from windowed_attention.ops.spec import WindowSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# flex's fp32 kernels may accumulate in another order (and tile with TF32 where allowed): a looser bound
# than the CPU backends', still far below any masking or indexing error (those are O(1)).
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-3), torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
       torch.float16: dict(atol=1e-2, rtol=1e-2)}


@st.composite
def problems(draw):
    causal = draw(st.booleans())
    w = draw(st.sampled_from([1, 3, 16, 64, 128]))
    look_backward = draw(st.integers(0, 2))
    look_forward = 0 if causal else draw(st.integers(0, 2))
    n = draw(st.integers(1, 4 * w + 7))
    heads, batch = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([16, 32, 64]))
    return dict(
        kwargs=dict(window_size=w, causal=causal, look_backward=look_backward, look_forward=look_forward,
                    exact_windowsize=draw(st.booleans()), shared_qk=draw(st.booleans())),
        shape=(batch, heads, n, d), mask=draw(st.sampled_from([None, 0.0, 0.5, 1.0])), bias=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _tensors(pb, dtype):
    g = torch.Generator().manual_seed(pb["seed"])
    batch, heads, n, d = pb["shape"]
    q, k, v = (torch.randn(batch, heads, n, d, generator=g).cuda().to(dtype) for _ in range(3))
    mask = None
    if pb["mask"] is not None:
        mask = (torch.rand(batch, n, generator=g) < pb["mask"]).cuda()
    bias = None
    if pb["bias"]:
        kw = pb["kwargs"]
        span = kw["look_backward"] + kw["look_forward"] + 1
        bias = torch.randn(heads, kw["window_size"], span * kw["window_size"], generator=g).cuda().to(dtype)
    return q, k, v, mask, bias


def _check(pb, dtype, backend, backward):
    q, k, v, mask, bias = _tensors(pb, dtype)
    leaves = [t for t in (q, k, v, bias) if t is not None]
    for t in leaves:
        t.requires_grad_(backward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = local_attention(q, k, v, mask=mask, attn_bias=bias, backend=backend, **pb["kwargs"])
    oracle_leaves = [t.detach().double().requires_grad_(backward) for t in leaves]
    oq, ok, ov, *ob = oracle_leaves
    ref = oracle_attention(oq, ok, ov, mask=mask, attn_bias=ob[0] if ob else None, **pb["kwargs"])
    assert out.dtype == dtype and out.is_cuda
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    if backward:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(pb["seed"] + 1)).cuda()
        (out * upstream.to(dtype)).sum().backward()
        (ref * upstream.double()).sum().backward()
        scale = max(1.0, max(b.grad.abs().max().item() for b in oracle_leaves))
        for name, a, b in zip(["q", "k", "v", "attn_bias"], leaves, oracle_leaves):
            assert a.grad is not None, f"no gradient for {name}"
            torch.testing.assert_close(a.grad.double() / scale, b.grad / scale, **TOL[dtype],
                                       msg=lambda m: f"grad of {name}: {m}")


@settings(max_examples=40)
@given(pb=problems(), backend=st.sampled_from(["auto", "flex"]))
def test_flex_float32_matches_oracle_forward_and_backward(pb, backend):
    _check(pb, torch.float32, backend, backward=True)


@settings(max_examples=20)
@given(pb=problems(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_flex_half_precision_forward_matches_oracle(pb, dtype):
    _check(pb, dtype, "flex", backward=False)


def test_auto_picks_a_cuda_backend():
    q = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    spec = WindowSpec(64, True, 1, 0, True)
    name = backends.choose(q.reshape(2, 256, 64), spec)
    assert name in ("flash", "flex")
    assert name == ("flash" if backends.availability()["flash"] else "flex")


@pytest.mark.skipif(not backends.availability().get("flash"), reason="flash-attn is not installed")
@pytest.mark.parametrize("causal,look_backward,look_forward", [(True, 1, 0), (True, 2, 0), (False, 1, 1)])
def test_flash_matches_oracle(causal, look_backward, look_forward):
    pb = dict(kwargs=dict(window_size=64, causal=causal, look_backward=look_backward, look_forward=look_forward,
                          exact_windowsize=True, shared_qk=False), shape=(2, 4, 300, 64), mask=None, bias=False, seed=3)
    _check(pb, torch.bfloat16, "flash", backward=True)


@pytest.mark.parametrize("options", [{}, dict(use_dynamic_pos_bias=True), dict(use_xpos=True, use_abs_pos_emb=False),
                                     dict(qk_rmsnorm=True, shared_qk=True)])
def test_transformer_on_cuda_matches_cpu(options):
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=50, max_seq_len=200, dim=32, depth=2, heads=2, dim_head=16,
                             local_attn_window_size=16, **options)
    x = torch.randint(0, 50, (2, 150))
    losses, grads = [], []
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        loss = model(x.to(device), return_loss=True)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.detach().cpu() for p in model.parameters()])
    assert abs(losses[0] - losses[1]) < 1e-4
    for cpu_grad, cuda_grad in zip(*grads):
        torch.testing.assert_close(cuda_grad, cpu_grad, atol=2e-4, rtol=2e-3)


def test_generation_on_cuda_cached_equals_uncached():
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=50, max_seq_len=200, dim=32, depth=2, heads=2, dim_head=16,
                             local_attn_window_size=8).cuda().eval()
    prime = torch.randint(0, 50, (2, 20), device="cuda")
    cached = model.generate(prime, 40, temperature=0.0)
    uncached = model.generate(prime, 40, temperature=0.0, use_kv_cache=False)
    assert cached.is_cuda
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_grouped_query_attention_matches_oracle_with_repeated_heads(causal):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 300, 32, generator=g).cuda().requires_grad_()
    k, v = (torch.randn(2, 2, 300, 32, generator=g).cuda().requires_grad_() for _ in range(2))
    kwargs = dict(window_size=64, causal=causal, look_backward=1, look_forward=0 if causal else 1)
    out = local_attention(q, k, v, backend="flex", **kwargs)
    oq, ok, ov = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = oracle_attention(oq, ok.repeat_interleave(2, dim=1), ov.repeat_interleave(2, dim=1), **kwargs)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    upstream = torch.randn(out.shape, generator=g).cuda()
    (out * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    for a, b in zip((q, k, v), (oq, ok, ov)):
        torch.testing.assert_close(a.grad.double(), b.grad, **TOL[torch.float32])
