"""Bodies of the context-parallel tests, run in spawned processes (one per rank, gloo on CPU).

Every rank builds the same full inputs from the same seed, computes the single-process result itself,
runs the sharded computation on its shard, and compares its slice (and, for replicated parameters, the
gradients summed over the group). A failure raises in that rank with the configuration in the message.
"""

from __future__ import annotations

import datetime
import os
import random

import torch
import torch.distributed as dist

from windowed_attention import LocalAttention, LocalMHA, LocalTransformer, local_attention
from windowed_attention.ops import backends
from windowed_attention.parallel import gather, shard, traffic

TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def init(rank: int, world: int, init_file: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # a rank that fails ends the spawn (the others are terminated); the timeout is a second guard
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def close(rank: int) -> None:
    dist.barrier()
    dist.destroy_process_group()


def close_enough(name: str, got: torch.Tensor, want: torch.Tensor, dtype, config) -> None:
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    err = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    if not err <= tol * scale:
        raise AssertionError(f"rank {dist.get_rank()}: {name} differs by {err:.3g} (tolerance {tol * scale:.3g}) "
                             f"in {config}")


def summed(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def draw_op_config(gen: random.Random, world: int) -> dict:
    causal = gen.random() < 0.5
    w = gen.randint(1, 5)
    config = dict(
        window_size=w, causal=causal, look_backward=gen.randint(0, 3),
        look_forward=0 if causal else gen.randint(0, 2), exact_windowsize=gen.random() < 0.5,
        shared_qk=gen.random() < 0.25,
    )
    # shard lengths from 1 (halos over several ranks) to a few windows
    n_s = gen.choice([1, 2, gen.randint(1, 3 * w), gen.randint(w, 4 * w)])
    dtype = gen.choice([torch.float64, torch.float64, torch.float32, torch.bfloat16, torch.float16])
    options = dict(mask=gen.random() < 0.4, bias=gen.random() < 0.35, dim=gen.choice([4, 8]),
                   dim_v=gen.choice([4, 6]))
    names = ["auto", "reference", *[b for b in ("fused", "sdpa") if backends.availability()[b]]]
    backend = gen.choice(names)
    if backend == "sdpa" and (options["bias"] or config["shared_qk"]):
        backend = "auto"
    return dict(config=config, n_s=n_s, dtype=dtype, backend=backend, **options)


def draw_tensors(c: dict, world: int, seed: int, h: int, h_kv: int):
    """`(q, k, v, grad, mask)` of the whole sequence for config `c` (`draw_op_config`), batch 2, `h` query
    and `h_kv` key/value heads, drawn from `seed` (every rank draws the same)."""
    n, b, dtype = c["n_s"] * world, 2, c["dtype"]
    torch.manual_seed(seed)
    q, k = (torch.randn(b, heads, n, c["dim"], dtype=dtype) for heads in (h, h_kv))
    v = torch.randn(b, h_kv, n, c["dim_v"], dtype=dtype)
    grad = torch.randn(b, h, n, c["dim_v"], dtype=dtype)
    mask = torch.rand(b, n) < 0.7 if c["mask"] else None
    return q, k, v, grad, mask


def op_cases(rank: int, world: int, init_file: str, seed: int, count: int) -> None:
    """Random op configurations: output and q, k, v gradients per slice, bias gradient summed."""
    init(rank, world, init_file)
    group = dist.group.WORLD
    gen = random.Random(seed)
    for case in range(count):
        c = draw_op_config(gen, world)
        config, dtype, n_s = c["config"], c["dtype"], c["n_s"]
        h = 2
        h_kv = 1 if case % 2 else h  # every other case grouped-query attention
        q, k, v, grad, mask = draw_tensors(c, world, seed * 1000 + case, h, h_kv)
        w, span = config["window_size"], config["look_backward"] + config["look_forward"] + 1
        bias = torch.randn(h, w, span * w, dtype=dtype) if c["bias"] else None
        leaves = [t.clone().requires_grad_() for t in (q, k, v, *([bias] if c["bias"] else []))]
        out = local_attention(*leaves[:3], mask=mask, attn_bias=leaves[3] if c["bias"] else None,
                              backend=c["backend"], **config)
        out.backward(grad)

        parts = [shard(t, group, dim=2).detach().clone().requires_grad_() for t in (q, k, v)]
        part_bias = bias.clone().requires_grad_() if c["bias"] else None
        part_out = local_attention(*parts, mask=None if mask is None else shard(mask, group, dim=1),
                                   attn_bias=part_bias, backend=c["backend"], group=group, **config)
        part_out.backward(shard(grad, group, dim=2))
        described = dict(config, n_s=n_s, world=world, dtype=str(dtype), backend=c["backend"], mask=c["mask"],
                         bias=c["bias"], case=case, kv_heads=h_kv)
        close_enough("output", part_out, shard(out, group, dim=2), dtype, described)
        for name, leaf, part in zip("qkv", leaves, parts):
            close_enough(f"grad {name}", part.grad, shard(leaf.grad, group, dim=2), dtype, described)
        if c["bias"]:
            close_enough("grad attn_bias (summed)", summed(part_bias.grad), leaves[3].grad, dtype, described)
        close_enough("gather(output)", gather(part_out.detach(), group, dim=2), out.detach(), dtype, described)

    # only halos travel: the bytes sent do not depend on the shard length
    sent = []
    for n_s in (16, 64):
        q = torch.randn(1, 2, n_s, 4, requires_grad=True)
        traffic.reset()
        local_attention(q, q, q, window_size=4, look_backward=2, causal=True, group=group).sum().backward()
        sent.append((traffic.forward_bytes, traffic.backward_bytes))
    # rank 0 sends the last 2 windows forward, the last rank their gradients back, inner ranks both
    expected = (2 * 4) * 2 * (4 + 4) * 4  # 2 windows of 4 positions x 2 heads x (d + d_v) floats x 4 bytes
    if sent[0] != sent[1] or sent[0] != ((expected if rank < world - 1 else 0), (expected if rank > 0 else 0)):
        raise AssertionError(f"rank {rank}: halo bytes {sent}, expected {expected} each way")

    # dropout: each rank drops from its own stream; the result is a dropout of the right rate, finite,
    # with finite gradients (no exact comparison: a different random stream from the single process's)
    torch.manual_seed(seed)
    q = torch.randn(1, 2, 6, 4, requires_grad=True)
    out = local_attention(q, q, q, window_size=2, dropout_p=0.5, group=group)
    plain = local_attention(q, q, q, window_size=2, group=group)
    out.sum().backward()
    if not (torch.isfinite(out).all() and torch.isfinite(q.grad).all()) or torch.equal(out, plain):
        raise AssertionError("dropout under group")
    close(rank)


def module_cases(rank: int, world: int, init_file: str, seed: int) -> None:
    """LocalAttention (rotary, xpos), LocalMHA and LocalTransformer (loss and summed gradients)."""
    init(rank, world, init_file)
    group = dist.group.WORLD
    gen = random.Random(seed)
    for case in range(8):
        causal = case % 2 == 0
        w = gen.randint(2, 4)
        n_s = gen.choice([1, 3, w, 2 * w + 1])
        kwargs = dict(window_size=w, causal=causal, look_backward=gen.randint(1, 2),
                      look_forward=0 if causal else gen.randint(0, 1), exact_windowsize=case % 4 < 2,
                      dim=8, autopad=True, use_xpos=case % 3 == 0, xpos_scale_base=16)
        module = LocalAttention(**kwargs)
        torch.manual_seed(seed + case)
        q, k, v, grad = (torch.randn(2, 2, n_s * world, 8, dtype=torch.float64) for _ in range(4))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        out = module(*full)
        out.backward(grad)
        parts = [shard(t, group, dim=2).detach().clone().requires_grad_() for t in (q, k, v)]
        part_out = module(*parts, group=group)
        part_out.backward(shard(grad, group, dim=2))
        described = dict(kwargs, n_s=n_s, world=world, case=case, module="LocalAttention")
        close_enough("output", part_out, shard(out, group, dim=2), torch.float64, described)
        for name, leaf, part in zip("qkv", full, parts):
            close_enough(f"grad {name}", part.grad, shard(leaf.grad, group, dim=2), torch.float64, described)

    for case in range(6):
        causal = case % 2 == 0
        torch.manual_seed(seed + 100 + case)
        w = gen.randint(2, 4)
        n_s = gen.choice([2, w, 2 * w + 1])
        kwargs = dict(causal=causal, local_attn_window_size=w, use_xpos=case % 3 == 1, xpos_scale_base=16,
                      use_dynamic_pos_bias=case % 3 == 2, qk_rmsnorm=case >= 3, look_backward=gen.randint(1, 2),
                      use_abs_pos_emb=case != 1, gate_values_per_head=case == 4,
                      kv_heads=1 if case % 2 else None, num_residual_streams=1 + case % 3)
        if not causal:
            kwargs["look_forward"] = 1
        model = LocalTransformer(num_tokens=11, max_seq_len=n_s * world, dim=16, depth=2, heads=2, dim_head=8,
                                 **kwargs).double()
        tokens = torch.randint(0, 11, (2, n_s * world))
        mask = torch.rand(2, n_s * world) < 0.8 if case == 5 else None
        loss = model(tokens, mask=mask, return_loss=True)
        loss.backward()
        want = {name: p.grad.clone() for name, p in model.named_parameters()}
        model.zero_grad()
        described = dict(kwargs, n_s=n_s, world=world, case=case, module="LocalTransformer")
        part_loss = model(shard(tokens, group), mask=None if mask is None else shard(mask, group),
                          return_loss=True, group=group)
        part_loss.backward()
        close_enough("loss", part_loss, loss, torch.float64, described)
        for name, p in model.named_parameters():
            close_enough(f"grad {name} (summed)", summed(p.grad), want[name], torch.float64, described)
        logits = model(tokens)
        close_enough("logits", model(shard(tokens, group), group=group), shard(logits, group), torch.float64,
                     described)

    # gather's gradient is this rank's slice of the upstream one (the gathered value is replicated)
    x = torch.randn(2, 5 * world, 3, dtype=torch.float64)
    part = shard(x, group, dim=1).clone().requires_grad_()
    weight = torch.randn(2, 5 * world, 3, dtype=torch.float64)
    (gather(part, group, dim=1) * weight).sum().backward()
    close_enough("gather gradient", part.grad, shard(weight, group, dim=1), torch.float64, "gather")

    mha = LocalMHA(dim=16, window_size=4, heads=2, dim_head=8, causal=True, prenorm=True).double()
    x = torch.randn(1, 6 * world, 16, dtype=torch.float64)
    close_enough("LocalMHA output", mha(shard(x, group), group=group), shard(mha(x), group), torch.float64, "mha")
    close(rank)


def disagreement_cases(rank: int, world: int, init_file: str) -> None:
    """Ranks that disagree raise ValueError naming the argument, on every rank, and do not hang."""
    init(rank, world, init_file)
    group = dist.group.WORLD
    q = torch.randn(1, 8 + rank, 4)  # unequal shard lengths

    def expect(argument: str, fn=local_attention, **call):
        try:
            fn(**call, group=group)
        except ValueError as error:
            if not str(error).startswith(argument):
                raise AssertionError(f"the error should name {argument}: {error}") from None
        else:
            raise AssertionError(f"no ValueError naming {argument}")

    expect("q", q=q, k=q, v=q, window_size=4)
    q = torch.randn(1, 8, 4)
    expect("causal", q=q, k=q, v=q, window_size=4, causal=rank == 0)
    expect("window_size", q=q, k=q, v=q, window_size=4 + rank)
    expect("mask", q=q, k=q, v=q, window_size=4, mask=torch.ones(1, 8, dtype=torch.bool) if rank else None)
    expect("look_backward", q=q, k=q, v=q, window_size=4, look_backward=1 + rank)
    model = LocalTransformer(num_tokens=8, max_seq_len=32, dim=8, depth=1, heads=1, dim_head=8,
                             local_attn_window_size=4)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    expect("x", model, x=tokens[:, :6 + 2 * rank])
    expect("return_loss", model, x=tokens, return_loss=rank == 1)
    # after all that, the group still works
    out = local_attention(q, q, q, window_size=4, group=group)
    if out.shape != q.shape:
        raise AssertionError(out.shape)
    close(rank)


def draw_modern_config(gen: random.Random) -> dict:
    """A random call with the modern options: token or block windows, sink tokens, learned sinks, softcap,
    documents (which cross shard boundaries), masks, biases."""
    causal = gen.random() < 0.5
    if gen.random() < 0.4:
        left, right = gen.choice([-1, 0, 1, 2, 3, 5, 9]), gen.choice([-1, 0, 1, 2, 4])
        config = dict(window_size=(left, right), causal=causal)
        if causal:
            config["window_size"] = (left, 0)
    else:
        config = dict(window_size=gen.randint(1, 4), causal=causal, look_backward=gen.randint(0, 2),
                      look_forward=0 if causal else gen.randint(0, 2), exact_windowsize=gen.random() < 0.4)
    config.update(sink_tokens=gen.choice([0, 0, 1, 2, 3, 6]), shared_qk=gen.random() < 0.15)
    if gen.random() < 0.4:
        config["softcap"] = gen.uniform(0.5, 4.0)
    return config


def modern_fixed_cases(world: int) -> list:
    """Layouts the random draw meets rarely: `(config, n_s, documents (1, n) or None)`."""
    n_s = 4
    n = n_s * world
    ids = torch.zeros(1, n, dtype=torch.long)
    ids[:, n_s - 1:] = 1  # a document starts at the last position of rank 0's shard and runs to the end
    ids[:, n - 2:] = 2
    return [
        # not causal with a reach of 0 ahead: its sink tokens lie after the shard, beyond the window's halo
        (dict(window_size=(2, 0), causal=False, sink_tokens=3), n_s, ids),
        (dict(window_size=1, look_backward=0, look_forward=0, sink_tokens=3), n_s, ids),
        # without documents: the sequence's sink tokens beyond the shards of the first ranks
        (dict(window_size=1, look_backward=0, look_forward=0, sink_tokens=2 * n_s + 1), n_s, None),
        # one document over every shard: its sink tokens and window blocks (a gap of 1) from rank 0
        (dict(window_size=2, look_backward=1, look_forward=0, causal=True, sink_tokens=2), 5,
         torch.zeros(1, 5 * world, dtype=torch.long)),
        (dict(window_size=3, look_backward=1, look_forward=1, sink_tokens=2), 5,
         torch.cat([torch.zeros(1, 1), torch.ones(1, 5 * world - 1)], dim=1).long()),
        # token windows unbounded on one side: the whole prefix (or suffix) travels, computed exactly
        (dict(window_size=(-1, 0), causal=True), 3, None),
        (dict(window_size=(-1, 1), sink_tokens=1, softcap=2.0), 3, ids[:, :3 * world]),
        (dict(window_size=(1, -1), sink_tokens=2), 3, None),
    ]


def modern_cases(rank: int, world: int, init_file: str, seed: int, count: int) -> None:
    """Documents crossing shards, sink tokens, learned sinks, softcap, token windows, grouped-query heads:
    every rank's output and q, k, v gradients are its slice of the single-process ones (the reference
    backend), the sinks and attn_bias gradients summed over the ranks are the single-process ones."""
    init(rank, world, init_file)
    group = dist.group.WORLD
    gen = random.Random(seed)
    kinds = set()
    fixed = modern_fixed_cases(world)
    for case in range(len(fixed) + count):
        config = draw_modern_config(gen)
        n_s = gen.choice([1, 2, gen.randint(1, 6), gen.randint(4, 10)])
        dtype = gen.choice([torch.float64, torch.float64, torch.float32])
        b, h = 2, 2
        h_kv = gen.choice([1, h])
        rows, rate, offset = gen.choice([1, b, b * h]), gen.choice([0.05, 0.2, 0.5]), gen.randint(-3, 3)
        with_documents, with_mask, with_sinks = gen.random() < 0.7, gen.random() < 0.3, gen.random() < 0.5
        with_bias, mask_rows = gen.random() < 0.3, gen.choice([1, b])
        documents = None
        if case < len(fixed):  # the targeted layouts first
            config, n_s, documents = fixed[case]
            dtype, with_documents, with_bias = torch.float64, False, False
        n = n_s * world
        torch.manual_seed(seed * 1000 + case)
        q = torch.randn(b, h, n, 4, dtype=dtype)
        k = torch.randn(b, h_kv, n, 4, dtype=dtype)
        v = torch.randn(b, h_kv, n, 3, dtype=dtype)
        grad = torch.randn(b, h, n, 3, dtype=dtype)
        if with_documents:
            documents = (torch.rand(rows, n) < rate).long().cumsum(dim=1) + offset
        mask = torch.rand(mask_rows, n) < 0.75 if with_mask else None
        sinks = torch.randn(h, dtype=dtype) if with_sinks else None
        bias = None
        if not isinstance(config["window_size"], tuple) and with_bias:
            w, span = config["window_size"], config.get("look_backward", 1) + config.get("look_forward", 0) + 1
            bias = torch.randn(h, w, span * w, dtype=dtype)
        extras = [t for t in (sinks, bias) if t is not None]
        leaves = [t.clone().requires_grad_() for t in (q, k, v, *extras)]
        named = dict(zip([name for name, t in (("sinks", sinks), ("attn_bias", bias)) if t is not None], leaves[3:]))
        out = local_attention(*leaves[:3], mask=mask, documents=documents, backend="reference", **named, **config)
        out.backward(grad)

        parts = [shard(t, group, dim=2).detach().clone().requires_grad_() for t in (q, k, v)]
        part_extras = {name: t.detach().clone().requires_grad_() for name, t in named.items()}
        part_out = local_attention(*parts, mask=None if mask is None else shard(mask, group, dim=1),
                                   documents=None if documents is None else shard(documents, group, dim=1),
                                   group=group, **part_extras, **config)
        part_out.backward(shard(grad, group, dim=2))
        described = dict(config, n_s=n_s, world=world, dtype=str(dtype), case=case, kv_heads=h_kv,
                         documents=None if documents is None else documents.tolist(),
                         mask=mask is not None, sinks=sinks is not None, bias=bias is not None)
        close_enough("output", part_out, shard(out, group, dim=2), dtype, described)
        for name, leaf, part in zip("qkv", leaves, parts):
            close_enough(f"grad {name}", part.grad, shard(leaf.grad, group, dim=2), dtype, described)
        for name, part in part_extras.items():
            close_enough(f"grad {name} (summed)", summed(part.grad), named[name].grad, dtype, described)
        if documents is not None and config.get("sink_tokens", 0):
            kinds.add("documents with sink tokens")
        kinds.update(name for name, on in (("token window", isinstance(config["window_size"], tuple)),
                                           ("softcap", "softcap" in config), ("sinks", sinks is not None),
                                           ("documents", documents is not None),
                                           ("sink tokens", config.get("sink_tokens", 0) > 0)) if on)
    wanted = {"documents with sink tokens", "token window", "softcap", "sinks", "documents", "sink tokens"}
    if count >= 24 and kinds != wanted:
        raise AssertionError(f"the draw missed {wanted - kinds}")
    close(rank)


def modern_refusals(rank: int, world: int, init_file: str) -> None:
    """Ranks that disagree on the modern options raise the same ValueError naming the argument on every
    rank; ids that decrease across a shard boundary and shorter queries are refused on every rank."""
    init(rank, world, init_file)
    group = dist.group.WORLD
    q = torch.randn(2, 6, 4)

    def expect(argument: str, **call):
        try:
            local_attention(**{"q": q, "k": q, "v": q, "window_size": 2, **call}, group=group)
        except ValueError as error:
            if not str(error).startswith(argument):
                raise AssertionError(f"the error should name {argument}: {error}") from None
        else:
            raise AssertionError(f"no ValueError naming {argument}")

    ids = torch.zeros(1, 6, dtype=torch.long)
    expect("sink_tokens", sink_tokens=rank)
    expect("documents", documents=ids if rank else None)
    expect("documents", documents=ids.expand(2, 6) if rank else ids)
    expect("sinks", sinks=torch.zeros(2) if rank == 0 else None)
    expect("softcap", softcap=1.0 + rank)
    expect("softcap", softcap=None if rank else 2.0)
    expect("window_size", window_size=(2, rank))
    expect("window_size", window_size=(rank - 1, 1))
    # non-decreasing within each shard, decreasing across the boundary: every rank refuses
    expect("documents", documents=ids + (world - rank))
    # shorter queries stay refused with a group, on every rank
    expect("q", q=q[:, 2:], k=q, v=q)
    out = local_attention(q, q, q, window_size=2, documents=ids + rank, sink_tokens=1, group=group)
    if out.shape != q.shape:
        raise AssertionError(out.shape)

    # only halos and sink tokens travel: with one document over the whole sequence, the bytes sent do not
    # depend on the shard length
    sent = []
    for n_s in (16, 64):
        x = torch.randn(1, 2, n_s, 4, requires_grad=True)
        traffic.reset()
        local_attention(x, x, x, window_size=4, look_backward=2, causal=True, sink_tokens=2,
                        documents=torch.zeros(1, n_s, dtype=torch.long), group=group).sum().backward()
        sent.append((traffic.forward_bytes, traffic.backward_bytes))
    # rank 0 sends forward the 11 keys a document's windows may reach ((look_backward + 1) * w - 1), 2 sink
    # tokens (2 heads x (d + d_v) floats x 4 bytes each) and 11 ids and document starts (int64); rank 1
    # sends the keys' and sink tokens' gradients back
    halo, sink_tokens, ids = 11 * 2 * 8 * 4, 2 * 2 * 8 * 4, 11 * 2 * 8
    expected = [(halo + sink_tokens + ids, 0), (0, halo + sink_tokens)][rank]
    if sent[0] != sent[1] or sent[0] != expected:
        raise AssertionError(f"rank {rank}: bytes sent (forward, backward) by shard length: {sent}, "
                             f"expected {expected}")
    close(rank)


def same_nonfinite(name: str, got: torch.Tensor, want: torch.Tensor, dtype, config) -> None:
    """NaN and infinities at the same places, the finite entries `close_enough`."""
    if not (torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isposinf(), want.isposinf())
            and torch.equal(got.isneginf(), want.isneginf())):
        raise AssertionError(f"rank {dist.get_rank()}: {name} has its non-finite entries elsewhere in {config}")
    fine = torch.isfinite(want)
    close_enough(name, got[fine], want[fine], dtype, config)


def nonfinite_cases(rank: int, world: int, init_file: str, seed: int, count: int) -> None:
    """Random op configurations with NaN and infinities in k and v (some behind the mask): the sharded
    output and gradients hold them exactly where the single process's do (`ops.finite`)."""
    init(rank, world, init_file)
    group = dist.group.WORLD
    gen = random.Random(seed)
    for case in range(count):
        c = draw_op_config(gen, world)
        config, dtype, n_s = c["config"], c["dtype"], c["n_s"]
        q, k, v, grad, mask = draw_tensors(c, world, seed * 1000 + case, 2, 2)
        for t in (k, v):
            t[torch.rand(t.shape) < 0.05] = gen.choice([float("nan"), float("inf"), -float("inf")])
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = local_attention(*leaves, mask=mask, backend=c["backend"], **config)
        out.backward(grad)
        parts = [shard(t, group, dim=2).detach().clone().requires_grad_() for t in (q, k, v)]
        part_out = local_attention(*parts, mask=None if mask is None else shard(mask, group, dim=1),
                                   backend=c["backend"], group=group, **config)
        part_out.backward(shard(grad, group, dim=2))
        described = dict(config, n_s=n_s, world=world, dtype=str(dtype), backend=c["backend"], case=case)
        same_nonfinite("output", part_out.detach(), shard(out.detach(), group, dim=2), dtype, described)
        for name, leaf, part in zip("qkv", leaves, parts):
            same_nonfinite(f"grad {name}", part.grad, shard(leaf.grad, group, dim=2), dtype, described)
    close(rank)
