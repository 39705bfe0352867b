"""The issue's headline figures, measured side by side in one process (interleaved medians).

Shapes: B=1, H=8, D=64, W=256, causal, look_backward=1, fp32 unless stated.
"""

from __future__ import annotations

import torch

from ..compiling import inductor_options
from . import impls, measure

N, W = 8192, 256


def _pair(make_ours, make_theirs, n, backward, reps, dtype=torch.float32):
    inputs = measure.make_inputs(n, dtype, backward)
    fns = {"ours": measure.step(make_ours, inputs, backward), "theirs": measure.step(make_theirs, inputs, backward)}
    times = measure.interleaved(fns, reps)
    return dict(ours_ms=times["ours"] * 1e3, theirs_ms=times["theirs"] * 1e3, speedup=times["theirs"] / times["ours"])


def _options(reps: int) -> dict:
    """Options that once fell off the fast path: dropout (p = 0.1, training) and xpos, fwd+bwd at N, each
    against local-attention's LocalAttention with the same option, and against our own next-best backend."""
    from local_attention import LocalAttention as Theirs

    from windowed_attention import LocalAttention as Ours
    from windowed_attention.ops import backends

    inputs = measure.make_inputs(N, torch.float32, True)
    xpos = dict(window_size=W, causal=True, look_backward=1, dim=impls.DIM, use_xpos=True, xpos_scale_base=512)
    dropout = dict(window_size=W, causal=True, look_backward=1, dropout=0.1)
    modules = {
        "dropout": (Ours(**dropout).train(), Theirs(**dropout, look_forward=0).train(), "reference"),
        "xpos": (Ours(**xpos), Theirs(**xpos, look_forward=0), "sdpa"),
    }
    choose = backends.choose

    def forced(module, name):  # our module on a named backend instead of `auto`'s choice
        def run(q, k, v):
            backends.choose = lambda *args, **kwargs: name
            try:
                return module(q, k, v)
            finally:
                backends.choose = choose

        return run

    result = {}
    for option, (ours, theirs, fallback) in modules.items():
        steps = {"ours": measure.step(ours, inputs, True), "theirs": measure.step(theirs, inputs, True),
                 "fallback": measure.step(forced(ours, fallback), inputs, True)}
        times = measure.interleaved(steps, reps)
        result[option] = dict(ours_ms=times["ours"] * 1e3, theirs_ms=times["theirs"] * 1e3, speedup=times["theirs"] / times["ours"],
                              backend_before=fallback, before_ms=times["fallback"] * 1e3,
                              speedup_over_before=times["fallback"] / times["ours"])
    return result


def _grouped_query(reps: int, kv_heads: int = impls.HEADS // 4) -> dict:
    """The op's forward+backward with `kv_heads` kv heads against as many as query heads (same q, N, W)."""
    q, k, v = measure.make_inputs(N, torch.float32, True)
    grouped = [q, k[:, :kv_heads].detach().clone().requires_grad_(), v[:, :kv_heads].detach().clone().requires_grad_()]
    fn = impls.ours(N, W)
    times = measure.interleaved({"grouped": measure.step(fn, grouped, True), "full": measure.step(fn, [q, k, v], True)}, reps)
    return dict(kv_heads=kv_heads, heads=impls.HEADS, grouped_ms=times["grouped"] * 1e3, full_ms=times["full"] * 1e3,
                speedup=times["full"] / times["grouped"])


def document_lengths(n: int, low: int = 64, high: int = 2048, seed: int = 0) -> list[int]:
    """Random document lengths in `[low, high]` that fill `n` positions (the last one cut to fit)."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n:
        lengths.append(min(int(torch.randint(low, high + 1, (), generator=g)), n - sum(lengths)))
    return lengths


def document_ids(n: int, **kwargs) -> torch.Tensor:
    """`(1, n)` non-decreasing ids of `document_lengths(n)`."""
    lengths = document_lengths(n, **kwargs)
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def option_calls(w: int, documents: torch.Tensor, sinks: torch.Tensor) -> dict[str, dict]:
    """The keywords of `local_attention` for the plain causal call of window `w` and for each modern option
    on it; `token_window` is compared with `block_exact`, its block twin, the others with `plain`."""
    base = dict(window_size=w, causal=True)
    return {
        "plain": base,
        "documents": dict(base, documents=documents),
        "sinks": dict(base, sinks=sinks),
        "sink_tokens": dict(base, sink_tokens=4),
        "softcap": dict(base, softcap=30.0),
        "block_exact": dict(base, exact_windowsize=True),
        "token_window": dict(window_size=(w, 0), causal=True),
    }


def _modern(reps: int) -> dict:
    """The modern options' cost, fwd+bwd at N against the same call without the option (op, `auto`):
    documents (random lengths 64-2048), learned sinks, sink_tokens=4, softcap=30, and the token window (W, 0)
    against its block equivalent (window W, exact); and the forward with documents and the token window
    against compiled FlexAttention with the same document + sliding-window mask (attention-gym's recipe)."""
    from windowed_attention import local_attention

    inputs = measure.make_inputs(N, torch.float32, True)
    documents = document_ids(N)
    sinks = torch.zeros(impls.HEADS, requires_grad=True)
    calls = option_calls(W, documents, sinks)
    steps = {name: measure.step(lambda q, k, v, kw=kw: local_attention(q, k, v, **kw), inputs, True)
             for name, kw in calls.items()}
    times = measure.interleaved(steps, reps)
    result = {name: dict(ms=times[name] * 1e3, ratio=times[name] / times["plain"]) for name in calls}
    result["token_window"]["ratio"] = times["token_window"] / times["block_exact"]  # against its block equivalent
    result["documents"]["count"] = int(documents.max()) + 1
    try:
        result["fwd_documents_vs_compiled_flex"] = _documents_vs_flex(documents, reps)
    except Exception as error:  # compile may fail on some setups
        result["fwd_documents_vs_compiled_flex"] = dict(error=f"{type(error).__name__}: {error}"[:300])
    return result


def _documents_vs_flex(documents: torch.Tensor, reps: int) -> dict:
    """Forward with documents and the token window (W, 0): ours against compiled FlexAttention whose mask is
    `same document & j <= i & i - j <= W`."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from windowed_attention import local_attention

    ids = documents[0]

    def mask_mod(b, h, i, j):
        return (ids[i] == ids[j]) & (j <= i) & (i - j <= W)

    block_mask = create_block_mask(mask_mod, None, None, N, N, device="cpu")
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False, options=inductor_options())
    inputs = measure.make_inputs(N, torch.float32, False)
    fns = {
        "ours": measure.step(lambda q, k, v: local_attention(q, k, v, window_size=(W, 0), causal=True,
                                                            documents=documents), inputs, False),
        "flex": measure.step(lambda q, k, v: flex(q, k, v, block_mask=block_mask), inputs, False),
    }
    times = measure.interleaved(fns, reps)
    return dict(ours_ms=times["ours"] * 1e3, flex_ms=times["flex"] * 1e3, speedup=times["flex"] / times["ours"])


def _training(reps: int, streams: int = 1) -> dict | None:
    """A LocalTransformer training step, ours against local-attention's, both with `streams` residual streams."""
    try:
        from local_attention import LocalTransformer as Theirs

        from windowed_attention.transformer import LocalTransformer as Ours
    except ImportError:
        return None
    config = dict(num_tokens=256, max_seq_len=2048, dim=256, depth=4, heads=4, dim_head=64, local_attn_window_size=256,
                  causal=True)
    batch = torch.randint(0, 256, (4, 2048), generator=torch.Generator().manual_seed(0))
    steps = {}
    for name, cls in (("ours", Ours), ("theirs", Theirs)):
        torch.manual_seed(0)
        model = cls(**config, num_residual_streams=streams)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            loss = model(batch, return_loss=True)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    times = measure.interleaved(steps, reps)
    tokens = batch.numel()
    return dict(config=dict(config, batch="4x2048", optimizer="Adam fp32", num_residual_streams=streams),
                ours_tokens_per_s=tokens / times["ours"],
                theirs_tokens_per_s=tokens / times["theirs"], speedup=times["theirs"] / times["ours"])


def run(train: bool = True, reps: int = 7) -> dict:
    peak = measure.matmul_peak()
    peak_bf16 = measure.matmul_peak(torch.bfloat16)
    result = dict(shapes=f"B=1 H={impls.HEADS} D={impls.DIM} W={W} causal look_backward=1",
                  matmul_peak_gflops_fp32=peak, matmul_peak_gflops_bf16=peak_bf16)

    plain = _pair(impls.ours(N, W), impls.theirs(N, W), N, True, reps)
    flops = impls.useful_flops(N, W, False, True)
    plain["ours_gflops"] = flops / plain["ours_ms"] * 1e-6
    plain["ours_pct_matmul_peak"] = 100 * plain["ours_gflops"] / peak
    result["fwd_bwd_plain_n8192"] = plain

    rot = _pair(impls.ours(N, W, exact=True, rotary_pos=True), impls.theirs(N, W, exact=True, rotary_pos=True), N, True, reps)
    rot["ours_gflops"] = impls.useful_flops(N, W, True, True) / rot["ours_ms"] * 1e-6
    rot["ours_pct_matmul_peak"] = 100 * rot["ours_gflops"] / peak
    result["fwd_bwd_rotary_exact_n8192"] = rot

    result["fwd_plain_n8192_vs_local_attention"] = _pair(impls.ours(N, W), impls.theirs(N, W), N, False, reps)
    try:
        inference = _pair(impls.ours(N, W), impls.compiled_flex(N, W), N, False, reps)
        result["fwd_plain_n8192_vs_compiled_flex"] = dict(ours_ms=inference["ours_ms"], flex_ms=inference["theirs_ms"],
                                                          speedup=inference["speedup"])
    except Exception as error:  # compile may fail on some setups
        result["fwd_plain_n8192_vs_compiled_flex"] = dict(error=f"{type(error).__name__}: {error}"[:300])

    ours_mem = measure.peak_memory("ours", 32768, W)
    theirs_mem = measure.peak_memory("local-attention", 32768, W)
    result["peak_memory_fwd_bwd_n32768"] = dict(
        ours_mib=None if ours_mem is None else ours_mem / 2**20, theirs_mib=None if theirs_mem is None else theirs_mem / 2**20,
        ratio=None if not (ours_mem and theirs_mem) else ours_mem / theirs_mem, method="fresh subprocess, VmHWM - VmRSS after clear_refs")

    # interleaved like the pairs: one short and one long call per round, so load changes hit both
    lengths = (4096, 65536)
    steps = {n: measure.step(impls.ours(n, W), measure.make_inputs(n, torch.float32, True), True) for n in lengths}
    seconds = measure.interleaved(steps, max(reps, 5))
    per_token = {n: seconds[n] / n * 1e6 for n in lengths}
    result["linear_cost_fwd_bwd"] = dict(us_per_token_n4096=per_token[4096], us_per_token_n65536=per_token[65536],
                                         ratio=per_token[65536] / per_token[4096])

    try:
        options = _options(reps)
        result["fwd_bwd_dropout_n8192"], result["fwd_bwd_xpos_n8192"] = options["dropout"], options["xpos"]
    except ImportError:  # local-attention is a test/benchmark extra
        pass

    result["fwd_bwd_grouped_query_n8192"] = _grouped_query(reps)
    result["fwd_bwd_modern_options_n8192"] = _modern(reps)

    fp32_in = measure.make_inputs(N, torch.float32, True)
    bf16_in = measure.make_inputs(N, torch.bfloat16, True)
    fn = impls.ours(N, W)

    def autocast_step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn(*fp32_in).float().sum().backward()

    times = measure.interleaved({"fp32": measure.step(fn, fp32_in, True), "bf16": measure.step(fn, bf16_in, True),
                                 "autocast": autocast_step}, reps)
    result["bf16_fwd_bwd_n8192"] = dict(fp32_ms=times["fp32"] * 1e3, bf16_ms=times["bf16"] * 1e3,
                                        autocast_bf16_ms=times["autocast"] * 1e3, bf16_speedup=times["fp32"] / times["bf16"])
    if train:
        result["train_step_local_transformer"] = _training(3)
        result["train_step_local_transformer_4_streams"] = _training(3, streams=4)
    return result


def report(result: dict) -> None:
    def show(key, text):
        value = result.get(key)
        if value:
            print(f"{text:48} " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()
                                            if not isinstance(v, dict)))

    print(f"fp32 matmul peak {result['matmul_peak_gflops_fp32']:.0f} GFLOP/s, bf16 {result['matmul_peak_gflops_bf16']:.0f}")
    show("fwd_bwd_plain_n8192", "fwd+bwd N=8192 vs local-attention")
    show("fwd_bwd_rotary_exact_n8192", "fwd+bwd N=8192 rotary+exact vs local-attention")
    show("fwd_plain_n8192_vs_local_attention", "fwd N=8192 vs local-attention")
    show("fwd_plain_n8192_vs_compiled_flex", "fwd N=8192 vs compiled flex (speedup>1: ours faster)")
    show("peak_memory_fwd_bwd_n32768", "peak memory fwd+bwd N=32768")
    show("linear_cost_fwd_bwd", "time/token fwd+bwd N=65536 vs 4096")
    show("fwd_bwd_dropout_n8192", "fwd+bwd N=8192 dropout 0.1 vs local-attention")
    show("fwd_bwd_xpos_n8192", "fwd+bwd N=8192 xpos vs local-attention")
    show("fwd_bwd_grouped_query_n8192", "fwd+bwd N=8192, kv heads H/4 vs H")
    for option, value in (result.get("fwd_bwd_modern_options_n8192") or {}).items():
        against = {"plain": "", "token_window": " vs window 256 exact"}.get(option, " vs plain")
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        print(f"{'fwd+bwd N=8192 ' + option + against:48} {shown}")
    show("bf16_fwd_bwd_n8192", "bf16 vs fp32 fwd+bwd N=8192")
    show("train_step_local_transformer", "LocalTransformer train step tokens/s")
    show("train_step_local_transformer_4_streams", "LocalTransformer train step, 4 streams, tokens/s")
