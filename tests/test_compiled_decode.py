"""The compiled decode step (`generation.engine.CompiledStep`, `generate(..., compile=True)`) against the eager
step it compiles: the same tokens, greedy and seeded sampling, ragged batches, the cache options.

Compiling costs tens of seconds on a small CPU (the first compilation of a process most): the real
compilations are in the slow tier (the full suite), and the dispatch around the graph (when it compiles,
what it hands to the eager step, the checks it keeps) is tested in the fast tier with a stand-in compiler
that returns the eager step.
"""

from __future__ import annotations

import pytest
import torch

from windowed_attention import LocalTransformer, compiling
from windowed_attention.generation import engine
from windowed_attention.generation.engine import CompiledStep, prefill
from windowed_attention.ops import fused_cpu


def _model(**kwargs):
    torch.manual_seed(0)
    config = dict(num_tokens=64, max_seq_len=256, dim=32, depth=1, heads=2, dim_head=16, local_attn_window_size=8,
                  num_residual_streams=1)
    return LocalTransformer(**{**config, **kwargs}).eval()


def _prompts(lengths=(5, 11, 3)):
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (n,), generator=generator) for n in lengths]


@pytest.fixture
def fake_compile(monkeypatch):
    """`torch.compile` in the engine replaced by a stand-in that returns the eager step and counts its calls."""
    calls = []

    def compile(fn, **options):
        calls.append(options)
        return lambda *args: fn(*args)

    monkeypatch.setattr(engine.torch, "compile", compile)
    return calls


@pytest.mark.parametrize("machine, capability, bits", [
    ("x86_64", "AVX512", 512), ("x86_64", "AVX2", 256), ("x86_64", "DEFAULT", 0), ("aarch64", "DEFAULT", None),
])
def test_the_graph_is_compiled_for_the_vector_width_torch_runs_at(fake_compile, monkeypatch, machine, capability, bits):
    """inductor's on-disk cache keys code by its config, not by the vector width: the width must be in the
    options (else a cache filled at another width hands back code for that width: wrong tokens, a corrupted
    heap; tests/test_compiling.py runs that)."""
    monkeypatch.setattr(compiling.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    _model().generate(_prompts(), 3, temperature=0, compile=True)
    options = fake_compile[0]["options"]
    assert options.get("cpp.simdlen") == bits and ("cpp.simdlen" in options) == (bits is not None)
    assert options["cpp_wrapper"] is True  # on CPU (off on CUDA, untried there)


def test_compile_is_one_per_configuration_and_announced(fake_compile, capsys):
    model = _model()
    eager = model.generate(_prompts(), 12, temperature=0)
    assert torch.equal(model.generate(_prompts(), 12, temperature=0, compile=True), eager)
    assert torch.equal(model.generate(_prompts(), 12, temperature=0, compile=True), eager)
    step = CompiledStep.of(model)
    assert len(fake_compile) == 1 and fake_compile[0]["fullgraph"] is True
    assert step.eager_steps == 1  # the first step of the configuration, eager: it checks what the graph takes
    err = capsys.readouterr().err
    assert err.count("compiling the decode step") == 1 and err.count("compiled the decode step in") == 1
    model.generate(_prompts()[:2], 4, temperature=0, compile=True)  # another batch shape: another graph
    assert len(fake_compile) == 2


def test_autocast_and_the_weights_dtype_get_graphs_of_their_own(fake_compile):
    """A graph traced without autocast (or for other weights) must never serve a step that the eager forward
    would compute otherwise: the guards are off, so the key (the caches' dtypes, autocast, the weights'
    dtype) must tell them apart."""
    model = _model()
    prompts = _prompts()
    model.generate(prompts, 4, temperature=0, compile=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model.generate(prompts, 4, temperature=0)
        assert torch.equal(model.generate(prompts, 4, temperature=0, compile=True), eager)
    assert len(fake_compile) == 2
    model.double()
    assert torch.equal(model.generate(prompts, 4, temperature=0, compile=True), model.generate(prompts, 4, temperature=0))
    assert len(fake_compile) == 3


def test_steps_the_graph_cannot_take_go_to_the_eager_step(fake_compile):
    model = _model(max_seq_len=20)
    tokens = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        _, caches = prefill(model, tokens)
        token = tokens[:, :1]
        assert CompiledStep._key(model, token, caches) is not None
        model.train()
        assert CompiledStep._key(model, token, caches) is None  # dropout: training mode is the eager step's
        model.eval()
        detached = [cache.detach() for cache in caches]  # no constants: the eager step rebuilds them
        assert CompiledStep._key(model, token, detached) is None
        long = torch.randint(0, 64, (2, 20))
        _, full = prefill(model, long)
        assert CompiledStep._key(model, token, full) is None  # past max_seq_len: the eager step raises
        with pytest.raises(ValueError, match="max_seq_len"):
            engine.decode_step(model, token, full, compile=True)
    with torch.enable_grad():
        assert CompiledStep._key(model, token, caches) is None
    with torch.inference_mode():
        _, inference_caches = prefill(model, tokens)
    with torch.no_grad():  # inference tensors outside inference mode: the eager step copies them once
        assert CompiledStep._key(model, token, inference_caches) is None


def test_a_window_longer_than_the_text_grows_through_the_eager_step(fake_compile, monkeypatch):
    monkeypatch.setattr("windowed_attention.ops.decode.FIRST_DECODE_LIMIT", 16)
    model = _model(local_attn_window_size=64)  # decoded with the window cut to 16, then 32 positions
    prompt = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    eager = model.generate(prompt, 30, temperature=0)
    assert torch.equal(model.generate(prompt, 30, temperature=0, compile=True), eager)
    assert len(fake_compile) == 3  # one graph per cut: 16, 32, 64 positions


def test_compiled_steps_keep_the_checks(fake_compile):
    model = _model()
    tokens = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        _, caches = prefill(model, tokens)
        token = tokens[:, :1]
        for _ in range(3):  # eager, then compiled steps
            _, new = engine.decode_step(model, token, caches, compile=True)
            with pytest.raises(ValueError, match="already updated"):
                engine.decode_step(model, token, caches, compile=True)
            caches = new
        other = _model()
        other.load_state_dict(model.state_dict())
        with pytest.raises(ValueError, match="not built by this"):
            engine.decode_step(other, token, caches, compile=True)
        model.to_logits[1].weight.add_(1.0)
        with pytest.raises(ValueError, match="built from other weights"):
            engine.decode_step(model, token, caches, compile=True)


def test_a_failing_compiler_leaves_the_eager_step(monkeypatch, capsys):
    def broken(fn, **options):
        def run(*args):
            raise RuntimeError("no C compiler")
        return run

    monkeypatch.setattr(engine.torch, "compile", broken)
    model = _model()
    eager = model.generate(_prompts(), 6, temperature=0)
    assert torch.equal(model.generate(_prompts(), 6, temperature=0, compile=True), eager)
    assert "compiling the decode step failed (RuntimeError: no C compiler); decoding eagerly" in capsys.readouterr().err


def test_the_generate_command_passes_compile_on(fake_compile):
    from types import SimpleNamespace

    from windowed_attention.generation import cli

    model, rows = _model(), _prompts()
    args = SimpleNamespace(temperature=0.8, filter_thres=0.9, top_p=None, length=6, compile=False)
    generators = lambda: [torch.Generator().manual_seed(7) for _ in rows]  # noqa: E731 - one per row, as --seed
    eager = cli._generate_rows(model, rows, args, generators(), None)
    args.compile = True
    assert torch.equal(cli._generate_rows(model, rows, args, generators(), None), eager)
    assert len(fake_compile) == 1
    parser = cli.Parser(prog="windowed-attention generate")
    cli.add_arguments(parser)
    assert parser.parse_args(["--compile"]).compile and not parser.parse_args([]).compile


@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built here")
def test_opcheck_the_ops_of_a_compiled_step():
    """The decode kernel and the small linear as the custom ops traced code calls: schema (the decode op
    writes the ring buffers, and says so), fake implementation, registration."""
    from windowed_attention.ops.decode import decode_attend_op
    from windowed_attention.ops.small_linear import small_linear_op

    g = torch.Generator().manual_seed(0)
    b, h, hk, d, slots = 2, 4, 2, 16, 5
    q, k, v = (torch.randn(b, n, d, generator=g) for n in (h, hk, hk))
    k_buf, v_buf = (torch.randn(b, hk, 2 * slots, d, generator=g) for _ in range(2))
    cos, sig = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    row = torch.zeros(1, h, slots)
    key_bias = torch.zeros(b, 1, 2 * slots)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(decode_attend_op, (q, k, v, k_buf, v_buf, cos, sig, row, key_bias, None, 3, 4, 0.25,
                                             False, 0.0, None, None, None, None), test_utils=tests)
    x, weight, bias = torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    torch.library.opcheck(small_linear_op, (x, weight, bias), test_utils=tests)
    torch.testing.assert_close(small_linear_op(x, weight, bias), torch.nn.functional.linear(x, weight, bias))


@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built here")
def test_opcheck_the_kernel_ops_a_compiled_step_calls():
    """The kernels' own ops (`windowed_attention_cpu::`, schemas and fakes defined in Python, CPU kernels
    registered in C++), which a compiled step calls with no Python in between: schema (the decode op declares
    its writes), fake, registration, and the results of the ops defined in Python (the eager reference)."""
    from windowed_attention.ops import hyper
    from windowed_attention.ops.decode import decode_attend_op
    from windowed_attention.ops.small_linear import small_linear_op

    kernel_ops = torch.ops.windowed_attention_cpu
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    g = torch.Generator().manual_seed(0)
    b, h, hk, d, slots = 2, 4, 2, 16, 5
    q, k, v = (torch.randn(b, n, d, generator=g) for n in (h, hk, hk))
    buffers = [torch.randn(b, hk, 2 * slots, d, generator=g) for _ in range(2)]
    rest = (torch.randn(b, d, generator=g), torch.randn(b, d, generator=g), torch.zeros(1, h, slots),
            torch.zeros(b, 1, 2 * slots), None, 3, 4, 0.25, False, 0.0, None, None, None, None)
    torch.library.opcheck(kernel_ops.decode_attend.default, (q, k, v, *buffers, *rest), test_utils=tests)
    copies = [t.clone() for t in buffers]
    out = kernel_ops.decode_attend.default(q, k, v, *buffers, *rest)
    assert torch.equal(out, decode_attend_op(q, k, v, *copies, *rest))
    assert all(torch.equal(a, c) for a, c in zip(buffers, copies))  # the same writes into the ring

    x, weight, bias = torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    torch.library.opcheck(kernel_ops.small_linear.default, (x, weight, bias), test_utils=tests)
    assert torch.equal(kernel_ops.small_linear.default(x, weight, bias), small_linear_op(x, weight, bias))

    tokens, streams, dim = 3, 4, 8
    h_in = torch.randn(tokens, streams, dim, generator=g)
    mix_args = (h_in, torch.randn(dim, streams + 2, generator=g), torch.randn(streams, streams + 1, generator=g),
                torch.tensor(0.5), torch.randn(streams, generator=g), torch.tensor(0.25), 2.0)
    torch.library.opcheck(kernel_ops.hyper_forward.default, mix_args, test_utils=tests)
    assert all(map(torch.equal, kernel_ops.hyper_forward.default(*mix_args), hyper.hyper_mix(*mix_args)))
    write_args = (torch.randn(tokens, streams, dim, generator=g), torch.randn(tokens, streams, generator=g),
                  torch.randn(tokens, dim, generator=g))
    torch.library.opcheck(kernel_ops.hyper_write.default, write_args, test_utils=tests)
    assert torch.equal(kernel_ops.hyper_write.default(*write_args), hyper.hyper_write(*write_args))


@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built here")
def test_compiled_code_calls_the_kernel_ops_and_export_the_python_ops():
    """Traced by torch.compile without grad, the decode-path ops are the kernels' own (C++ registered); traced
    by torch.export, those defined in Python (an exported program loads without the kernel); with grad, the
    hyper-connection op with its autograd formula."""
    from windowed_attention.ops import hyper, small_linear

    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 16, generator=g), torch.randn(8, 16, generator=g)
    remixed, beta, out = (torch.randn(*shape, generator=g) for shape in ((2, 3, 8), (2, 3), (2, 8)))

    def f(x, weight, remixed, beta, out):
        return small_linear.linear(x, weight), hyper.write(remixed, beta, out)

    def targets(grad):
        seen = []

        def backend(gm, inputs):
            seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
            return gm

        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            result = torch.compile(f, backend=backend, fullgraph=True)(x, weight, remixed, beta, out)
        for got, want in zip(result, f(x, weight, remixed, beta, out)):
            torch.testing.assert_close(got, want)  # (with grad, traced code takes F.linear: MKL's last bits)
        return seen

    assert {"windowed_attention_cpu.small_linear.default", "windowed_attention_cpu.hyper_write.default"} <= set(
        targets(False))
    assert "windowed_attention.hyper_write.default" in targets(True)  # (a linear with grad is F.linear)

    class Module(torch.nn.Module):
        def forward(self, x, weight, remixed, beta, out):
            return f(x, weight, remixed, beta, out)

    with torch.no_grad():
        exported = torch.export.export(Module(), (x, weight, remixed, beta, out))
    exported_targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"windowed_attention.small_linear.default", "windowed_attention.hyper_write.default"} <= exported_targets
    assert not any(t.startswith("windowed_attention_cpu") for t in exported_targets)


def test_compile_must_be_a_bool():
    with pytest.raises(TypeError, match="compile must be a bool"):
        _model().generate(_prompts(), 2, compile=1)
    with pytest.raises(TypeError, match="compile must be a bool"):
        next(engine.stream(_model(), _prompts(), 2, compile="yes"))


def _compare(model, prompts, n=12, **options):
    """Greedy and seeded sampling: the compiled step's tokens are the eager step's."""
    torch._dynamo.reset()
    CompiledStep._models.pop(model, None)
    for sampling in (dict(temperature=0), dict(temperature=1.0, top_p=0.9)):
        runs = []
        for compile in (False, True):
            generator = torch.Generator().manual_seed(5)
            runs.append(model.generate(prompts, n, generator=generator, compile=compile, **sampling, **options))
        assert torch.equal(*runs), sampling
    step = CompiledStep.of(model)
    assert step.compile_seconds  # the graph ran (a failed compilation leaves the eager step: the same tokens)
    return step


@pytest.mark.slow  # the first compilation of a process: 20 s to 80 s on the loaded 2-core EPYC
@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built here")
def test_compiled_step_gives_the_eager_tokens():
    """A tiny model, a ragged batch, greedy and seeded sampling: one graph, the eager tokens."""
    step = _compare(_model(), _prompts())
    assert len(step.compile_seconds) == 1  # both samplings, one graph


@pytest.mark.slow
@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built here")
def test_compiled_step_of_the_benchmark_model_near_its_length_limit():
    """The benchmark's model (dim 256, four heads of 64, window 256) after a 512-token prompt, a few tokens short
    of `max_seq_len`, compiled in a first short run as the benchmark's warm-up does: the eager tokens. (A script
    doing this once aborted on a corrupted heap: inductor's cache handed it code written for another vector
    width, which tests/test_compiling.py covers; here the cache is this process's own.)"""
    torch.manual_seed(0)
    model = LocalTransformer(num_tokens=256, dim=256, depth=4, heads=4, dim_head=64, local_attn_window_size=256,
                             max_seq_len=522, num_residual_streams=1).eval()
    prompt = torch.randint(0, 256, (1, 512), generator=torch.Generator().manual_seed(512))
    torch._dynamo.reset()
    CompiledStep._models.pop(model, None)
    model.generate(prompt, 4, temperature=0, compile=True)  # compiles at its first step (the benchmark's warm-up)
    runs = [model.generate(prompt, 9, temperature=0, compile=compile) for compile in (True, False)]
    assert torch.equal(*runs)
    assert CompiledStep.of(model).compile_seconds


@pytest.mark.slow
@pytest.mark.skipif(not fused_cpu.available(), reason="the fused CPU kernel is not built here")
def test_graphs_of_two_models_and_batch_shapes_stay_apart():
    """Each graph has no guards: another model, or another batch shape, must reach its own graph."""
    first, second = _model(), _model(depth=2)
    runs = {}
    for model in (first, second):
        for prompts in (_prompts(), _prompts()[:2]):
            runs[id(model), len(prompts)] = model.generate(prompts, 8, temperature=0)
    for _ in range(2):
        for model in (first, second):
            for prompts in (_prompts(), _prompts()[:2]):
                compiled = model.generate(prompts, 8, temperature=0, compile=True)
                assert torch.equal(compiled, runs[id(model), len(prompts)])
    assert len(CompiledStep.of(first).compile_seconds) == len(CompiledStep.of(second).compile_seconds) == 2


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    dict(num_residual_streams=4, depth=2),
    dict(kv_heads=1, attn_sinks=True, softcap=20.0),
    dict(sink_tokens=2, qk_rmsnorm=True, gate_values_per_head=True),
    dict(use_xpos=True, use_abs_pos_emb=False),
    dict(use_dynamic_pos_bias=True, exact_windowsize=False),
    dict(local_attn_window_size=(6, 0), shared_qk=True),
], ids=str)
def test_compiled_step_gives_the_eager_tokens_for_every_cache_option(options):
    _compare(_model(**options), _prompts())


@pytest.mark.slow
def test_compiled_step_with_a_bfloat16_cache_and_in_float64():
    _compare(_model(), _prompts(), cache_dtype=torch.bfloat16)
    _compare(_model().double(), _prompts())  # float64: the torch ops of the step, not the kernel
