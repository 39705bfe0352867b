"""Modules: shapes, training behaviour, positions at scale, and validation errors that name the argument."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import oracle_attention

from windowed_attention import (
    GEGLU,
    DynamicPositionBias,
    FeedForward,
    LocalAttention,
    LocalMHA,
    LocalTransformer,
    SinusoidalEmbeddings,
)
from windowed_attention.ops import fused_cpu, hyper
from windowed_attention.residual import HyperConnection


def small_model(**kwargs):
    options = dict(num_tokens=32, max_seq_len=64, dim=16, depth=2, heads=2, dim_head=8, local_attn_window_size=8)
    return LocalTransformer(**{**options, **kwargs})


def test_transformer_shapes_loss_and_ignore_index():
    torch.manual_seed(0)
    model = small_model()
    x = torch.randint(0, 32, (3, 40))
    assert model(x).shape == (3, 40, 32)
    loss = model(x, return_loss=True)
    logits = model(x[:, :-1])
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:])
    torch.testing.assert_close(loss, expected)

    ignored = small_model(ignore_index=0)
    ignored.load_state_dict(model.state_dict())
    y = x.clone()
    y[:, 20:] = 0
    logits = ignored(y[:, :-1])
    keep = y[:, 1:] != 0
    expected = torch.nn.functional.cross_entropy(logits[keep], y[:, 1:][keep])
    torch.testing.assert_close(ignored(y, return_loss=True), expected)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_transformer_attn_dropout_drops_attention_weights():
    torch.manual_seed(0)
    model = small_model(attn_dropout=0.5)
    x = torch.randint(0, 32, (2, 32))
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_transformer_without_abs_positions_runs_past_max_seq_len():
    model = small_model(use_abs_pos_emb=False, max_seq_len=16)
    assert model(torch.randint(0, 32, (1, 40))).shape == (1, 40, 32)
    with pytest.raises(ValueError, match="max_seq_len"):
        small_model(max_seq_len=16)(torch.randint(0, 32, (1, 40)))


def test_geglu_and_feedforward():
    x = torch.randn(2, 6)
    a, gate = x.chunk(2, dim=-1)
    torch.testing.assert_close(GEGLU()(x), a * torch.nn.functional.gelu(gate))
    ff = FeedForward(12, mult=2)
    assert ff(torch.randn(2, 3, 12)).shape == (2, 3, 12)
    assert ff[1].out_features == 2 * int(12 * 2 * 2 / 3)


def test_local_mha_with_mask_and_non_causal():
    torch.manual_seed(0)
    mha = LocalMHA(dim=16, dim_head=8, heads=2, window_size=4, causal=False, look_backward=1, look_forward=1)
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    out = mha(x, mask=mask)
    assert out.shape == (2, 10, 16)
    # Masked keys do not influence the other positions.
    x2 = x.clone()
    x2[1, 7:] = torch.randn(3, 16)
    torch.testing.assert_close(mha(x2, mask=mask)[1, :7], out[1, :7])


def test_xpos_is_finite_and_window_relative_at_a_million_positions():
    torch.manual_seed(0)
    n, w, d = 1_000_000, 64, 8
    attn = LocalAttention(window_size=w, causal=True, dim=d, use_xpos=True, autopad=True)
    q, k, v = (torch.randn(1, n, d) for _ in range(3))
    out = attn(q, k, v)
    assert torch.isfinite(out).all()
    # The last two windows only depend on their own neighbourhood: compare with the oracle there.
    start = n - 3 * w + (n % w)
    start -= start % w
    local = slice(start, n)
    expected = oracle_attention(*(t[:, local].double() for t in (q, k, v)), window_size=w, causal=True,
                                rotary=True, xpos_scale_base=w // 2)
    torch.testing.assert_close(out[:, start + w :].double(), expected[:, w:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: LocalAttention(window_size=0), "window_size"),
        (lambda: LocalAttention(window_size=2.5), "window_size"),
        (lambda: LocalAttention(window_size=4, look_backward=-1), "look_backward"),
        (lambda: LocalAttention(window_size=4, causal=True, look_forward=1), "look_forward"),
        (lambda: LocalAttention(window_size=4, dropout=1.0), "dropout"),
        (lambda: LocalAttention(window_size=4, scale=-1.0), "scale"),
        (lambda: LocalAttention(window_size=4, use_xpos=True), "use_xpos"),
        (lambda: LocalAttention(window_size=4, dim=8, use_xpos=True, xpos_scale_base=0), "xpos_scale_base"),
        (lambda: LocalMHA(dim=0, window_size=4), "dim"),
        (lambda: LocalMHA(dim=8, window_size=4, heads=0), "heads"),
        (lambda: LocalMHA(dim=8, window_size=4, qk_scale=0), "qk_scale"),
        (lambda: LocalMHA(dim=8, window_size=4, dropout=-0.1), "dropout"),
        (lambda: LocalMHA(dim=8, window_size=4, dim_head=3), "dim_head"),
        (lambda: FeedForward(8, mult=0), "mult"),
        (lambda: DynamicPositionBias(dim=0, heads=2), "dim"),
        (lambda: SinusoidalEmbeddings(7), "dim"),
        (lambda: SinusoidalEmbeddings(8, use_xpos=True), "scale_base"),
        (lambda: small_model(max_seq_len=0), "max_seq_len"),
        (lambda: small_model(num_tokens=0), "num_tokens"),
        (lambda: small_model(local_attn_window_size=0), "window_size"),
        (lambda: small_model(attn_dropout=2.0), "dropout"),
        (lambda: small_model(num_residual_streams=0), "num_residual_streams"),
            (lambda: small_model(layers_insert_global_attn=(0,)), "layers_insert_global_attn"),
            (lambda: small_model(global_attn_layer="x"), "global_attn_layer"),
            (lambda: small_model(kv_heads=3), "kv_heads"),
    ],
)
def test_constructor_errors_name_the_argument(build, name):
    with pytest.raises((ValueError, TypeError), match=name):
        build()


def test_forward_errors_name_the_argument():
    attn = LocalAttention(window_size=4, causal=True)
    q = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="window_size"):
        attn(q[:, :6], q[:, :6], q[:, :6])  # 6 is not a multiple of 4 without autopad
    with pytest.raises(ValueError, match="window_size"):
        attn(q, q, q, window_size=2)  # override only with xpos
    with pytest.raises(ValueError, match="input_mask"):
        attn(q, q, q, mask=torch.ones(2, 8, dtype=torch.bool), input_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        attn(q, q, q, input_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_bias"):
        attn(q, q, q, attn_bias=torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="dim"):
        LocalAttention(window_size=4, dim=6)(q, q, q)

    mha = LocalMHA(dim=8, window_size=4, heads=2, dim_head=4, causal=False)
    with pytest.raises(ValueError, match="cache"):
        mha(torch.randn(1, 4, 8), return_cache=True)
    with pytest.raises(ValueError, match="x must"):
        mha(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="scale"):
        LocalAttention(window_size=4, scale=float("inf"))

    model = small_model()
    with pytest.raises(TypeError, match="x"):
        model(torch.randn(1, 4))
    with pytest.raises(ValueError, match="num_tokens"):
        model(torch.full((1, 4), 99))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    prime = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prime, 3, temperature=float("inf"))
    with pytest.raises(TypeError, match="mask"):
        model.generate(prime, 3, mask=torch.ones(1, 2, dtype=torch.bool))
    # A tiny temperature samples (almost) greedily instead of overflowing.
    assert torch.equal(model.generate(prime, 3, temperature=1e-30), model.generate(prime, 3, temperature=0))


def test_validation_survives_python_O():
    script = textwrap.dedent(
        """
        import torch
        from windowed_attention import LocalAttention, LocalTransformer, local_attention
        checks = [
            lambda: LocalAttention(window_size=0),
            lambda: LocalAttention(window_size=4, causal=True, look_forward=1),
            lambda: LocalAttention(window_size=4)(torch.randn(1, 6, 4), torch.randn(1, 6, 4), torch.randn(1, 6, 4)),
            lambda: local_attention(torch.randn(1, 4, 2), torch.randn(1, 4, 2), torch.randn(1, 4, 2), window_size=-2),
            lambda: LocalTransformer(num_tokens=4, max_seq_len=4, dim=4, depth=1, heads=1, dim_head=4,
                                     local_attn_window_size=2)(torch.zeros(1, 9, dtype=torch.long)),
            lambda: LocalTransformer(num_tokens=4, max_seq_len=4, dim=4, depth=1, heads=1, dim_head=4,
                                     local_attn_window_size=2).generate(torch.zeros(1, 1, dtype=torch.long), 2,
                                                                        temperature=-1.0),
        ]
        for check in checks:
            try:
                check()
            except (ValueError, TypeError):
                continue
            raise SystemExit("no error raised")
        print("all raised")
        """
    )
    result = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "all raised" in result.stdout


# -- grouped-query attention, residual streams, global layers, the backbone ----------------------------


def test_grouped_query_mha_equals_full_mha_with_repeated_kv_projections():
    """kv_heads=h_kv: query head i uses kv head i // (heads // kv_heads), as a full model whose k, v
    projections repeat those heads."""
    torch.manual_seed(0)
    kw = dict(dim=24, dim_head=6, heads=4, window_size=5, causal=True, prenorm=True, qk_rmsnorm=True,
              gate_values_per_head=True)
    grouped, full = LocalMHA(kv_heads=2, **kw).double(), LocalMHA(**kw).double()
    state = grouped.state_dict()
    wq, wk, wv = state.pop("to_qkv.weight").split((24, 12, 12))
    repeat = lambda w: w.view(2, 6, 24).repeat_interleave(2, dim=0).reshape(24, 24)  # noqa: E731
    full.load_state_dict({**state, "to_qkv.weight": torch.cat((wq, repeat(wk), repeat(wv)))})
    assert grouped.to_qkv.weight.shape == (6 * (4 + 2 * 2), 24)
    x = torch.randn(2, 23, 24, dtype=torch.float64)
    torch.testing.assert_close(grouped(x), full(x), rtol=1e-10, atol=1e-10)


def test_global_layers_are_deep_copies_at_the_chosen_layers_wrapped_like_the_blocks():
    layer = torch.nn.Linear(16, 16)
    model = small_model(depth=3, global_attn_layer=layer, layers_insert_global_attn=(1, 3))
    present = [g is not None for g in model.global_layers]
    assert present == [True, False, True]
    copies = [model.global_layers[0].branch, model.global_layers[2].branch]
    assert all(c is not layer for c in copies) and copies[0].weight is not copies[1].weight
    assert {"static_alpha", "dynamic_alpha_fn"} <= {name for name, _ in model.global_layers[0].named_parameters()}
    assert len(small_model(depth=3, global_attn_layer=layer).global_layers) == 3  # default: every layer
    x = torch.randint(0, 32, (2, 20))
    with pytest.raises(ValueError, match="global_attn_layer"):
        model(x, return_cache=True)
    assert model(x).shape == (2, 20, 32)


def test_backbone_mode_maps_features_to_features():
    torch.manual_seed(0)
    model = small_model(num_tokens=None)
    assert model.token_emb is None and model.pos_emb is None and model.to_logits is None
    x = torch.randn(2, 30, 16)
    assert model(x).shape == (2, 30, 16)
    with pytest.raises(TypeError, match="num_tokens=None"):
        model(torch.zeros(2, 30, dtype=torch.long))
    with pytest.raises(ValueError, match="dim"):
        model(torch.randn(2, 30, 8))
    with pytest.raises(ValueError, match="num_tokens=None"):
        model(x, return_loss=True)
    with pytest.raises(ValueError, match="num_tokens=None"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 3)
    # cached decoding of features equals the full forward
    causal = small_model(num_tokens=None).double().eval()
    x = torch.randn(1, 25, 16, dtype=torch.float64)
    full = causal(x)
    out, cache = causal(x[:, :10], return_cache=True)
    for t in range(10, 25):
        step, cache = causal(x[:, t:t + 1], cache=cache, return_cache=True)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-9, atol=1e-9)


def test_checkpoints_of_one_stream_load_in_either_key_layout_and_stream_counts_must_match():
    torch.manual_seed(0)
    one = small_model(num_residual_streams=1)
    x = torch.randint(0, 32, (2, 20))
    # this package's checkpoints from before blocks were wrapped had no `.branch.` in their keys
    old = {key.replace(".branch.", "."): value for key, value in one.state_dict().items()}
    assert not any(".branch." in key for key in old)
    again = small_model(num_residual_streams=1)
    again.load_state_dict(old, strict=True)
    torch.testing.assert_close(again(x), one(x))
    with pytest.raises(ValueError, match="num_residual_streams=1"):
        small_model(num_residual_streams=4).load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match="num_residual_streams=4"):
        one.load_state_dict(small_model(num_residual_streams=4).state_dict())


def test_residual_streams_start_as_a_plain_residual_and_learn():
    """At initialisation the dynamic parts are zero: each block reads one stream and adds its output to
    every stream, so the model is a (scaled) plain residual; the stream weights get gradients."""
    torch.manual_seed(0)
    model = small_model(num_residual_streams=3)
    reads = [block.static_alpha[:, 0].argmax().item() for pair in model.layers for block in pair]
    assert reads == [0, 1, 2, 0]  # block b starts reading stream b % s
    model(torch.randint(0, 32, (2, 20)), return_loss=True).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.layers[0][0].dynamic_alpha_fn.grad.abs().sum() > 0


def test_hyper_connection_hand_written_backwards_pass_gradcheck():
    from windowed_attention.residual import HyperConnection, StreamNorm

    torch.manual_seed(0)
    block = HyperConnection(3, dim=6, branch=torch.nn.Linear(6, 6)).double()
    with torch.no_grad():
        for param in block.parameters():
            param.add_(0.3 * torch.randn_like(param))
    h = torch.randn(2, 4, 3, 6, dtype=torch.float64, requires_grad=True)
    params = [h, *block.parameters()]
    assert torch.autograd.gradcheck(lambda h, *_: block(h), params)
    # the folded norm is the module's plain formula
    norm = block.norm
    weights = torch.cat((block.dynamic_alpha_fn, block.dynamic_beta_fn[:, None]), dim=1)
    from windowed_attention.residual import _NormedProjection

    folded = _NormedProjection.apply(h.reshape(-1, 3, 6), weights * (norm.gamma + 1)[:, None], norm.scale)
    torch.testing.assert_close(folded, StreamNorm.forward(norm, h.reshape(-1, 3, 6)) @ weights)


@settings(max_examples=20, deadline=None)
@given(streams=st.integers(1, 5), dim=st.sampled_from([5, 16, 20, 67]), tokens=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_hyper_connection_kernel_equals_the_torch_formula(streams, dim, tokens, dtype, seed):
    """The CPU kernel's stream mix and write-back (`ops/hyper.py`) against the torch formula of
    `HyperConnection`, forward and every gradient (streams, gains, static and dynamic weights, scales), on
    random parameters, widths with and without a vector tail, and any number of tokens."""
    if not hyper.supports(torch.zeros(1, dtype=dtype)):
        pytest.skip("the fused CPU kernel is not built here")
    torch.manual_seed(seed)
    block = HyperConnection(streams, dim=dim, branch=torch.nn.Linear(dim, dim), stream=seed).to(dtype)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    h = torch.randn(tokens, 1, streams, dim, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, 1, streams, dim, dtype=dtype)
    results = []
    for kernel in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            if not kernel:
                patch.setattr(hyper, "supports", lambda *args: False)
            out = block(h)
            results.append((out, torch.autograd.grad(out, (h, *block.parameters()), grad)))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    for ours, reference in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(ours, reference, **tol)


def test_hyper_connection_kernel_runs_where_it_should():
    """The kernel takes float32/float64 CPU streams outside autocast (when built); bfloat16 and autocast keep
    the torch formula (whose matmuls autocast)."""
    h = torch.zeros(2, 3, 8)
    assert hyper.supports(h) == fused_cpu.available()
    assert not hyper.supports(h.bfloat16())
    assert not hyper.supports(h, torch.zeros(1, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not hyper.supports(h)


def test_mha_takes_autopad():
    """`LocalMHA(autopad=...)` reaches its attention: False refuses a length that is not a multiple of the
    window, True (the default) takes any; a non-bool names the argument."""
    x = torch.randn(1, 6, 8)
    assert LocalMHA(dim=8, window_size=4, autopad=True, heads=2, dim_head=4)(x).shape == x.shape
    with pytest.raises(ValueError, match="window_size"):
        LocalMHA(dim=8, window_size=4, autopad=False, heads=2, dim_head=4)(x)
    with pytest.raises(TypeError, match="autopad"):
        LocalMHA(dim=8, window_size=4, autopad="yes")
