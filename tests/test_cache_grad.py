"""Decoding with autograd, the memory a cache holds, and caches tied to the weights that built them (#28)."""

from __future__ import annotations

import copy

import pytest
import torch

from windowed_attention import DynamicPositionBias, LocalAttention, LocalMHA, LocalTransformer
from windowed_attention.ops import decode

MHA_OPTIONS = {
    "plain": dict(),
    "grouped, look-back 2": dict(kv_heads=1, look_backward=2),
    "xpos": dict(use_xpos=True),
    "shared qk": dict(shared_qk=True, exact_windowsize=False),
    "qk-rmsnorm, gates": dict(qk_rmsnorm=True, gate_values_per_head=True),
    "sink tokens": dict(sink_tokens=2),
    "learned sinks, softcap": dict(attn_sinks=True, softcap=3.0),
    "token window": dict(window_size=(5, 0)),
    "position bias": dict(use_rotary_pos_emb=False, bias=True),
    "window longer than the text": dict(window_size=50, look_backward=3, first_limit=2),
}


def _mha_and_bias(options, heads=2):
    options = dict(options)
    bias, first_limit = options.pop("bias", False), options.pop("first_limit", None)
    options.setdefault("window_size", 3)
    mha = LocalMHA(dim=12, dim_head=8, heads=heads, causal=True, prenorm=True, **options).double()
    with torch.no_grad():  # learned sinks start at zero: give them a gradient that is not trivially alike
        for name, p in mha.named_parameters():
            if name == "sinks":
                p.normal_()
    attn_bias = None
    if bias:
        w, back = mha.window_size, mha.attn_fn.look_backward
        attn_bias = DynamicPositionBias(dim=4, heads=heads).double()(w, (back + 1) * w, offset=back * w)
    return mha, attn_bias, first_limit


@pytest.mark.parametrize("name", MHA_OPTIONS)
def test_mha_decode_steps_backpropagate_as_the_full_forward(name, monkeypatch):
    """A loss over the prefill and every decode step (rows of different lengths, more steps than the ring
    holds) backpropagates in grad mode, and its gradients (parameters, inputs, position bias) equal those of
    the same loss over the full forward of each row."""
    torch.manual_seed(0)
    mha, attn_bias, first_limit = _mha_and_bias(MHA_OPTIONS[name])
    if first_limit:  # the window is cut to a bound that doubles as the text grows: the ring is re-laid in grad mode
        monkeypatch.setattr(decode, "FIRST_DECODE_LIMIT", first_limit)
    prefix, n, short = 4, 16, 2
    x = torch.randn(2, n, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, n, 12, dtype=torch.float64)
    mask = torch.arange(prefix) < torch.tensor([prefix, short])[:, None]

    out, cache = mha(x[:, :prefix], mask=mask, attn_bias=attn_bias, return_cache=True)
    cached = (out[0] * weights[0, :prefix]).sum() + (out[1, :short] * weights[1, :short]).sum()
    for t in range(prefix, n):
        step, cache = mha(x[:, t : t + 1], attn_bias=attn_bias, cache=cache, return_cache=True)
        cached = cached + (step[:, 0] * weights[:, t]).sum()

    # row 1 is its prompt's `short` positions followed by the decoded ones
    row1 = torch.cat((x[1, :short], x[1, prefix:]))[None]
    weights1 = torch.cat((weights[1, :short], weights[1, prefix:]))
    full = ((mha(x[:1], attn_bias=attn_bias)[0] * weights[0]).sum()
            + (mha(row1, attn_bias=attn_bias)[0] * weights1).sum())

    inputs = [x, *mha.parameters(), *([attn_bias] if attn_bias is not None else [])]
    for got, expected in zip(torch.autograd.grad(cached, inputs), torch.autograd.grad(full, inputs)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("options", [dict(), dict(use_dynamic_pos_bias=True, kv_heads=1),
                                     dict(use_xpos=True, num_residual_streams=1, qk_rmsnorm=True)])
def test_transformer_decode_steps_backpropagate_as_the_full_forward(options):
    """The model's cached steps in grad mode: a loss over the prefill's and the steps' logits has the
    gradients of the same loss over the full forward (hyper-connection streams, dynamic position bias
    computed once at the prefill and reused by every step, grouped-query attention, xpos)."""
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=11, max_seq_len=32, dim=16, depth=2, heads=2, dim_head=8,
                             local_attn_window_size=3, **options).double()
    tokens = torch.randint(0, 11, (2, 14))
    weights = torch.randn(2, 14, 11, dtype=torch.float64)
    logits, caches = model(tokens[:, :5], return_cache=True)
    cached = (logits * weights[:, :5]).sum()
    for t in range(5, 14):
        step, caches = model(tokens[:, t : t + 1], cache=caches, return_cache=True)
        cached = cached + (step * weights[:, t : t + 1]).sum()
    full = (model(tokens) * weights).sum()
    params = list(model.parameters())
    for got, expected in zip(torch.autograd.grad(cached, params), torch.autograd.grad(full, params)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_steps_without_grad_leave_an_earlier_steps_gradients_intact():
    """A step in grad mode, then steps under no_grad (the CPU kernel, which writes the ring in place), then
    the backward of the first step: its gradients are still those of the full forward."""
    torch.manual_seed(0)
    mha = LocalMHA(dim=12, dim_head=8, heads=2, window_size=3, causal=True).double()
    x = torch.randn(1, 12, 12, dtype=torch.float64)
    _, cache = mha(x[:, :5], return_cache=True)
    first, cache = mha(x[:, 5:6], cache=cache, return_cache=True)
    with torch.no_grad():
        for t in range(6, 12):
            _, cache = mha(x[:, t : t + 1], cache=cache, return_cache=True)
    params = list(mha.parameters())
    got = torch.autograd.grad(first.sum(), params)
    expected = torch.autograd.grad(mha(x[:, :6])[:, 5].sum(), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_a_cache_built_in_inference_mode_decodes_with_and_without_grad():
    """The README builds caches under `torch.inference_mode()`: such a cache continues under no_grad and in
    grad mode (its keys then are constants: the gradients equal those from a cache built under no_grad)."""
    torch.manual_seed(0)
    mha = LocalMHA(dim=12, dim_head=8, heads=2, window_size=3, causal=True, sink_tokens=1).double()
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    full = mha(x).detach()
    with torch.inference_mode():
        _, cache = mha(x[:, :5], return_cache=True)
    with torch.no_grad():
        step, cache = mha(x[:, 5:6], cache=cache, return_cache=True)
    torch.testing.assert_close(step[:, 0], full[:, 5], rtol=1e-9, atol=1e-10)
    with torch.inference_mode():
        _, inference_cache = mha(x[:, :7], return_cache=True)
    with torch.no_grad():
        _, plain_cache = mha(x[:, :7], return_cache=True)
    params = list(mha.parameters())
    grads = []
    for cache in (inference_cache, plain_cache):
        loss = 0
        for t in range(7, 10):
            step, cache = mha(x[:, t : t + 1], cache=cache, return_cache=True)
            torch.testing.assert_close(step[:, 0].detach(), full[:, t], rtol=1e-9, atol=1e-10)
            loss = loss + step.sum()
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _held(caches) -> tuple[int, int]:
    """What the caches keep alive: `(autograd nodes, bytes)`, the nodes of the graphs behind their tensors
    and the bytes of the distinct storages of their tensors and of every tensor those nodes saved."""
    storages, nodes, stack, saved = {}, set(), [], {}

    def add(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            if value.grad_fn is not None:
                stack.append(value.grad_fn)
        elif isinstance(value, (tuple, list)):
            for item in value:
                add(item)
        elif hasattr(value, "__dataclass_fields__"):  # the layer's decode constants
            add(list(vars(value).values()))

    add([list(vars(cache).values()) for cache in caches])
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        nodes.add(node)
        kind = type(node)
        if kind not in saved:
            saved[kind] = [name for name in dir(node) if name.startswith("_saved_")]
        for name in saved[kind]:
            add(getattr(node, name))
        stack.extend(following for following, _ in node.next_functions if following is not None)
    return len(nodes), sum(storages.values())


def test_memory_held_by_caches_is_flat_without_grad_and_after_each_detach():
    """Under no_grad the caches hold the same memory after 100 and after 2000 steps. In grad mode they hold
    every step's graph (that is what a loss over the steps backpropagates through): it grows step after
    step until `detach()` cuts it, and with a detach every 10 steps what they hold at the end of each chunk
    is the same."""
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=11, max_seq_len=8, dim=16, depth=1, heads=2, dim_head=8,
                             local_attn_window_size=4, use_abs_pos_emb=False, use_dynamic_pos_bias=True)
    tokens = torch.randint(0, 11, (2, 6))

    with torch.no_grad():
        _, caches = model(tokens, return_cache=True)
        held = {}
        for step in range(1, 2001):
            _, caches = model(tokens[:, step % 6 :][:, :1], cache=caches, return_cache=True)
            if step in (100, 2000):
                held[step] = _held(caches)
    assert held[100] == held[2000] and held[100][0] == 0

    def chunk_ends(detach: bool):
        _, caches = model(tokens, return_cache=True)
        ends = []
        for step in range(1, 51):
            _, caches = model(tokens[:, step % 6 :][:, :1], cache=caches, return_cache=True)
            if step % 10 == 0:
                ends.append(_held(caches))
                if detach:
                    caches = [cache.detach() for cache in caches]
                    assert _held(caches)[0] == 0
        return ends

    growing = chunk_ends(detach=False)
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(growing, growing[1:]))
    flat = chunk_ends(detach=True)
    assert flat[1] > (0, 0) and flat[1:] == flat[1:2] * 4  # (the first chunk's also held the prefill's graph)


def test_detached_caches_continue_after_an_optimizer_step():
    """Truncated backpropagation through time over cached decoding: steps in grad mode, backward, an
    optimizer step, `detach()`, and the caches continue (their keys as the old weights gave them, the
    position bias recomputed from the new weights, so it gets gradients from the later steps). Without
    detach, the same caches are refused."""
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=11, max_seq_len=64, dim=16, depth=2, heads=2, dim_head=8,
                             local_attn_window_size=4, use_dynamic_pos_bias=True).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, 11, (2, 40))
    _, caches = model(tokens[:, :6], return_cache=True)
    t = 6
    for chunk in range(3):
        loss = 0
        for _ in range(8):
            logits, caches = model(tokens[:, t : t + 1], cache=caches, return_cache=True)
            loss = loss + logits.logsumexp(-1).sum()
            t += 1
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.dynamic_pos_bias.parameters())
        before = [cache.k.detach().clone() for cache in caches]
        optimizer.step()
        with pytest.raises(ValueError, match="cache.*weights"):
            model(tokens[:, t : t + 1], cache=caches)
        caches = [cache.detach() for cache in caches]
        assert all(torch.equal(cache.k, k) for cache, k in zip(caches, before))
    with torch.inference_mode():  # and it goes on without grad
        logits, caches = model(tokens[:, t : t + 1], cache=caches, return_cache=True)
    assert logits.isfinite().all()


def test_after_detach_steps_get_the_gradients_of_constant_keys():
    """A step after `detach()` treats the cached keys as constants: its gradients equal those of a cache
    built under no_grad (the dynamic position bias, which the caches carried from a prefill without
    grad, recomputed with grad for the step autograd records)."""
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=11, max_seq_len=32, dim=16, depth=2, heads=2, dim_head=8,
                             local_attn_window_size=4, use_dynamic_pos_bias=True).double()
    tokens = torch.randint(0, 11, (2, 12))
    _, grad_caches = model(tokens[:, :8], return_cache=True)
    with torch.no_grad():
        _, plain_caches = model(tokens[:, :8], return_cache=True)
    params = list(model.parameters())
    grads = []
    for caches in ([cache.detach() for cache in grad_caches], plain_caches):
        loss = 0
        for t in range(8, 12):
            logits, caches = model(tokens[:, t : t + 1], cache=caches, return_cache=True)
            loss = loss + logits.logsumexp(-1).sum()
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    bias_params = {id(p) for p in model.dynamic_pos_bias.parameters()}
    for p, a, b in zip(params, *grads):
        if id(p) in bias_params:
            assert a is not None and a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_a_cache_refuses_changed_weights_and_other_modules():
    """A cache used after the parameters of the module that built it changed (an optimizer step,
    load_state_dict, an in-place write), or with another module of the same configuration, raises a
    ValueError saying so; `detach()` renews it for the weights as they are now. LocalAttention has no
    weights: its caches pass between instances."""
    torch.manual_seed(0)
    base = dict(dim=16, dim_head=8, heads=2, window_size=4, causal=True)
    mha = LocalMHA(**base)
    x = torch.randn(2, 7, 16)

    def prefill():
        return mha(x[:, :6], return_cache=True)[1]

    mha(x[:, 6:7], cache=prefill())  # unchanged: accepted
    cache = prefill()
    mha(x).sum().backward()
    torch.optim.SGD(mha.parameters(), lr=0.1).step()
    with pytest.raises(ValueError, match="cache was built from other weights"):
        mha(x[:, 6:7], cache=cache)
    mha(x[:, 6:7], cache=cache.detach())  # renewed for the weights as they are now
    cache = prefill()
    mha.load_state_dict(copy.deepcopy(mha.state_dict()))
    with pytest.raises(ValueError, match="other weights"):
        mha(x[:, 6:7], cache=cache)
    cache = prefill()
    with torch.no_grad():
        mha.to_qkv.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="other weights"):
        mha(x[:, 6:7], cache=cache)
    twin = LocalMHA(**base)
    twin.load_state_dict(mha.state_dict())
    with pytest.raises(ValueError, match="not built by this LocalMHA"):
        twin(x[:, 6:7], cache=prefill())
    cache = prefill()
    assert mha.to("cpu", torch.float32) is mha
    mha(x[:, 6:7], cache=cache)  # .to() that changes nothing leaves the cache valid
    cache = prefill()
    with pytest.raises(ValueError, match="cache"):  # another dtype: the layer's signature says so
        mha.double()(x[:, 6:7].double(), cache=cache)
    mha.float()

    attn, other = (LocalAttention(window_size=4, causal=True, dim=8, autopad=True) for _ in range(2))
    q = torch.randn(1, 2, 7, 8)
    _, cache = attn(q[:, :, :6], q[:, :, :6], q[:, :, :6], return_cache=True)
    torch.testing.assert_close(other(q[:, :, 6:], q[:, :, 6:], q[:, :, 6:], cache=cache),
                               attn(q, q, q)[:, :, 6:], rtol=1e-5, atol=1e-6)


def test_transformer_caches_are_tied_to_every_parameter_of_the_model():
    """A LocalTransformer's caches depend on every layer below each attention: a change to any parameter
    (here the token embedding alone, outside every attention layer), another model, or one layer's cache
    from another model is refused."""
    torch.manual_seed(0)
    config = dict(num_tokens=11, max_seq_len=32, dim=16, depth=2, heads=2, dim_head=8, local_attn_window_size=4)
    model, other = LocalTransformer(**config), LocalTransformer(**config)
    other.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 11, (2, 7))

    @torch.inference_mode()
    def prefill(model):
        return model(tokens[:, :6], return_cache=True)[1]

    with torch.inference_mode():
        model(tokens[:, 6:], cache=prefill(model))  # unchanged: accepted
    with pytest.raises(ValueError, match="not built by this LocalTransformer"):
        model(tokens[:, 6:], cache=[prefill(other)[0], prefill(model)[1]])
    with pytest.raises(ValueError, match="not built by this LocalMHA"):
        model(tokens[:, 6:], cache=[prefill(model)[0], prefill(other)[1]])
    caches = prefill(model)
    with torch.no_grad():
        model.token_emb.weight.mul_(1.5)
    with pytest.raises(ValueError, match="other weights.*LocalTransformer"):
        model(tokens[:, 6:], cache=caches)
    with torch.inference_mode():
        model(tokens[:, 6:], cache=[cache.detach() for cache in caches])


def test_a_model_built_in_inference_mode_decodes():
    """Parameters that are inference tensors keep no version: such a model's caches are checked for the
    module only, and decoding works."""
    with torch.inference_mode():
        torch.manual_seed(0)
        model = LocalTransformer(num_tokens=11, max_seq_len=32, dim=16, depth=1, heads=2, dim_head=8,
                                 local_attn_window_size=4)
        tokens = torch.randint(0, 11, (1, 8))
        full = model(tokens)
        _, caches = model(tokens[:, :7], return_cache=True)
        step = model(tokens[:, 7:], cache=caches)
    torch.testing.assert_close(step[:, 0], full[:, 7], rtol=1e-5, atol=1e-5)
