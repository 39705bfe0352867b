"""What issue #22 caches and skips per call is as correct as computing it afresh.

- `ops.api.PLANS`: the validation of a call's metadata, keyed on the tensors' type, shape, dtype and device and
  the other arguments' types and values. A hit gives what a fresh `_check` gives; changing any key field misses;
  what reads tensor values (document order, finiteness) runs every call.
- `backends._decided`: `decide` remembered.
- the fused backend's direct kernel call (no grad, eager) against the registered op.
- the fused kernel's plain entry (`backends.plain_route`, `plain_forward`: no optional tensors, no grad, no
  autocast) against the general path and the reference; it finds every non-finite entry of k and v.
- the fused kernel's work-based grain: small task lists run inline (one thread, BLAS too), big ones in parallel.
- flex block masks built from key ranges with key masks, documents, sink tokens and shorter queries folded in:
  never missing a tile `create_block_mask` finds, never calling a tile full that is not; a right-padded mask
  drops the padded tiles; the geometry-only mask is cached, a key mask's values never are.

Flex runs eagerly here (`_compiled_flex` patched; its compiled CPU forward is checked in test_backends).
"""

from __future__ import annotations

import random
import re
import warnings

import pytest
import torch

from windowed_attention import local_attention
from windowed_attention.ops import api, backends, flex, fused_cpu
from windowed_attention.ops.call import AttentionCall
from windowed_attention.ops.spec import WindowSpec


ARGUMENTS = ("window_size", "causal", "look_backward", "look_forward", "exact_windowsize", "mask", "attn_bias",
             "scale", "dropout_p", "shared_qk", "backend", "documents", "sinks", "sink_tokens", "softcap")
DEFAULTS = dict(causal=False, look_backward=1, look_forward=None, exact_windowsize=False, mask=None, attn_bias=None,
                scale=None, dropout_p=0.0, shared_qk=False, backend="auto", documents=None, sinks=None, sink_tokens=0,
                softcap=None)


def _key(q, k, v, **options):
    options = {**DEFAULTS, **options}
    return api._plan_key(q, k, v, *(options[name] for name in ARGUMENTS))


def _fresh(q, k, v, **options):
    options = {**DEFAULTS, **options}
    values = [options[name] for name in ARGUMENTS]
    values.insert(ARGUMENTS.index("documents"), None)  # group
    return api._check(q, k, v, *values)


def _draw_scores_options(rng: random.Random, options: dict) -> None:
    """Sink tokens, softcap and scale, each drawn with probability 0.3, into `options`."""
    if rng.random() < 0.3:
        options["sink_tokens"] = rng.randint(1, 3)
    if rng.random() < 0.3:
        options["softcap"] = rng.choice([5.0, 30])
    if rng.random() < 0.3:
        options["scale"] = rng.choice([0.5, 1])


def _random_call(rng: random.Random):
    """Random valid arguments of `local_attention` (small tensors)."""
    b, h, n, d = rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 40), rng.choice([4, 8])
    n_q = rng.randint(1, n)
    q, k, v = torch.randn(b, h, n_q, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    causal = rng.random() < 0.5
    options = dict(causal=causal)
    if rng.random() < 0.3:
        options["window_size"] = (rng.choice([-1, 0, 3]), 0 if causal else rng.choice([-1, 2]))
    else:
        options.update(window_size=rng.randint(1, 12), look_backward=rng.randint(0, 2),
                       exact_windowsize=rng.random() < 0.3)
        if not causal:
            options["look_forward"] = rng.randint(0, 2)
    if rng.random() < 0.5:
        options["mask"] = torch.rand(b, n) < 0.8
    if rng.random() < 0.3:
        options["documents"] = torch.sort(torch.randint(0, 3, (b, n)), dim=1).values
    if rng.random() < 0.3:
        options["sinks"] = torch.randn(h)
    _draw_scores_options(rng, options)
    options["shared_qk"] = rng.random() < 0.2
    return q, k, v, options


def test_a_cached_plan_is_the_fresh_one_and_gives_the_same_result():
    """On random calls: the plan `PLANS` holds after a call equals a fresh `_check`, and a call that hits the
    cache returns what the same call returns with the cache cleared."""
    rng = random.Random(0)
    for _ in range(40):
        q, k, v, options = _random_call(rng)
        api.PLANS.clear()
        fresh_out = local_attention(q, k, v, **options)
        key = _key(q, k, v, **options)
        assert key is not None and api.PLANS.misses == 1
        assert api.PLANS.entries[key] == _fresh(q, k, v, **options)
        cached_out = local_attention(q, k, v, **options)
        assert api.PLANS.hits == 1
        torch.testing.assert_close(cached_out, fresh_out, rtol=0, atol=0)


VARIATIONS = [  # (argument, a value of another type or value), each a different key from the base call's
    ("q", lambda q: q.double()), ("q", lambda q: q[..., :3, :]), ("q", lambda q: q.to("meta")),
    ("k", lambda k: k[:, :1]), ("v", lambda v: v[..., :2]),
    ("window_size", 5), ("window_size", 4.0), ("window_size", True), ("window_size", (4, 0)), ("window_size", [4, 0]),
    ("window_size", (4.0, 0)), ("causal", False), ("causal", 1), ("look_backward", 2), ("look_backward", True),
    ("look_forward", 0), ("exact_windowsize", True), ("exact_windowsize", 0), ("mask", torch.ones(2, 16, dtype=torch.bool)),
    ("mask", torch.ones(1, 16, dtype=torch.bool)), ("mask", torch.ones(2, 16)), ("attn_bias", torch.zeros(1, 4, 8)),
    ("scale", 0.5), ("scale", 1), ("scale", True), ("dropout_p", 0.1), ("dropout_p", 0), ("shared_qk", True),
    ("shared_qk", 0), ("backend", "reference"), ("documents", torch.zeros(2, 16, dtype=torch.long)),
    ("documents", torch.zeros(2, 16, dtype=torch.int32)), ("sinks", torch.zeros(3)), ("sink_tokens", 1),
    ("sink_tokens", False), ("softcap", 5.0), ("softcap", 5),
]


@pytest.mark.parametrize("argument,value", VARIATIONS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(VARIATIONS)])
def test_changing_any_key_field_misses(argument, value):
    """The base call and a call that differs in one argument (its value, its type, or a tensor's shape, dtype or
    device) have different keys; the second then gets its own fresh check (an error where it is wrong)."""
    q, k, v = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    base = dict(window_size=4, causal=True)
    tensors = {"q": q, "k": k, "v": v}
    changed = dict(base)
    if argument in tensors:
        tensors[argument] = value(tensors[argument])
    else:
        changed[argument] = value
    assert _key(q, k, v, **base) != _key(*tensors.values(), **changed)
    local_attention(q, k, v, **base)
    try:
        expected = _fresh(*tensors.values(), **changed)
    except (TypeError, ValueError) as error:
        with pytest.raises(type(error), match=re.escape(str(error))):
            local_attention(*tensors.values(), **changed)
        return
    local_attention(*tensors.values(), **changed) if tensors["q"].device.type != "meta" else None
    key = _key(*tensors.values(), **changed)
    if key in api.PLANS.entries:
        assert api.PLANS.entries[key] == expected


def test_the_key_never_holds_tensor_values_and_value_checks_run_on_a_hit():
    """A key holds no tensor (no values, nothing kept alive); document order and the availability of an
    explicit backend are checked on every call, hit or not."""
    q = torch.randn(1, 2, 8, 4)
    documents = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]])
    key = _key(q, q, q, window_size=4, documents=documents, mask=torch.ones(1, 8, dtype=torch.bool))

    def tensors_in(x):
        return isinstance(x, torch.Tensor) or (isinstance(x, tuple) and any(tensors_in(y) for y in x))

    assert not tensors_in(key)
    local_attention(q, q, q, window_size=4, documents=documents)
    with pytest.raises(ValueError, match="documents must be non-decreasing"):
        local_attention(q, q, q, window_size=4, documents=documents.flip(1))
    local_attention(q, q, q, window_size=4, backend="sdpa")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "_AVAILABLE", {**backends._AVAILABLE, "sdpa": False})
        with pytest.raises(ValueError, match="backend 'sdpa' is not available"):
            local_attention(q, q, q, window_size=4, backend="sdpa")


def test_an_unhashable_argument_is_not_cached_and_still_checked():
    q = torch.randn(1, 8, 4)
    assert api._plan_key([q], q, q, 4, *([None] * 14)) is None
    unhashable = api._plan_key(q, q, q, {}, *([None] * 14))
    api.PLANS.clear()
    for _ in range(2):
        with pytest.raises(TypeError, match="window_size"):
            local_attention(q, q, q, window_size={})
        with pytest.raises(TypeError, match="window_size"):
            local_attention(q, q, q, window_size=[{}, 0])
    assert api.PLANS.get(unhashable) is None and not api.PLANS.entries and api.PLANS.hits == 0


def test_the_plan_cache_is_least_recently_used():
    cache = api.PlanCache(size=2)
    cache.put(("a",), 1), cache.put(("b",), 2)
    assert cache.get(("a",)) == 1
    cache.put(("c",), 3)
    assert cache.get(("b",)) is None and cache.get(("a",)) == 1 and cache.get(("c",)) == 3
    cache.put(None, 4)
    assert cache.get(None) is None and len(cache.entries) == 2


def test_remembered_dispatch_decisions_are_decide():
    names = backends.names()
    rng = random.Random(1)
    from windowed_attention.ops.call import ALL_FEATURES

    for _ in range(200):
        device = rng.choice(["cpu", "cuda", "meta"])
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64])
        used = frozenset(f for f in ALL_FEATURES if rng.random() < 0.2)
        head_dim, value_dim = rng.choice([16, 64, 256, 320]), rng.choice([None, 32, 64])
        available = {name: rng.random() < 0.7 for name in names}
        assert backends._decided(device, dtype, used, head_dim, value_dim, tuple(available.items())) == \
            backends.decide(device, dtype, used, head_dim=head_dim, value_dim=value_dim, available=available)


@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built")
def test_fused_direct_kernel_call_equals_the_op_and_grads_still_flow():
    """Without grad the backend calls the kernel itself (`_needs_op` False); with grad, the op (autograd)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 70, 8) for _ in range(3))
    call = AttentionCall(WindowSpec(16, True, 1, 0, False), 0.3, mask=torch.rand(3, 70) < 0.9)
    assert not fused_cpu._needs_op(q, k, v, None, None)
    with torch.no_grad():
        direct = fused_cpu.fused_cpu_attention(q, k, v, call)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert fused_cpu._needs_op(*leaves, None, None)
    through_op = fused_cpu.fused_cpu_attention(*leaves, call)
    torch.testing.assert_close(direct, through_op.detach(), rtol=0, atol=0)
    from windowed_attention.ops.reference import reference_attention

    torch.testing.assert_close(direct, reference_attention(q, k, v, call), rtol=1e-5, atol=1e-5)
    through_op.sum().backward()
    assert all(t.grad is not None for t in leaves)


def _random_plain_call(rng: random.Random):
    """Random arguments of a plain call (`backends.plain_route`): any leading dims (none, grouped-query heads),
    shorter queries, token and block windows, sink tokens, softcap, scale, every dtype; q sometimes a strided
    view."""
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16])
    n, d, d_v = rng.randint(1, 150), rng.choice([4, 16]), rng.choice([4, 16, 24])
    n_q = rng.choice([n, rng.randint(1, n)])
    lead, lead_kv = rng.choice([((), ()), ((3,), (3,)), ((2, 4), (2, 2)), ((2, 3), (2, 1)), ((1, 2, 2), (1, 2, 2))])
    q = torch.randn(*lead, n_q, d, dtype=dtype)
    if rng.random() < 0.3:  # a transposed view: the entry packs a copy
        q = torch.randn(*lead, d, n_q, dtype=dtype).transpose(-1, -2)
    k, v = torch.randn(*lead_kv, n, d, dtype=dtype), torch.randn(*lead_kv, n, d_v, dtype=dtype)
    causal = rng.random() < 0.5
    options = dict(causal=causal)
    if rng.random() < 0.3:
        options["window_size"] = (rng.choice([-1, 0, 5, 70]), 0 if causal else rng.choice([-1, 2]))
    else:
        options.update(window_size=rng.choice([1, 7, 64, 128, 200]), look_backward=rng.randint(0, 2),
                       exact_windowsize=rng.random() < 0.3)
        if not causal:
            options["look_forward"] = rng.randint(0, 2)
    _draw_scores_options(rng, options)
    return q, k, v, options


@pytest.fixture
def plain_calls():
    """The tensors `backends.plain_forward` got, in order (None where it found a non-finite k or v)."""
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        entry = backends.plain_forward

        def spy(q, k, v, options):
            out = entry(q, k, v, options)
            calls.append(out)
            return out

        patch.setattr(backends, "plain_forward", spy)
        yield calls


@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built")
def test_plain_calls_take_the_kernels_entry_and_match_the_backend_and_the_reference(plain_calls):
    """On random plain calls without grad: the entry computes them (cache miss and hit) and returns exactly what
    the fused backend returns through the general path, within rounding of the reference; with grad the
    general path (the op, autograd) runs instead, and its gradients match the reference's."""
    rng = random.Random(3)
    tolerance = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 2e-3}
    for _ in range(60):
        q, k, v, options = _random_plain_call(rng)
        api.PLANS.clear()
        plain_calls.clear()
        first, second = (local_attention(q, k, v, **options) for _ in range(2))
        assert len(plain_calls) == 2 and all(out is not None for out in plain_calls)
        assert api.PLANS.entries[_key(q, k, v, **options)].plain is not None
        with pytest.MonkeyPatch.context() as patch:  # the general path: the entry finds nothing to do
            patch.setattr(backends, "plain_forward", lambda *args: None)
            general = local_attention(q, k, v, **options)
        explicit = local_attention(q, k, v, backend="fused", **options)
        assert len(plain_calls) == 3
        reference = local_attention(q, k, v, backend="reference", **options)
        assert first.shape == reference.shape and first.dtype == q.dtype
        for out in (second, general, explicit):
            torch.testing.assert_close(out, first, rtol=0, atol=0)
        atol = tolerance[q.dtype]
        torch.testing.assert_close(first, reference, rtol=atol, atol=atol)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        results = []
        for backend in ("auto", "reference"):
            out = local_attention(*leaves, backend=backend, **options)
            weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
            results.append([out, *torch.autograd.grad((out * weights).sum(), leaves)])
        assert len(plain_calls) == 3  # autograd records the call: the general path
        torch.testing.assert_close(results[0][0].detach(), first, rtol=0, atol=0)
        for got, ref in zip(*results):
            torch.testing.assert_close(got, ref, rtol=10 * atol, atol=10 * atol)


@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_plain_entry_finds_every_non_finite_entry_and_only_those(dtype, plain_calls):
    """A NaN or infinity anywhere in k or v (however far from the rows that see it) sends the call down the
    exact route of `ops.finite`, whose result the call then returns; the largest finite numbers, subnormals
    and negative zero do not."""
    options = dict(window_size=8, causal=True)
    info = torch.finfo(dtype)
    for name in ("k", "v"):
        for position in (0, 37, 3 * 5 * 40 - 1):
            for bad in (float("nan"), float("inf"), float("-inf")):
                q, k, v = (torch.randn(3, 40, 5, dtype=dtype) for _ in range(3))
                tensors = {"q": q, "k": k, "v": v}
                tensors[name].view(-1)[position] = bad
                plain_calls.clear()
                out = local_attention(q, k, v, **options)
                assert plain_calls == [None]
                reference = local_attention(q, k, v, backend="reference", **options)
                torch.testing.assert_close(out, reference, equal_nan=True, rtol=2e-2, atol=2e-2)
        for special in (info.max, -info.max, info.tiny, info.tiny / 2, info.smallest_normal, -0.0):
            q, k, v = (torch.randn(3, 40, 5, dtype=dtype) for _ in range(3))
            {"k": k, "v": v}[name].view(-1)[1::7] = special
            plain_calls.clear()
            local_attention(q, k, v, **options)
            assert len(plain_calls) == 1 and plain_calls[0] is not None


@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built")
def test_calls_the_plain_entry_does_not_compute_take_the_general_path(plain_calls):
    """Any option the entry lacks, another backend, autocast or a subclass keeps the call off it (and correct)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 20, 8) for _ in range(3))
    base = dict(window_size=4, causal=True)
    others = [dict(mask=torch.rand(2, 20) < 0.8), dict(attn_bias=torch.zeros(3, 4, 8)),
              dict(documents=torch.sort(torch.randint(0, 3, (2, 20)), dim=1).values), dict(sinks=torch.zeros(3)),
              dict(shared_qk=True), dict(dropout_p=0.1), dict(backend="reference"), dict(backend="sdpa")]
    for other in others:
        out = local_attention(q, k, v, **base, **other)
        if "dropout_p" not in other:
            reference = local_attention(q, k, v, **{**base, **other, "backend": "reference"})
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert local_attention(q, k, v, **base).dtype == torch.bfloat16

    class Sub(torch.Tensor):
        pass

    local_attention(q.as_subclass(Sub), k, v, **base)
    assert plain_calls == []
    local_attention(q, k, v, **base)
    assert len(plain_calls) == 1


@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 128, 16), (2, 70, 8), (8, 600, 32)])
def test_fused_kernel_inline_and_parallel_task_lists_match_the_reference(threads, shape):
    """Small task lists run inline (and BLAS on one thread), big ones split over threads: forward and backward
    equal the reference either way."""
    from windowed_attention.ops.reference import reference_attention

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(1)
        leaves = [torch.randn(*shape, requires_grad=True) for _ in range(3)]
        # two sink tokens: the backward's third task list (their dK, dV) runs too
        call = AttentionCall(WindowSpec(64, True, 1, 0, False, None, 2), shape[-1] ** -0.5)
        results = []
        for compute in (fused_cpu.fused_cpu_attention, reference_attention):
            out = compute(*leaves, call)
            weights = torch.linspace(-1, 1, out.numel()).view_as(out)
            results.append([out, *torch.autograd.grad((out * weights).sum(), leaves)])
        for got, ref in zip(*results):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    finally:
        torch.set_num_threads(before)


# ---- flex block masks -----------------------------------------------------------------------------------


def _tiles(num_blocks, indices) -> set:
    """{(row, query tile, key tile)} listed by a BlockMask's (count, indices) pair, rows = batch x heads."""
    num_blocks, indices = num_blocks.flatten(0, -2), indices.flatten(0, -3)
    return {(row, q, int(indices[row, q, p])) for row in range(indices.shape[0]) for q in range(indices.shape[1])
            for p in range(int(num_blocks[row, q]))}


@pytest.fixture
def eager_flex():
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore")
        patch.setattr(flex, "_compiled_flex", lambda: flex_attention)
        yield


def _random_flex_call(rng: random.Random):
    n = rng.choice([1, 5, 127, 128, 129, 300, 520])
    n_q = rng.choice([n, max(1, n // 2), 1])
    causal = rng.random() < 0.5
    if rng.random() < 0.3:
        options = dict(window_size=(rng.choice([-1, 0, 5, 130]), 0 if causal else rng.choice([-1, 0, 3])),
                       causal=causal)
    else:
        options = dict(window_size=rng.choice([1, 7, 64, 128, 200]), causal=causal,
                       look_backward=rng.randint(0, 2), look_forward=0 if causal else rng.randint(0, 2),
                       exact_windowsize=rng.random() < 0.5)
    if rng.random() < 0.4:
        options["sink_tokens"] = rng.choice([1, 4, 130])
    b = 2
    kind = rng.choice(["none", "right padding", "random"])
    if kind == "right padding":
        lengths = torch.tensor([rng.randint(1, n) for _ in range(b)])
        options["mask"] = torch.arange(n)[None] < lengths[:, None]
    elif kind == "random":
        options["mask"] = torch.rand(b, n) < 0.7
    if rng.random() < 0.4:
        options["documents"] = torch.sort(torch.randint(0, 4, (b, n)), dim=1).values
    return n_q, n, options


@pytest.mark.parametrize("seed,examples", [(2, 8), pytest.param(5, 40, marks=pytest.mark.slow)])
def test_flex_with_masks_documents_sinks_and_short_queries_matches_the_reference(eager_flex, seed, examples):
    """Block masks from key ranges with everything folded in, on random calls (tiles of 128: n up to 520);
    eager flex costs about a second a call here, so the fast tier takes 8 and the slow one 40."""
    rng = random.Random(seed)
    for _ in range(examples):
        n_q, n, options = _random_flex_call(rng)
        q, k, v = torch.randn(2, 2, n_q, 8), torch.randn(2, 2, n, 8), torch.randn(2, 2, n, 8)
        with torch.no_grad():
            got = local_attention(q, k, v, backend="flex", **options)
        torch.testing.assert_close(got, local_attention(q, k, v, backend="reference", **options), rtol=1e-4,
                                   atol=1e-5)


def test_flex_block_masks_never_miss_a_tile_nor_call_a_partial_one_full():
    """Against `create_block_mask` (the mask evaluated at every pair): every tile it lists we list, and every
    tile we call full it calls full, on random calls with key masks, documents, sink tokens, shorter queries."""
    from torch.nn.attention.flex_attention import create_block_mask

    from windowed_attention.ops.call import document_bounds

    rng = random.Random(3)
    for _ in range(25):
        n_q, n, options = _random_flex_call(rng)
        spec = api.make_spec(options["window_size"], options["causal"], options.get("look_backward", 1),
                             options.get("look_forward"), options.get("exact_windowsize", False),
                             options.get("sink_tokens", 0)).for_length(n)
        key_ok, starts, ends = options.get("mask"), None, None
        if "documents" in options:
            starts, ends = document_bounds(options["documents"])
        offset = n - n_q
        mask_mod = flex._rule_mod(spec, n, offset, key_ok, starts, ends)
        rows = 1 if key_ok is None and starts is None else 2
        ours = flex._block_mask(spec, n_q, n, offset, mask_mod, "cpu", key_ok, starts, ends)
        theirs = create_block_mask(mask_mod, rows, None, n_q, n, device="cpu")

        def listed(mask):
            return _tiles(mask.kv_num_blocks, mask.kv_indices) | _tiles(mask.full_kv_num_blocks, mask.full_kv_indices)

        assert ours.kv_num_blocks.shape[0] == rows
        assert listed(theirs) <= listed(ours)
        assert _tiles(ours.full_kv_num_blocks, ours.full_kv_indices) <= _tiles(theirs.full_kv_num_blocks,
                                                                               theirs.full_kv_indices)


def test_right_padding_drops_the_padded_tiles_and_keeps_the_full_ones():
    """Keys `[0, 3n/4)` kept: the tiles past the padding are gone, the tiles before it stay full, and only the
    tile the padding starts in (none here: 3n/4 is a tile edge) would be partial besides the window's own."""
    n = 2048
    spec = WindowSpec(256, True, 1, 0, False)  # window blocks of two tiles: full tiles exist
    key_ok = (torch.arange(n) < n - n // 4)[None]
    plain = flex._block_mask(spec, n, n, 0, flex._rule_mod(spec, n), "cpu")
    padded = flex._block_mask(spec, n, n, 0, flex._rule_mod(spec, n, 0, key_ok), "cpu", key_ok)
    edge = (n - n // 4) // flex.BLOCK

    def drop_padded(tiles):
        return {(r, q, t) for r, q, t in tiles if t < edge}

    assert _tiles(padded.kv_num_blocks, padded.kv_indices) == drop_padded(_tiles(plain.kv_num_blocks, plain.kv_indices))
    assert _tiles(padded.full_kv_num_blocks, padded.full_kv_indices) == drop_padded(
        _tiles(plain.full_kv_num_blocks, plain.full_kv_indices))
    assert int(padded.full_kv_num_blocks.sum()) > 0


def test_the_geometry_block_mask_is_cached_and_a_key_mask_is_read_every_call(eager_flex):
    """The block mask of a call without key mask or documents is built once per (rule, lengths, offset,
    device); a key mask changed in place between two calls is read afresh (never cached by identity)."""
    spec = WindowSpec(64, True, 1, 0, False)
    assert flex._cached_block_mask(spec, 300, 300, 0, "cpu") is flex._cached_block_mask(spec, 300, 300, 0, "cpu")
    assert flex._cached_block_mask(spec, 300, 300, 0, "cpu") is not flex._cached_block_mask(spec, 299, 300, 1, "cpu")
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 300, 8) for _ in range(3))
    mask = torch.ones(1, 300, dtype=torch.bool)
    with torch.no_grad():
        first = local_attention(q, k, v, window_size=64, causal=True, mask=mask, backend="flex")
        mask[:, 200:] = False
        second = local_attention(q, k, v, window_size=64, causal=True, mask=mask, backend="flex")
        expected = local_attention(q, k, v, window_size=64, causal=True, mask=mask, backend="reference")
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(first, second)
