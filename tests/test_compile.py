"""torch.compile and torch.export through the custom ops of the fused kernel (`ops/fused_cpu.py`).

The custom ops are checked by `torch.library.opcheck` (schema, fake implementation, autograd
registration, AOT tracing with dynamic shapes); a tiny `LocalTransformer` compiles with `fullgraph=True`
and gives the eager loss and gradients; `torch.export` traces the model with its token check left out.
Compiling is slow on small machines: the models are tiny and the tests few.
"""

from __future__ import annotations

import pytest
import torch

from windowed_attention import LocalTransformer, local_attention
from windowed_attention.ops import fused_cpu

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built here")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (a graph keeps the backend choice it was traced with)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tiny(**kwargs):
    torch.manual_seed(0)
    # q and k of a batch of 4 hold 4 * 2 * 64 * 16 = 8192 elements: the rotary kernel runs too
    config = dict(num_tokens=64, max_seq_len=64, dim=32, depth=1, heads=2, dim_head=16, local_attn_window_size=16)
    return LocalTransformer(**{**config, **kwargs})


def _tokens(b=4, n=65):
    return torch.randint(0, 64, (b, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("options", [
    dict(bias=False, keep=False, key_scale=False, dropout=0.0, causal=True, exact=False),
    dict(bias=True, keep=True, key_scale=True, dropout=0.0, causal=True, exact=True),
    dict(bias=True, keep=True, key_scale=False, dropout=0.2, causal=False, exact=False),
    dict(bias=True, keep=False, key_scale=True, dropout=0.0, causal=True, exact=False, kv_rows=1),  # GQA
    # documents, learned sinks (and their gradient), sink tokens, softcap, shorter queries
    dict(bias=True, keep=True, key_scale=False, dropout=0.0, causal=False, exact=True, kv_rows=2, modern=True),
])
def test_opcheck_attention(options):
    g = torch.Generator().manual_seed(0)
    P, n, d, w = 4, 40, 8, 8
    look_forward = 0 if options["causal"] else 1
    span = 2 + look_forward
    kv_rows = options.get("kv_rows", P)
    modern = options.get("modern", False)
    q, k, v = (torch.randn(rows, length, d, generator=g, dtype=torch.float64, requires_grad=True)
               for rows, length in ((P, n - 5 * modern), (kv_rows, n), (kv_rows, n)))
    bias = torch.randn(2, w, span * w, generator=g, dtype=torch.float64, requires_grad=True) if options["bias"] else None
    keep = (torch.rand(2, n, generator=g) > 0.2).double() if options["keep"] else None
    key_scale = torch.rand(span, d, generator=g, dtype=torch.float64) + 0.5 if options["key_scale"] else None
    seed = torch.tensor(123) if options["dropout"] else None
    left, right = (w if options["exact"] else -1), (0 if options["causal"] else w * look_forward if options["exact"] else -1)
    documents = torch.tensor([[0] * 15 + [1] * 20 + [2] * 5, [0] * 40]) if modern else None
    sinks = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True) if modern else None
    args = (q, k, v, bias, keep, key_scale, seed, documents, sinks, w, 1, look_forward, left, right, options["causal"],
            3 * modern, 2.5 * modern, 0.3, False, options["dropout"])
    torch.library.opcheck(fused_cpu.attention_forward, args)


def test_opcheck_rotate_and_its_second_derivative():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    c, s = (torch.rand(10, 4, generator=g, dtype=torch.float64) for _ in range(2))
    torch.library.opcheck(fused_cpu.rotate_op, (x, c, s, False))
    assert torch.autograd.gradgradcheck(lambda x: fused_cpu.rotate(x, c, s), (x,))


def test_double_backward_through_the_fused_kernel_raises():
    """A gradient of a gradient would be silently wrong if the backward's own graph were used: it raises."""
    q, k, v = (torch.randn(2, 32, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = local_attention(q, k, v, window_size=8, causal=True, backend="fused")
    (grad_q,) = torch.autograd.grad((out * out).sum(), q, create_graph=True)  # first order still works
    with pytest.raises(RuntimeError, match="double backward"):
        grad_q.sum().backward()


def test_compiled_model_fullgraph_matches_eager():
    """No graph break (fullgraph=True) through the token check, the backend choice, rotary and the fused
    kernel; loss and gradients equal the eager ones (4 residual streams, the default, and GQA)."""
    model = _tiny(kv_heads=1)
    assert model.num_residual_streams == 4
    x = _tokens()
    loss = model(x, return_loss=True)
    loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    compiled = torch.compile(model, fullgraph=True)
    compiled_loss = compiled(x, return_loss=True)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_model_without_the_kernel_has_no_graph_break(monkeypatch):
    """Without the fused kernel, traced code takes the reference backend (the `sdpa` backend's strided views
    do not trace) and the torch rotary expression: still one graph, the eager loss and gradients."""
    monkeypatch.setattr(fused_cpu, "_state", {"error": "disabled by the test"})
    model = _tiny(attn_dropout=0.0)
    x = _tokens()
    loss = model(x, return_loss=True)
    loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled_loss = compiled(x, return_loss=True)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-4, atol=1e-6, msg=name)
    for bad in (64, -1):  # the token range is an assertion inside the graph
        with pytest.raises(RuntimeError, match="token ids"):
            compiled(torch.where(x == x[0, 3], bad, x), return_loss=True)


def test_export_runs_the_custom_ops():
    model = _tiny().eval()
    x = _tokens(n=64)
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for module in exported.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes if node.op == "call_function"}
    assert "windowed_attention.attention_forward.default" in targets
    assert "windowed_attention.rotate.default" in targets
    torch.testing.assert_close(exported.module()(x), model(x))
    with pytest.raises(ValueError, match="token ids"):  # eager keeps the data-dependent check
        model(x + 64)


def test_train_compile_end_to_end_gives_the_eager_losses(tmp_path, capsys):
    """`windowed-attention train --compile` trains, evaluates and saves; its losses are the eager run's. The
    opening line says what trains: parameters, corpus, sequence, window and backend."""
    from windowed_attention.training import cli as train_cli
    from windowed_attention.training.metrics import read_metrics

    data = tmp_path / "data.txt"
    data.write_text("hello windowed attention, " * 800)
    tiny = ["--data", str(data), "--steps", "2", "--eval-every", "2", "--dim", "32", "--depth", "1", "--heads", "2",
            "--dim-head", "16", "--seq-len", "64", "--window-size", "16", "--batch-size", "4", "--eval-batches", "1",
            "--sample-length", "0", "--log-every", "1", "--no-progress"]
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"run-{compiled}"
        assert train_cli.main(["--out", str(out), *tiny, *(["--compile"] if compiled else [])]) == 0
        first = capsys.readouterr().err.splitlines()[0]
        assert first.startswith("training 0.03M parameters on ") and str(data) in first
        assert "sequence 64, window 16, attention backend fused (cpu, fp32" in first
        assert first.endswith(", compiled)") == compiled
        losses[compiled] = [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]
    assert len(losses[True]) == 2
    for (step, train, val), (step_c, train_c, val_c) in zip(losses[False], losses[True]):
        assert step == step_c and train_c == pytest.approx(train, rel=1e-5)
        assert val_c == (None if val is None else pytest.approx(val, rel=1e-5))


def test_opcheck_hyper_connection_ops():
    """The stream mix and write-back of `ops/hyper.py`: schema, fake, autograd and traced; double backward raises."""
    from windowed_attention.ops import hyper

    g = torch.Generator().manual_seed(0)
    s, dim, tokens = 3, 8, 5
    args = [torch.randn(tokens, s, dim, generator=g, dtype=torch.float64), torch.randn(dim, s + 2, generator=g, dtype=torch.float64),
            torch.randn(s, s + 1, generator=g, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64),
            torch.randn(s, generator=g, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    torch.library.opcheck(hyper.hyper_mix, (*args, 2.0))
    write = (torch.randn(tokens, s, dim, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(tokens, s, generator=g, dtype=torch.float64, requires_grad=True),
             torch.randn(tokens, dim, generator=g, dtype=torch.float64, requires_grad=True))
    torch.library.opcheck(hyper.hyper_write, write)
    assert torch.autograd.gradcheck(lambda *a: hyper.mix(*a, 2.0), tuple(args))
    assert torch.autograd.gradcheck(hyper.write, write)
    x, remixed, beta = hyper.mix(*args, 2.0)
    (grad,) = torch.autograd.grad((x * x).sum() + (remixed * beta[..., None]).sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()
