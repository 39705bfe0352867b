"""Parity with local-attention where it is right, and each of its known defects pinned as our deviation.

Every deviation test shows both sides: local-attention disagrees with the dense oracle (so the test
would notice if it were fixed upstream or if we copied the defect) and we agree with it.
"""

from __future__ import annotations

import pytest
import torch

la = pytest.importorskip("local_attention")
from oracle import oracle_attention  # noqa: E402

from windowed_attention import (  # noqa: E402
    DynamicPositionBias,
    FeedForward,
    LocalAttention,
    LocalMHA,
    LocalTransformer,
    local_attention,
)

F64 = dict(dtype=torch.float64)


def qkv(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, **F64) for _ in range(3))


WINDOW_CONFIGS = [
    dict(causal=True, look_backward=1, look_forward=0, exact_windowsize=False),
    dict(causal=True, look_backward=2, look_forward=0, exact_windowsize=True),
    dict(causal=False, look_backward=1, look_forward=1, exact_windowsize=False),
    dict(causal=False, look_backward=2, look_forward=1, exact_windowsize=True),
    dict(causal=False, look_backward=0, look_forward=2, exact_windowsize=False),
]


@pytest.mark.parametrize("config", WINDOW_CONFIGS)
@pytest.mark.parametrize("shared_qk", [False, True])
def test_op_matches_local_attention_without_positions(config, shared_qk):
    q, k, v = qkv(2, 3, 48, 8)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 48, generator=g) > 0.3
    mask[:, 0] = True  # keep every row non-empty: local-attention averages over empty rows (tested below)
    theirs = la.LocalAttention(window_size=8, shared_qk=shared_qk, **config)(q, k, v, mask=mask)
    ours = local_attention(q, k, v, window_size=8, shared_qk=shared_qk, mask=mask, **config)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("config", WINDOW_CONFIGS)
def test_op_matches_local_attention_with_bias(config):
    q, k, v = qkv(2, 3, 32, 8)
    span = config["look_backward"] + config["look_forward"] + 1
    bias = torch.randn(3, 8, span * 8, **F64)
    theirs = la.LocalAttention(window_size=8, **config)(q, k, v, attn_bias=bias)
    ours = local_attention(q, k, v, window_size=8, attn_bias=bias, **config)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("use_xpos", [False, True])
@pytest.mark.parametrize("exact", [False, True])
def test_rotary_matches_local_attention_when_causal(use_xpos, exact):
    q, k, v = qkv(2, 2, 64, 16)
    kw = dict(window_size=8, causal=True, look_backward=1, exact_windowsize=exact, dim=16, use_xpos=use_xpos)
    theirs = la.LocalAttention(**kw).double()(q, k, v)
    ours = LocalAttention(**kw)(q, k, v)
    # local-attention computes rotary angles in float32 (ours in float64): agreement to ~1e-7.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_local_mha_matches_local_attention():
    torch.manual_seed(0)
    kw = dict(dim=32, window_size=8, dim_head=16, heads=2, causal=True, prenorm=True, qk_rmsnorm=True,
              gate_values_per_head=True)
    theirs = la.LocalMHA(**kw)
    ours = LocalMHA(**kw)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 40, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_transformer_loads_and_matches_local_attention_single_stream():
    torch.manual_seed(0)
    kw = dict(num_tokens=50, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16, local_attn_window_size=8)
    theirs = la.LocalTransformer(**kw, num_residual_streams=1)
    ours = LocalTransformer(**kw, num_residual_streams=1)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randint(0, 50, (2, 64))
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours(x, return_loss=True), theirs(x, return_loss=True), rtol=1e-5, atol=1e-5)


def test_feedforward_and_position_bias_match_local_attention():
    from local_attention.transformer import DynamicPositionBias as TheirBias
    from local_attention.transformer import FeedForward as TheirFF

    torch.manual_seed(0)
    theirs, ours = TheirFF(16, mult=4), FeedForward(16, mult=4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(ours(x), theirs(x))

    their_bias, our_bias = TheirBias(dim=8, heads=2), DynamicPositionBias(dim=8, heads=2)
    our_bias.load_state_dict(their_bias.state_dict())
    # Their layout (queries are the last window, keys behind them): equal wherever key <= query.
    a, b = their_bias(4, 8), our_bias(4, 8)
    past = torch.arange(4)[:, None] + 4 >= torch.arange(8)[None, :]
    torch.testing.assert_close(b[:, past], a[:, past])


# ---- deviations --------------------------------------------------------------------------------------


def test_deviation_rotary_with_look_forward_depends_on_true_distance():
    q, k, v = qkv(1, 2, 32, 8)
    kw = dict(window_size=8, causal=False, look_backward=1, look_forward=1)
    expected = oracle_attention(q, k, v, rotary=True, **kw)
    theirs = la.LocalAttention(dim=8, **kw).double()(q, k, v)
    ours = LocalAttention(dim=8, **kw)(q, k, v)
    assert (theirs - expected).abs().max() > 1e-2  # local-attention places queries at the last window
    torch.testing.assert_close(ours, expected)


def test_deviation_autopad_never_attends_to_padding():
    q, k, v = qkv(2, 21, 8)  # 21 = 2 windows of 8 + 5: autopad adds 3 padded keys
    kw = dict(window_size=8, causal=False, look_backward=1, look_forward=1)
    expected = oracle_attention(q, k, v, **kw)
    theirs = la.LocalAttention(autopad=True, **kw)(q, k, v)
    ours = LocalAttention(autopad=True, **kw)(q, k, v)
    assert (theirs - expected).abs().max() > 1e-2  # their zero-padded keys take part in the softmax
    torch.testing.assert_close(ours, expected)


def test_deviation_fully_masked_rows_are_zero():
    q, k, v = qkv(1, 16, 8)
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, :8] = False  # causal: queries 0..7 see nothing
    kw = dict(window_size=8, causal=True, look_backward=1)
    theirs = la.LocalAttention(**kw)(q, k, v, mask=mask)
    ours = local_attention(q, k, v, mask=mask, **kw)
    assert theirs[0, :8].abs().max() > 1e-3  # a uniform average over masked keys
    assert torch.equal(ours[0, :8], torch.zeros(8, 8, **F64))
    torch.testing.assert_close(ours, oracle_attention(q, k, v, mask=mask, **kw))


def test_deviation_local_mha_dropout_is_applied():
    torch.manual_seed(0)
    kw = dict(dim=32, window_size=8, dim_head=16, heads=2, causal=True, dropout=0.5)
    theirs, ours = la.LocalMHA(**kw).train(), LocalMHA(**kw).train()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 32, 32)
    assert torch.equal(theirs(x), theirs(x))  # their dropout is never used
    assert not torch.allclose(ours(x), ours(x))  # ours drops attention weights in training ...
    ours.eval()
    torch.testing.assert_close(ours(x), theirs.eval()(x), rtol=1e-4, atol=1e-5)  # ... and not in eval


def test_deviation_dynamic_position_bias_distances_for_any_look_around():
    torch.manual_seed(0)
    kw = dict(num_tokens=50, max_seq_len=64, dim=32, depth=1, heads=2, dim_head=16, local_attn_window_size=8,
              use_dynamic_pos_bias=True, causal=False, look_backward=1, look_forward=1)
    with pytest.raises(Exception):  # their bias is (w, 2w) while the scores are (w, 3w)
        la.LocalTransformer(**kw, num_residual_streams=1)(torch.randint(0, 50, (1, 32)))

    bias = DynamicPositionBias(dim=8, heads=2)
    b = bias(8, 24, offset=8)  # queries of the middle window, keys of windows -1, 0, +1
    distances = (torch.arange(8)[:, None] + 8) - torch.arange(24)[None, :]
    expected = bias.mlp(distances.float()[..., None]).permute(2, 0, 1)
    torch.testing.assert_close(b, expected)
    model = LocalTransformer(**kw)
    assert model(torch.randint(0, 50, (1, 32))).shape == (1, 32, 50)


def test_deviation_cached_decoding_does_not_drift():
    torch.manual_seed(0)
    kw = dict(num_tokens=64, max_seq_len=128, dim=32, depth=2, heads=2, dim_head=16, local_attn_window_size=8)
    theirs = la.LocalTransformer(**kw, num_residual_streams=1).eval()
    ours = LocalTransformer(**kw, num_residual_streams=1).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randint(0, 64, (1, 40))

    # Logits of position 30..39 decoded one by one from a cache, against the full forward.
    full_theirs, full_ours = theirs(x), ours(x)
    _, cache = theirs(x[:, :30], return_cache=True)
    _, our_cache = ours(x[:, :30], return_cache=True)
    their_err, our_err = [], []
    for t in range(30, 40):
        logits, cache = theirs(x[:, : t + 1], cache=cache, return_cache=True)
        their_err.append((logits[:, -1] - full_theirs[:, t]).abs().max().item())
        logits, our_cache = ours(x[:, t : t + 1], cache=our_cache, return_cache=True)
        our_err.append((logits[:, -1] - full_ours[:, t]).abs().max().item())
    assert their_err[0] < 1e-4 and max(their_err[1:]) > 1e-2  # drifts from the second cached token on
    assert max(our_err) < 1e-4


def test_deviation_cached_decoding_uses_qk_rmsnorm_scale():
    torch.manual_seed(0)
    kw = dict(num_tokens=64, max_seq_len=64, dim=32, depth=1, heads=2, dim_head=16, local_attn_window_size=8,
              qk_rmsnorm=True)
    theirs = la.LocalTransformer(**kw, num_residual_streams=1).eval()
    ours = LocalTransformer(**kw, num_residual_streams=1).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randint(0, 64, (1, 21))
    _, cache = theirs(x[:, :20], return_cache=True)
    their_step, _ = theirs(x, cache=cache, return_cache=True)
    _, our_cache = ours(x[:, :20], return_cache=True)
    our_step, _ = ours(x[:, 20:], cache=our_cache, return_cache=True)
    full = ours(x)[:, 20]
    assert (their_step[:, -1] - theirs(x)[:, 20]).abs().max() > 1e-2  # scale d ** -0.5 instead of qk_scale
    torch.testing.assert_close(our_step[:, -1], full, rtol=1e-4, atol=1e-5)


def test_deviation_top_k_keeps_at_least_one_token():
    from local_attention.transformer import top_k as their_top_k

    from windowed_attention.sampling import top_k

    logits = torch.randn(2, 10)
    assert torch.isinf(their_top_k(logits, thres=1.0)).all()  # nothing left to sample from
    kept = top_k(logits, thres=1.0)
    assert torch.equal(kept.argmax(-1), logits.argmax(-1)) and torch.isfinite(kept).sum() == 2
    wide = torch.randn(2, 256)
    torch.testing.assert_close(top_k(wide, 0.9), their_top_k(wide, 0.9))  # same count otherwise


# ---- local-attention 1.11's LocalTransformer: hyper-connections, global layers, the backbone ----------


class CausalGlobalAttention(torch.nn.Module):
    """A user's global layer for the tests: dense causal single-head attention on (b, n, dim)."""

    def __init__(self, dim):
        super().__init__()
        self.to_qkv = torch.nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, x):
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _perturb_streams(model, seed=0):
    """Move the hyper-connection weights off their initial values (dynamic parts start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in ("alpha", "beta", "gamma")):
                param.add_(0.3 * torch.randn(param.shape, generator=g))


@pytest.mark.parametrize("streams", [2, 4])
def test_hyper_connection_matches_the_hyper_connections_package(streams):
    from einops import rearrange
    from hyper_connections import get_init_and_expand_reduce_stream_functions

    from windowed_attention.residual import HyperConnection

    torch.manual_seed(0)
    init, expand, reduce = get_init_and_expand_reduce_stream_functions(streams)  # as local-attention calls it
    theirs = init(dim=16, branch=torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)))
    _perturb_streams(theirs)
    ours = HyperConnection(streams, dim=16, branch=torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    h = torch.randn(3, 7, streams, 16, requires_grad=True)  # ours: (b, n, s, d); theirs: ((b s), n, d)
    their_h = rearrange(h.detach(), "b n s d -> (b s) n d").requires_grad_(True)
    out, their_out = ours(h), rearrange(theirs(their_h), "(b s) n d -> b n s d", s=streams)
    torch.testing.assert_close(out, their_out)
    weights = torch.randn(out.shape)
    (out * weights).sum().backward()
    (their_out * weights).sum().backward()
    torch.testing.assert_close(h.grad, rearrange(their_h.grad, "(b s) n d -> b n s d", s=streams))
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, their_params[name].grad, msg=lambda m: f"{name}: {m}")


TRANSFORMER_OPTIONS = [
    dict(),  # local-attention's defaults: 4 residual streams
    dict(num_residual_streams=2, qk_rmsnorm=True, gate_values_per_head=True, look_backward=2),
    dict(use_dynamic_pos_bias=True),
    dict(use_xpos=True, exact_windowsize=False),
    dict(global_attn_layer=CausalGlobalAttention(32)),
    dict(global_attn_layer=CausalGlobalAttention(32), layers_insert_global_attn=(2,), num_residual_streams=1),
    dict(num_tokens=None),
    dict(num_tokens=None, global_attn_layer=torch.nn.Linear(32, 32), num_residual_streams=3),
]


@pytest.mark.parametrize("options", TRANSFORMER_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_transformer_loads_and_matches_local_attention(options):
    """State dicts of local-attention 1.11 models load with strict=True; logits (or backbone features),
    loss and every parameter's gradient agree."""
    torch.manual_seed(0)
    kw = {**dict(num_tokens=50, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16, local_attn_window_size=8),
          **options}
    # float64: local-attention computes rotary angles in float32 (ours in float64), ~1e-7 apart; its
    # DynamicPositionBias runs only in float32
    dtype = torch.float32 if kw.get("use_dynamic_pos_bias") else torch.float64
    tol = 1 if dtype == torch.float64 else 20
    theirs = la.LocalTransformer(**kw).to(dtype)
    _perturb_streams(theirs)
    ours = LocalTransformer(**kw).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    if kw["num_tokens"] is None:
        x = torch.randn(2, 64, 32, dtype=dtype)
        out, their_out = ours(x), theirs(x)
        weights = torch.randn(out.shape, dtype=dtype)
        loss, their_loss = (out * weights).mean(), (their_out * weights).mean()
    else:
        x = torch.randint(0, 50, (2, 64))
        out, their_out = ours(x), theirs(x)
        loss, their_loss = ours(x, return_loss=True), theirs(x, return_loss=True)
    torch.testing.assert_close(out, their_out, rtol=tol * 1e-5, atol=tol * 1e-5)
    torch.testing.assert_close(loss, their_loss, rtol=tol * 1e-6, atol=tol * 1e-6)
    loss.backward()
    their_loss.backward()
    their_params = dict(theirs.named_parameters())
    assert set(their_params) == {name for name, _ in ours.named_parameters()}
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, their_params[name].grad, rtol=tol * 1e-4, atol=tol * 1e-6,
                                   msg=lambda m: f"grad of {name}: {m}")
